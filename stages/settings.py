"""The values a run derives from its flags, the backbone checkpoint and the dataset table."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from loader.dataloader import get_dataset
from loader.datasets_table import DATASETS, DatasetSettings, round_to_patch
from utils.errors import UserError


@dataclass(frozen=True)
class Derived:
    """Values that follow from the flags, the checkpoint and the dataset."""
    backbone_name: str
    patch_size: int
    embed_dim: int
    n_classes: int
    settings: DatasetSettings
    train_resolution: int
    test_resolution: int


def derive(args: argparse.Namespace, structure: str | None, patch_size: int, embed_dim: int,
           backbone_name: str) -> Derived:
    """Resolutions per dataset and structure (rounded up to the patch), classes per dataset (a directory
    dataset's from its labels, `loader.dataloader.directory_classes`)."""
    settings = DATASETS[args.dataset]
    n_classes = settings.n_classes
    if args.dataset == "directory":  # from the labels, checked against --n_classes (decoded once, cached)
        n_classes = get_dataset("directory", args.data_dir, "train", patch_size, n_classes=args.n_classes,
                                skip_bad_images=args.skip_bad_images, min_side=patch_size).n_classes
    elif args.n_classes is not None and args.n_classes != settings.n_classes:
        raise UserError(f"--n_classes {args.n_classes} does not fit {args.dataset}, "
                        f"which has {settings.n_classes} classes")
    default_train = settings.train_resolution_mlp if structure == "MLP" else settings.train_resolution_tr
    # a script without the flag (e.g. test_mlp has no --train_resolution) gets the dataset's value
    train_res = getattr(args, "train_resolution", None) or round_to_patch(default_train, patch_size)
    test_res = getattr(args, "test_resolution", None) or round_to_patch(settings.test_resolution, patch_size)
    for flag, res in (("--train_resolution", train_res), ("--test_resolution", test_res)):
        if res % patch_size:
            raise UserError(f"{flag} {res} is not divisible by the backbone patch size {patch_size} "
                            f"(try {round_to_patch(res, patch_size)})")
    return Derived(backbone_name=backbone_name, patch_size=patch_size, embed_dim=embed_dim, n_classes=n_classes,
                   settings=settings, train_resolution=train_res, test_resolution=test_res)
