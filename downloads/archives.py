"""Zip and tar archives: every member checked before anything is unpacked; unpacking is all or nothing."""
from __future__ import annotations

import errno
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
                tf.extractall(tmp, members=[m for m in tf.getmembers() if m.name in wanted], filter="data")
        (tmp / top).rename(dest)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise UserError(f"disk full while unpacking {archive} into {dest.parent}; free some space and run "
                            f"again (the archive is kept)") from None
        raise UserError(f"cannot unpack {archive} into {dest.parent} ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return outside
