"""Published checksums: verified where a release publishes one (whole or as its first hex digits).

Pascal VOC 2012 trainval: md5 (torchvision pins it); DINOv3: the first 8 hex digits of the sha256
in the file name (what `torch.hub` checks); MAE: md5 prefixes in the MAE README. Releases that
publish nothing keep their other checks (length, CRC, strict load).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from utils.errors import UserError

CHUNK = 1 << 20


@dataclass(frozen=True)
class Checksum:
    algorithm: str      # "md5" or "sha256"
    expected: str       # lowercase hex; a prefix where the release prints only the first digits
    published_by: str   # where the value is published

    def record(self, actual: str) -> dict[str, str]:
        return {"algorithm": self.algorithm, "expected": self.expected, "actual": actual,
                "published_by": self.published_by}


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def matches_published(path: Path, checksum: Checksum) -> tuple[bool, str]:
    """(whether `path` matches its published checksum, its actual digest)."""
    actual = file_digest(path, checksum.algorithm)
    return actual.startswith(checksum.expected), actual


def verify_published(path: Path, checksum: Checksum | None, what: str, remove: bool = True) -> dict[str, str] | None:
    """The record of the check of `path` against its published checksum (None: none is published).
    A mismatch removes `path` (a download; `remove=False`: a file the user placed) and raises one line
    naming the expected and actual hashes."""
    if checksum is None:
        print(f"{what}: no published checksum to check (the release publishes none)")
        return None
    matches, actual = matches_published(path, checksum)
    if not matches:
        mismatch = (f"{what}: {checksum.algorithm} mismatch: expected {checksum.expected} (published by "
                    f"{checksum.published_by}), got {actual}")
        if not remove:
            raise UserError(f"{mismatch}; move {path} away to download it again")
        path.unlink()
        raise UserError(f"{mismatch}; the file was removed: run again to download it anew, and if it fails the "
                        f"same way the release changed")
    print(f"{what}: {checksum.algorithm} {actual} matches the published {checksum.expected} "
          f"({checksum.published_by})")
    return checksum.record(actual)
