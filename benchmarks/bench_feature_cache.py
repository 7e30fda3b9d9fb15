"""Training with and without --feature_cache, as ratios from one run: one markdown table.

    python -m benchmarks.bench_feature_cache [--device cpu|cuda] [--sizes tiny|small|paper]
        [--stages front_door_tr fine_tuning_tr ...] [--backbones vit_base_8 ...] [--batch B]
        [--repeats 3] [--threads N] [--toy_steps 4 | --toy_steps 0]

Steps: each row builds the stage's own trainer exactly as ``benchmarks.bench_step`` does (random-init
backbone with the published 12 blocks, full concept bank in stage 2) and times
``Trainer._one_step`` on one batch, alternately without the cache (the backbone runs) and with it
(the batch's features read back from a memory-mapped fp32 shard written beforehand, so from the page
cache: a cache on a slow disk reads slower), median of ``--repeats``. At ``--sizes paper`` the last
column is the ratio the FLOP table of docs/performance.md predicts (320 px, per image).

Toy row: the mediator, front-door TR and fine-tuning TR stages of the generated toy set end to end
(``--toy_steps`` steps an epoch, per-epoch validation off: it is not cached) three times: without
the cache, with an empty cache (the row builds it), and the same row again from the built cache
(every image read back; another seed would visit other images in its first steps), after an untimed
warm-up row of 0 steps (imports and other one-time costs).
The toy backbone is the 2-block random ViT-Tiny/8, so the toy ratios are small: the backbone is a
small part of a toy step, unlike a real one.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.bench_step import (SIZES, backbone_name, build_stage_trainer, elapsed, machine, ms, positive_int,
                                   random_backbone, random_batch, sizes_and_process, stage_args)
from benchmarks.toy_pipeline import prepare, toy_row
from stages.common import Run, setup_run
from stages.feature_cache import CachedFeatures, FeatureStore

STRUCTURES = {"mediator": None, "front_door_mlp": "MLP", "front_door_tr": "TR", "fine_tuning_mlp": "MLP",
              "fine_tuning_tr": "TR"}
# step without / step with the cache from the FLOPs per image at 320 px (docs/performance.md): backbone
# 115 (S/8) / 367 (B/8); stage-2 TR head 75 / 183 and bank products 168; stage-3 TR teacher forward
# 19.9 / 48.3 (with --published_label_leak its backward too: x3).
PREDICTED = {("vit_small_8", "front_door_tr"): (115 + 75 + 168) / (75 + 168),
             ("vit_base_8", "front_door_tr"): (367 + 183 + 168) / (183 + 168),
             ("vit_small_8", "fine_tuning_tr"): (115 + 19.9) / 19.9,
             ("vit_base_8", "fine_tuning_tr"): (367 + 48.3) / 48.3}


def with_cache(run: Run, batch: dict, folder: Path) -> None:
    """Write the batch's features as one fp32 shard under `folder`, then make `run` read them."""
    tokens = (run.derived.train_resolution // run.derived.patch_size) ** 2
    store = FeatureStore(folder, {"format": 1, "bench": run.args.stage, "dtype": "fp32", "tokens": tokens,
                                  "dim": run.derived.embed_dim, "images": len(batch["ind"])})
    store.prepare()
    store.write(batch["ind"].tolist(), run.features(batch["img"]))  # (B, N, D)
    run.feature_cache = CachedFeatures(run, store)


def time_steps(run: Run, repeats: int, folder: Path) -> tuple[float, float]:
    """Median seconds of one training step without and with the cache, timed alternately after a warm-up."""
    trainer, batch = build_stage_trainer(run), random_batch(run)
    batch["ind"] = torch.arange(batch["img"].shape[0])
    with_cache(run, batch, folder)
    cache = run.feature_cache

    def step(cached: bool) -> float:
        run.feature_cache = cache if cached else None
        return elapsed(lambda: trainer._one_step(batch), run.device)

    step(False), step(True)
    times = [(step(False), step(True)) for _ in range(repeats)]
    return tuple(statistics.median(column) for column in zip(*times))  # type: ignore[return-value]


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", choices=list(SIZES), default="small",
                    help="tiny: CI only; small: 128 px, batch 4, K=512, p=256; paper: 320 px, batch 16, K=2048, p=2048")
    ap.add_argument("--stages", nargs="+", choices=list(STRUCTURES), default=["front_door_tr", "fine_tuning_tr"],
                    metavar="STAGE", help="step rows (default: front_door_tr fine_tuning_tr)")
    ap.add_argument("--backbones", nargs="+", type=backbone_name, default=None, metavar="NAME",
                    help="vit_<size>_<patch> (default per --sizes, as bench_step)")
    ap.add_argument("--batch", type=positive_int, default=None, help="images per step instead of the --sizes one")
    ap.add_argument("--repeats", type=positive_int, default=3, help="timed steps per row and case (median)")
    ap.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--toy_steps", type=int, default=4, help="steps an epoch of the toy row (0: no toy row)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    opts = parse_options(argv)
    size, dist = sizes_and_process(opts)
    print(machine(opts.device))
    print(f"sizes={opts.sizes}: {size['resolution']} px, batch {size['batch']}, K={size['K']}, p={size['p']}; "
          f"median of {opts.repeats}\n")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        print("| backbone | stage | step, backbone runs | step, cached features | ratio | FLOP prediction |")
        print("|---|---|---|---|---|---|")
        for name in opts.backbones or size["backbones"]:
            ckpt = tmp / f"random_{name}.pth"
            random_backbone(name, ckpt)
            for stage in opts.stages:
                run = setup_run(stage_args(stage, ckpt, size, opts.device, tmp), dist, STRUCTURES[stage])
                plain, cached = time_steps(run, opts.repeats, tmp / "cache" / stage / name)
                predicted = PREDICTED.get((name, stage)) if opts.sizes == "paper" else None
                print(f"| {name} | {stage} | {ms(plain)} | {ms(cached)} | {plain / cached:.2f} | "
                      f"{f'{predicted:.2f}' if predicted else '-'} |", flush=True)
        if opts.toy_steps > 0:
            prepare(tmp)
            cache, flags = tmp / "toy-cache", {"max_steps": opts.toy_steps, "validate": "false", "device": opts.device}
            toy_row(tmp, tmp / "warm-up", **{**flags, "max_steps": 0})  # one-time costs (imports, first files)
            rows = {"without the cache": toy_row(tmp, tmp / "plain", **flags),
                    "empty cache (built by this row)": toy_row(tmp, tmp / "cold", feature_cache=cache, **flags),
                    "built cache (the same row again)": toy_row(tmp, tmp / "warm", feature_cache=cache, **flags)}
            plain = rows["without the cache"]
            print(f"\ntoy TR row (mediator, front-door, fine-tuning; {opts.toy_steps} steps an epoch, 8 epochs, "
                  f"no validation):\n\n| run | time | ratio to without |\n|---|---|---|")
            for label, seconds in rows.items():
                print(f"| {label} | {seconds:.1f} s | {plain / seconds:.2f} |")


if __name__ == "__main__":
    main()
