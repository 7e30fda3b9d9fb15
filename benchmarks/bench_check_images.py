"""Cost of the up-front decode check of a directory dataset (loader/checks.py): one markdown table.

    python -m benchmarks.bench_check_images [--images 10000] [--side 128] [--folder DIR]

Writes `--images` generated JPEG photos (`--side` px square) with 8-bit PNG labels under
`--folder`/images and /labels (a temporary folder by default), then times: listing the folder, the
first check (every image and label decoded, on threads), and the second (read from the cache).
The cache goes to a temporary $CAUSE_CACHE, so earlier runs do not count.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_folder(root: Path, count: int, side: int) -> None:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
    for i in range(count):
        rgb = np.roll(base, i, axis=1)  # each photo differs, generation stays cheap
        Image.fromarray(rgb).save(root / "images" / f"{i:05d}.jpg", quality=90)
        Image.fromarray((rgb[:, :, 0] // 64).astype(np.uint8)).save(root / "labels" / f"{i:05d}.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--side", type=int, default=128)
    p.add_argument("--folder", default=None, help="where to write the images (default: a temporary folder)")
    args = p.parse_args()
    os.environ["CAUSE_CACHE"] = tempfile.mkdtemp(prefix="cause-bench-cache-")
    from loader.checks import check_files  # after $CAUSE_CACHE is set
    from loader.layouts import directory_files

    root = Path(args.folder or tempfile.mkdtemp(prefix="cause-bench-images-"))
    t0 = time.perf_counter()
    write_folder(root, args.images, args.side)
    rows = [("write the folder (not part of a run)", time.perf_counter() - t0)]
    t0 = time.perf_counter()
    files = directory_files(root, "train")
    rows.append(("list images/ and labels/", time.perf_counter() - t0))
    for name in ("first check: decode every image and label", "second check: from the cache"):
        t0 = time.perf_counter()
        checked = check_files(files, root, skip_bad=False)
        rows.append((name, time.perf_counter() - t0))
    assert checked.largest_label is not None and checked.largest_label[0] == 3
    print(f"{args.images} images {args.side}x{args.side} JPEG + 8-bit PNG labels, {os.cpu_count()} CPU cores\n")
    print("| step | seconds |\n|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
