"""The toy TR row end to end under each --precision, with and without --feature_cache: one table.

    python -m benchmarks.toy_pipeline [--device cuda] [--precisions fp32 bf16 fp16] [--steps 10] [--dry-run]

Per precision the row (mediator, front-door TR, fine-tuning TR, test TR) runs twice in this process:
without the cache, then with it (one cache folder for every precision: each gets its own key). The
table gives each run's time and scores, whether the cached row's segment head and cluster probe equal
the plain row's bit for bit (else their largest difference), and whether its metrics.json names the
cache. --dry-run: tiny sizes (32 px, K=8, p=8, batch 4, 1 step an epoch) for CI.
A failed check exits 1 after the table.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from loader.dataloader import get_dataset
from loader.datasets_table import run_defaults
from models import save_random_checkpoint
from utils.config import stage_argv

TINY = {"train_resolution": 32, "test_resolution": 32, "num_codebook": 8, "projection_dim": 8, "batch_size": 4, "epoch": 1,
        "crf_workers": 0, "num_workers": 0}
TRAINING = ("mediator", "front_door_tr", "fine_tuning_tr")


def prepare(root: Path) -> None:
    """The random toy backbone and the toy set (generated before anything is timed)."""
    save_random_checkpoint("random_vit_tiny_8", root / "random_vit_tiny_8.pth")
    for split in ("train", "val"):
        get_dataset("toy", root / "data", split, 32)


def toy_row(root: Path, out: Path, stages: tuple[str, ...] = TRAINING, **flags: object) -> float:
    """Seconds of `stages` of the toy TR row (sizes as `bash run`'s, unless `flags` say otherwise), each
    through its script's entry point in this process."""
    from stages.cli import cli
    from stages.evaluate import evaluate
    from stages.fine_tuning import fine_tune
    from stages.front_door import train_front_door
    from stages.mediator import train_mediator
    bodies = {"mediator": (None, train_mediator), "front_door_tr": ("TR", train_front_door),
              "fine_tuning_tr": ("TR", fine_tune), "test_tr": ("TR", evaluate)}
    given = {"dataset": "toy", "data_dir": root / "data", "ckpt": root / "random_vit_tiny_8.pth",
             "output_dir": out / "CAUSE", "results_dir": out / "results", "log_dir": out / "logs",
             **run_defaults("toy"), **flags}  # K, p and batch of `bash run`'s toy row
    argv = [x for k, v in given.items() for x in (f"--{k}", str(v))]
    t0 = time.perf_counter()
    for stage in stages:
        structure, body = bodies[stage]
        cli(stage, structure, body, stage_argv(stage, argv))
    return time.perf_counter() - t0


def largest_difference(a: Path, b: Path) -> float:
    """Largest absolute difference between two state dicts with the same keys (0.0: bit for bit equal)."""
    x, y = torch.load(a), torch.load(b)
    return max(((x[k].float() - y[k].float()).abs().max().item() if not torch.equal(x[k], y[k]) else 0.0)
               for k in x)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "fp16"], default=["fp32", "bf16", "fp16"])
    ap.add_argument("--steps", type=int, default=10, help="steps an epoch (--max_steps)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (CI)")
    opts = ap.parse_args(argv)
    device = "cpu" if opts.dry_run else opts.device
    sizes = {**TINY, "max_steps": 1} if opts.dry_run else {"max_steps": opts.steps, "val_images": 8}
    print("| precision | cache | seconds | mIoU (no CRF) | linear mIoU | vs without the cache | metrics.json "
          "names the cache |\n|---|---|---|---|---|---|---|", flush=True)
    failed = False
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        prepare(tmp)
        for precision in opts.precisions:
            runs = {}
            for cached in (False, True):
                out = tmp / precision / ("cached" if cached else "plain")
                flags = {**sizes, "device": device, "precision": precision,
                         **({"feature_cache": tmp / "cache"} if cached else {})}
                seconds = toy_row(tmp, out, TRAINING + ("test_tr",), **flags)
                metrics = json.loads(next((out / "results").rglob("metrics.json")).read_text())
                runs[cached] = out
                same, named = "", ""
                if cached:
                    heads = [next((runs[c] / "CAUSE").rglob(name)) for name in ("segment_tr.pth", "cluster_tr.pth")
                             for c in (False, True)]
                    diff = max(largest_difference(heads[0], heads[1]), largest_difference(heads[2], heads[3]))
                    same = "bit for bit" if diff == 0.0 else f"differs: max {diff:.2e}"
                    named = "yes" if metrics.get("feature_cache") else "NO"
                    failed |= named == "NO" or (precision == "fp32" and device == "cpu" and diff != 0.0)
                print(f"| {precision} | {'yes' if cached else 'no'} | {seconds:.1f} | "
                      f"{metrics['unsupervised']['mIoU']:.2f} | {metrics['linear']['mIoU']:.2f} | {same} | {named} |",
                      flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
