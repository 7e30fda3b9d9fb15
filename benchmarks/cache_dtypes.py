"""What --feature_cache_dtype fp16/bf16 changes: the features, and the toy row's scores over seeds.

    python -m benchmarks.cache_dtypes [--seeds 0 1 2] [--steps 3] [--images 64]

Features: the toy training images (--images of them, 128 px) through the random ViT-Tiny/8 in fp32,
against the same features rounded to fp16 and bf16: largest absolute difference, and largest
difference relative to the largest feature magnitude. Scores: the toy TR row (mediator, front-door,
fine-tuning, test; --steps steps an epoch, no per-epoch validation) trained from an fp32, fp16 and bf16
cache for each seed; an fp32 cache gives the row trained without a cache (bit for bit).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from benchmarks.toy_pipeline import TRAINING, prepare, toy_row
from loader.dataloader import get_dataset
from models import load_backbone


def feature_differences(root: Path, images: int) -> dict[str, tuple[float, float]]:
    """cache dtype -> (largest |difference|, that / largest |feature|) against the fp32 features."""
    backbone = load_backbone(root / "random_vit_tiny_8.pth")
    dataset = get_dataset("toy", root / "data", "train", 128)
    with torch.no_grad():
        feat = backbone(torch.stack([dataset[i]["img"] for i in range(images)]))  # (B, N, D)
    top = feat.abs().max().item()
    out = {}
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        diff = (feat.to(dtype).float() - feat).abs().max().item()
        out[name] = (diff, diff / top)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--images", type=int, default=64)
    opts = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        prepare(tmp)
        print("| cache dtype | largest feature difference | relative to the largest feature |\n|---|---|---|")
        for name, (diff, rel) in feature_differences(tmp, opts.images).items():
            print(f"| {name} | {diff:.3g} | {rel:.2e} |", flush=True)
        print("\n| seed | cache dtype | mIoU (no CRF) | mIoU (CRF) | linear mIoU |\n|---|---|---|---|---|")
        for seed in opts.seeds:
            for dtype in ("fp32", "fp16", "bf16"):
                out = tmp / f"{seed}-{dtype}"
                toy_row(tmp, out, TRAINING + ("test_tr",), max_steps=opts.steps, validate="false", seed=seed,
                        device="cpu", feature_cache=tmp / "cache", feature_cache_dtype=dtype)
                m = json.loads(next((out / "results").rglob("metrics.json")).read_text())
                print(f"| {seed} | {dtype} | {m['unsupervised']['mIoU']:.2f} | {m['unsupervised_crf']['mIoU']:.2f} | "
                      f"{m['linear']['mIoU']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
