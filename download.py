"""Fetch backbones, datasets and the published CAUSE heads, resumable and verified.

    python download.py list
    python download.py backbone dino_vit_base_8 [--dest checkpoint] [--url URL]
    python download.py dataset cocostuff [--data_dir data] [--crop true|false]
    python download.py published --dataset cocostuff27 --ckpt dino_vit_base_8 --structure TR

CAUSE_DOWNLOAD_MIRROR=http://HOST:PORT sends every request to a mirror (path and query kept).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from downloads.sources import BACKBONES, DATASET_SOURCES, PUBLISHED, listing
from utils.config import OneLineParser, bounded_int, default_num_workers, show_ranges, str2bool
from utils.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="Download backbones, datasets and published CAUSE heads.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{list,backbone,dataset,published}")
    sub.add_parser("list", help="every name the other subcommands accept, with approximate sizes (no network)")

    b = sub.add_parser("backbone", help="an official backbone release, saved as <dest>/<NAME>.pth")
    b.add_argument("name", metavar="NAME", help=f"one of: {', '.join(BACKBONES)}")
    b.add_argument("--dest", default="checkpoint", help="folder of the backbone files")
    b.add_argument("--url", default=None,
                   help="download from this address instead (gated weights: the signed link you were given)")

    d = sub.add_parser("dataset", help="a dataset archive, unpacked into the layout the loaders read")
    d.add_argument("name", metavar="NAME", help=f"one of: {', '.join(DATASET_SOURCES)}")
    d.add_argument("--data_dir", default="data", help="dataset root (STEGO layout)")
    d.add_argument("--crop", type=str2bool, default=True,
                   help="then write the published pre-cropped training sets (crop_dataset.py)")
    d.add_argument("--keep_archive", type=str2bool, default=False, help="keep the archive after unpacking it")
    d.add_argument("--num_workers", type=bounded_int(0), default=default_num_workers(),
                   help="processes writing the crops (default: min(8, CPUs - 1))")
    show_ranges(d)

    pub = sub.add_parser("published", help="the published CAUSE segment head, cluster probe and codebook of a row")
    pub.add_argument("--dataset", required=True, choices=sorted({r.dataset for r in PUBLISHED}),
                     help="dataset of the published row")
    pub.add_argument("--ckpt", required=True,
                     help="backbone of the row: a name (dino_vit_base_8) or its file (checkpoint/dino_vit_base_8.pth)")
    pub.add_argument("--structure", required=True, choices=["MLP", "TR"], help="CAUSE-MLP or CAUSE-TR")
    pub.add_argument("--output_dir", default="CAUSE", help="artifact root the test scripts read (--output_dir)")
    pub.add_argument("--data_dir", default="data", help="dataset root, for the printed test command")
    pub.add_argument("--ckpt_dir", default="checkpoint", help="backbone folder, for the printed test command")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        print(listing())
        return 0
    from downloads import fetch as download  # torch and the models load only for the transfers that verify with them
    try:
        if args.command == "backbone":
            download.fetch_backbone(args.name, Path(args.dest), args.url)
        elif args.command == "dataset":
            download.fetch_dataset(args.name, Path(args.data_dir), args.crop, args.keep_archive, args.num_workers)
        else:
            print("next:\n" + download.fetch_published(args.dataset, args.ckpt, args.structure, Path(args.output_dir),
                                                     Path(args.data_dir), Path(args.ckpt_dir)))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again; it resumes from the part already downloaded",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
