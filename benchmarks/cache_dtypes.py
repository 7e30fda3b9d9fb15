"""What --feature_cache_dtype fp16/bf16 changes: the features, and the toy row's scores over seeds.

    python -m benchmarks.cache_dtypes [--seeds 0 1 2] [--steps 3] [--images 64]

Features: the toy training images (--images of them, 128 px) through the random ViT-Tiny/8 in fp32,
against the same features rounded to fp16 and bf16: largest absolute difference, and largest
difference relative to the largest feature magnitude. Scores: the toy TR row (mediator, front-door,
fine-tuning; --steps steps an epoch) trained from an fp32, fp16 and bf16 cache for each seed, scored by
the last per-epoch validation of fine-tuning (cluster probe and linear probe on the 48 val images, no
CRF), and how far its cluster probe is from the fp32 row's (an fp32 cache gives the row trained without
a cache, bit for bit).
"""
from __future__ import annotations

import argparse
import contextlib
import io
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
        print("\n| seed | cache dtype | last validation of fine-tuning | cluster probe vs the fp32 cache's |\n"
              "|---|---|---|---|")
        for seed in opts.seeds:
            for dtype in ("fp32", "fp16", "bf16"):
                out = tmp / f"{seed}-{dtype}"
                said = io.StringIO()
                with contextlib.redirect_stdout(said):
                    toy_row(tmp, out, TRAINING, max_steps=opts.steps, validate="true", seed=seed, device="cpu",
                            feature_cache=tmp / "cache", feature_cache_dtype=dtype)
                scores = [line.split(": ", 1)[1] for line in said.getvalue().splitlines()
                          if line.startswith("[fine_tuning_tr] validation")][-1]
                probe = torch.load(next((out / "CAUSE").rglob("cluster_tr.pth")))["cluster_probe"]
                fp32 = torch.load(next((tmp / f"{seed}-fp32" / "CAUSE").rglob("cluster_tr.pth")))["cluster_probe"]
                print(f"| {seed} | {dtype} | {scores} | max difference {(probe - fp32).abs().max().item():.2e} |",
                      flush=True)


if __name__ == "__main__":
    main()
