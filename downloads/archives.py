"""Zip and tar archives: every member checked before anything is unpacked; unpacking is all or nothing."""
from __future__ import annotations

import copy
import errno
import os
import posixpath
import shutil
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from utils.errors import UserError

CHUNK = 1 << 20


def member_names(archive: Path) -> list[str]:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            return zf.namelist()
    with tarfile.open(archive) as tf:
        return tf.getnames()


def verify_archive(archive: Path) -> None:
    """Read every member to the end: zip CRC-32 per member; tar header checksums and member lengths
    (plus the gzip/bz2/xz trailer checks of a compressed tar). UserError naming the archive otherwise."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                bad = zf.testzip()
            if bad is not None:
                raise UserError(f"{archive} is corrupt: CRC mismatch in {bad}")
            return
        with tarfile.open(archive) as tf:
            for member in tf:
                if member.isfile():
                    _read_member(tf, member, archive)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise UserError(f"{archive} is corrupt or not a zip/tar archive ({type(e).__name__}: {e})") from None


def _read_member(tf: tarfile.TarFile, member: tarfile.TarInfo, archive: Path) -> None:
    stream = tf.extractfile(member)
    read = 0
    while chunk := stream.read(CHUNK):
        read += len(chunk)
    if read != member.size:
        raise UserError(f"{archive} is truncated: {member.name} holds {read} of {member.size} bytes")


def members_under(archive: Path, top: str) -> tuple[list[str], list[str]]:
    """(entries inside the folder `top`, entries elsewhere); UserError for an absolute or `..` path."""
    inside, outside = [], []
    for name in member_names(archive):
        path = PurePosixPath(name)
        if path.is_absolute() or ".." in path.parts:
            raise UserError(f"{archive}: unexpected entry {name!r}; an archive entry must stay inside its folder")
        (inside if path.parts[:1] == (top,) else outside).append(name)
    if not inside:
        raise UserError(f"{archive} holds no folder {top}/ (found: {', '.join(outside[:3])})")
    return inside, outside


def unpack(archive: Path, top: str, dest: Path) -> list[str]:
    """Extract the folder `top` of a verified `archive` so that it becomes `dest`; returns the entries
    outside `top` (e.g. `__MACOSX/...`), which are left out.

    The folder is extracted into a hidden temporary folder beside `dest`, renamed into place at the
    end: an interrupted unpack leaves nothing at `dest` (its leftovers are removed by the next run).
    """
    if dest.exists():
        raise UserError(f"{dest} already exists; remove it to unpack {archive.name} again")
    inside, outside = members_under(archive, top)
    tmp = dest.parent / f".{dest.name}.unpacking"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp, members=inside)
        else:
            with tarfile.open(archive) as tf:
                wanted = set(inside)
                _extract_data(tf, [m for m in tf.getmembers() if m.name in wanted], tmp, archive)
        _links_stay_inside(tmp / top, archive)
        (tmp / top).rename(dest)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise UserError(f"disk full while unpacking {archive} into {dest.parent}; free some space and run "
                            f"again (the archive is kept)") from None
        raise UserError(f"cannot unpack {archive} into {dest.parent} ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return outside


def _extract_data(tf: tarfile.TarFile, members: list[tarfile.TarInfo], into: Path, archive: Path) -> None:
    """Extract `members` into `into` with the checks of tarfile's "data" filter (its own where tarfile has
    extraction filters, `data_member` on Python 3.10.0-3.10.11 and 3.11.0-3.11.3), and each member's real
    destination, and a link's real target, resolved against what is already extracted just before the member
    is written (`_resolved_inside`): a chain of links cannot lead a later member outside. UserError naming the
    archive and the entry otherwise."""
    root = os.path.realpath(into)
    try:
        if hasattr(tarfile, "data_filter"):
            tf.extractall(into, members=members,
                          filter=lambda m, dest: _resolved_inside(tarfile.data_filter(m, dest), root, archive))
        else:   # extractall takes the members one by one from the generator, each checked just before
            tf.extractall(into, members=(_resolved_inside(data_member(m, archive), root, archive) for m in members))
    except getattr(tarfile, "FilterError", ()) as e:
        raise UserError(f"{archive}: {e}; tarfile's \"data\" filter refuses it (an archive of data holds only "
                        f"files, folders and links that stay inside its folder)") from None


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _resolved_inside(member: tarfile.TarInfo, root: str, archive: Path) -> tarfile.TarInfo:
    """`member` when, following the links extracted so far, it is written inside `root` and a link it makes
    resolves inside `root`; UserError otherwise."""
    at = os.path.join(root, member.name)
    written = os.path.realpath(os.path.dirname(at))
    if not member.issym():   # a file is written through a link already at its place; a new link replaces one
        written = os.path.realpath(at)
    if not _inside(written, root):
        raise UserError(f"{archive}: entry {member.name!r} would be written to {written}, outside the folder it "
                        f"is unpacked into (through the links before it)")
    if member.issym() or member.islnk():
        base = written if member.issym() else root
        target = os.path.realpath(os.path.join(base, member.linkname))
        if not _inside(target, root):
            raise UserError(f"{archive}: link {member.name!r} points outside its folder ({member.linkname!r} "
                            f"resolves to {target} through the links before it)")
    return member


def _links_stay_inside(folder: Path, archive: Path) -> None:
    """Every link under `folder` resolves inside it (a link that a later entry redirected, too); UserError
    naming the first that does not."""
    root = os.path.realpath(folder)
    for dirpath, dirnames, filenames in os.walk(folder):   # links to folders are listed, not followed
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path) and not _inside(os.path.realpath(path), root):
                raise UserError(f"{archive}: link {os.path.relpath(path, folder)!r} points outside its folder "
                                f"(it resolves to {os.path.realpath(path)})")


def data_member(member: tarfile.TarInfo, archive: Path) -> tarfile.TarInfo:
    """What the "data" filter lets through: regular files, folders and links that stay inside the
    destination; no device or pipe; no set-uid/set-gid/sticky or group/other write bits, files readable
    and writable by their owner; owner and group those of the user unpacking. UserError otherwise."""
    name = posixpath.normpath(member.name)
    if name.startswith(("/", "../")) or name == "..":
        raise UserError(f"{archive}: unexpected entry {member.name!r}; an archive entry must stay inside its folder")
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        raise UserError(f"{archive}: entry {member.name!r} is a device or pipe; an archive of data holds only "
                        f"files, folders and links")
    if member.issym() or member.islnk():
        base = posixpath.dirname(name) if member.issym() else ""
        target = posixpath.normpath(posixpath.join(base, member.linkname))
        if member.linkname.startswith("/") or target.startswith("../") or target == "..":
            raise UserError(f"{archive}: link {member.name!r} points outside its folder ({member.linkname!r})")
    safe = copy.copy(member)
    if member.isfile() or member.islnk():
        safe.mode = (member.mode & 0o755) | 0o600
    elif member.isdir():
        safe.mode = member.mode & 0o755
    safe.uid, safe.gid, safe.uname, safe.gname = os.getuid(), os.getgid(), "", ""
    return safe
