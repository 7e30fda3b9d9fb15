"""The published training recipe (--published_recipe) and the switches it sets.

The published runs were 4 processes spawned on 4 GPUs that never synchronised: each trained its own
copy of every head at lr 1e-3 x 4 on its DistributedSampler shard with its own concept bank, under
fp16 autocast with a GradScaler; rank 0's weights were saved. The recipe computes what rank 0 did:
one replica, lr x 4, rank 0's shard of a 4-way split in torch's DistributedSampler order, fp16 with
the published loss precision, 12-head DINO ViT-S, the label leak of fine-tuning and the published
clipping (on CPU the networks fall back to fp32, see `recipe_precision`). With several processes,
process r trains replica r on shard r, independently of the others.
"""
from __future__ import annotations

import argparse

from models import parse_backbone_name
from utils.config import checkpoint_stem
from utils.errors import UserError

PUBLISHED_REPLICAS = 4       # GPUs of the published runs: the shards of the split and the lr scale
PUBLISHED_PRECISION = "fp16"


def _is_dino_small(ckpt: str) -> bool:
    try:
        spec = parse_backbone_name(checkpoint_stem(ckpt))
    except UserError:  # the backbone loader reports the name
        return False
    return (spec.family, spec.size) == ("dino", "small")


def resolve_switches(args: argparse.Namespace) -> None:
    """Fill the published switches the user left unset: on under the recipe (12 heads for DINO ViT-S
    only), off otherwise; a switch set against the recipe, or a recipe run on more processes than
    the published replicas, stops with one line."""
    recipe = args.published_recipe
    wanted = {"published_12_heads": _is_dino_small(args.ckpt), "published_label_leak": True}
    for flag, value in wanted.items():
        if flag not in args:  # --published_label_leak: the fine-tuning scripts only
            continue
        given = getattr(args, flag)
        if given is None:
            setattr(args, flag, recipe and value)
        elif recipe and given != value:
            raise UserError(f"--{flag} {str(given).lower()} contradicts --published_recipe true, which sets it "
                            f"to {str(value).lower()} for this backbone; drop one of them")
    if recipe and args.precision not in ("auto", PUBLISHED_PRECISION):
        raise UserError(f"--precision {args.precision} contradicts --published_recipe true, which trains in "
                        f"{PUBLISHED_PRECISION}; drop one of them")


def recipe_precision(precision: str, device_type: str) -> tuple[str, str | None]:
    """(precision, fallback note) of a recipe run: fp16 as published; on CPU, unless --precision fp16 asks
    for it, the networks run in fp32 (fp16 GEMMs there are ~100x slower) while the loss math keeps the
    published fp16 precision. The note (None without a fallback) goes into the artifact JSON."""
    if precision == PUBLISHED_PRECISION or device_type == "cuda":
        return PUBLISHED_PRECISION, None
    return "fp32", ("published fp16 autocast replaced by fp32 for backbone and heads on CPU (fp16 matrix "
                    "products are ~100x slower there; pass --precision fp16 to force it); the loss math keeps "
                    "the published fp16 precision")


def check_processes(recipe: bool, world_size: int) -> None:
    if recipe and world_size > PUBLISHED_REPLICAS:
        raise UserError(f"--published_recipe true runs at most {PUBLISHED_REPLICAS} processes (one per published "
                        f"replica; rank 0's is saved), got {world_size}; use fewer GPUs")
