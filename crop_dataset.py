"""Write the pre-cropped training set of a dataset (STEGO / CAUSE crop geometry).

    python crop_dataset.py --dataset cocostuff27 --crop_type five --data_dir data

Re-running finishes an interrupted run and rewrites nothing already written.
"""
from __future__ import annotations

import argparse
import sys

from loader.datasets_table import CROP_TYPE_NAMES, CROPPABLE, DATASETS
from utils.config import OneLineParser, bounded_int, default_num_workers, show_ranges
from utils.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="Write a pre-cropped training set.")
    p.add_argument("--dataset", default="cocostuff27", choices=CROPPABLE,
                   help="which dataset's training split to crop (those with a pre-cropped set)")
    p.add_argument("--crop_type", default=None, choices=CROP_TYPE_NAMES,
                   help="crop geometry (default: the dataset's published setting, loader/datasets_table.py)")
    p.add_argument("--data_dir", default="data", help="dataset root (STEGO layout)")
    p.add_argument("--num_workers", type=bounded_int(0), default=default_num_workers(),
                   help="cropping processes (default: min(8, CPUs - 1))")
    show_ranges(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from loader.cropping import write_cropped_set  # torch loads here, after the flags (--help without it)
    published = DATASETS[args.dataset].crop_type
    kind = args.crop_type or published
    try:
        if kind is None:
            raise UserError(f"{args.dataset} has no published crop type; pass --crop_type")
        if published is not None and kind != published:
            print(f"warning: training on {args.dataset} reads the '{published}' set (loader/datasets_table.py); "
                  f"writing a '{kind}' set", file=sys.stderr)
        out, written = write_cropped_set(args.dataset, args.data_dir, kind, num_workers=args.num_workers)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"pre-cropped set complete: {out} ({written} crops written now)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
