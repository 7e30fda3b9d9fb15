"""A cheap identity of the files a dataset reads, recorded in every artifact's provenance JSON.

The fingerprint is the file count, their total size and a sha256 over every file's path (relative
to the data folder) and size, in reading order (images, then labels). It only stats the files
(nothing is read), so it stays cheap on COCO's 120k images; two data folders that differ in any
file's name, presence or size get different fingerprints. `content_key` adds each file's
modification time: the key of what was learnt by reading the files (loader/checks.py caches by it).
"""
from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

from loader.files import FileList
from utils.errors import UserError


def data_fingerprint(files: FileList, data_dir: str | Path) -> str:
    """'<n> files, <bytes> bytes, sha256 <16 hex>' of the images and labels of `files`."""
    digest, count, total = hashlib.sha256(), 0, 0
    for relative, stat in _stats(files, data_dir):
        digest.update(f"{relative}\t{stat.st_size}\n".encode())
        count, total = count + 1, total + stat.st_size
    return f"{count} files, {total} bytes, sha256 {digest.hexdigest()[:16]}"


def content_key(files: FileList, data_dir: str | Path) -> str:
    """sha256 (hex) of the resolved data folder and every file's relative path, size and modification time."""
    digest = hashlib.sha256(f"{Path(data_dir).resolve()}\n".encode())
    for relative, stat in _stats(files, data_dir):
        digest.update(f"{relative}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _stats(files: FileList, data_dir: str | Path) -> Iterator[tuple[str, os.stat_result]]:
    """(path relative to `data_dir`, stat) of every image, then every label, of `files`."""
    prefix = os.path.join(os.fspath(Path(data_dir)), "")  # the dataset's paths are built on it: cut it off
    labels = (path for path in files.labels or () if path is not None)  # partly labelled folders: None = no label
    for path in itertools.chain(files.images, labels):
        name = os.fspath(path)
        try:
            stat = os.stat(name)
        except FileNotFoundError:
            raise UserError(f"data file not found: {os.path.abspath(name)}") from None
        yield (name[len(prefix):] if name.startswith(prefix) else os.path.relpath(name, data_dir)), stat
