"""One training step of each stage over the frozen backbone's forward alone, same batch: one markdown table.

    python -m benchmarks.bench_step [--device cpu|cuda] [--sizes small|paper] [--repeats 3]

Each row builds the stage's own trainer (``stages.<stage>.build_trainer``) on a random-init
backbone with the architecture of the DINO one of the same size, and times
``Trainer._one_step``: forward under the AMP policy, backward, clipping, Adam, and for stage 2
the EMA and concept-bank update against a full bank (K x 100 entries), TensorBoard scalars
included.  The reference is ``Run.features`` (the backbone forward the step starts with, no
grad, same AMP policy) on the same batch.  Batches are random images and labels kept on the
CPU (pinned on CUDA), so both timings include the host-to-device copy.  The two are timed
alternately after a warm-up; each cell is the median over ``--repeats``.  All stages run
at one resolution so the rows share the backbone cost (the published MLP runs train at 224).

A last line times the data loader on the generated toy set with the default --num_workers:
first batch (worker start-up included) and the mean of the following batches, against the
fastest step.  Toy images are small PNGs; real crops cost more to decode.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from benchmarks.bench_losses import fill_bank
from loader.dataloader import get_dataset
from loader.sampler import make_loader
from models import save_random_checkpoint
from stages import fine_tuning, front_door, mediator
from stages.common import Run, setup_run
from stages.segments import build_segment
from stages.trainer import Trainer
from utils.config import build_parser
from utils.distributed import DistInfo

SIZES = {
    "small": dict(backbones=("random_vit_small_8",), resolution=128, batch=4, K=512, p=256),
    "paper": dict(backbones=("random_vit_small_8", "random_vit_base_8"), resolution=320, batch=16, K=2048, p=2048),
}
STAGES: tuple[tuple[str, str | None], ...] = (
    ("mediator", None), ("front_door_mlp", "MLP"), ("front_door_tr", "TR"),
    ("fine_tuning_mlp", "MLP"), ("fine_tuning_tr", "TR"),
)
WARMUP = 1
LOADER_BATCHES = 8


def stage_args(stage: str, ckpt: Path, size: dict, device: str, tmp: Path) -> argparse.Namespace:
    """The stage's own flags at these sizes, with every output under `tmp`."""
    flags = {"dataset": "cocostuff27", "ckpt": ckpt, "train_resolution": size["resolution"],
             "batch_size": size["batch"], "num_codebook": size["K"], "projection_dim": size["p"], "device": device,
             "output_dir": tmp / "CAUSE", "log_dir": tmp / "logs", "results_dir": tmp / "results"}
    args = build_parser(stage).parse_args([x for k, v in flags.items() for x in (f"--{k}", str(v))])
    args.stage = stage
    if hasattr(args, "validate"):
        args.validate = False  # timed steps only; there is no val split here
    return args


def build_stage_trainer(run: Run) -> Trainer:
    """The stage's trainer on a random codebook (and random stage-2 heads); settings {}: nothing is saved."""
    stage, a = run.args.stage, run.args
    if stage == "mediator":
        return mediator.build_trainer(run, {})
    codebook = torch.randn(a.num_codebook, run.derived.embed_dim, device=run.device)  # (K, D)
    if stage.startswith("front_door"):
        trainer = front_door.build_trainer(run, {}, codebook)
        fill_bank(trainer.stateful["bank"], a.num_codebook, a.projection_dim, run.device)
        return trainer
    return fine_tuning.build_trainer(run, {}, build_segment(run).to(run.device), codebook)


def random_batch(run: Run) -> dict[str, torch.Tensor]:
    """Images (B, 3, R, R) and labels (B, R, R) in [-1, C) on the CPU, pinned when feeding a GPU."""
    b, r = run.args.batch_size, run.derived.train_resolution
    batch = {"img": torch.randn(b, 3, r, r), "label": torch.randint(-1, run.derived.n_classes, (b, r, r))}
    return {k: v.pin_memory() for k, v in batch.items()} if run.device.type == "cuda" else batch


def elapsed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def time_stage(run: Run, repeats: int) -> tuple[float, float]:
    """Median seconds of (backbone forward, training step), timed alternately on one batch."""
    trainer, batch = build_stage_trainer(run), random_batch(run)

    def step() -> None:
        if trainer._one_step(batch) is None:
            raise RuntimeError(f"{run.args.stage}: the step was skipped (non-finite loss); timing would be wrong")

    def backbone() -> None:
        run.features(batch["img"])

    for _ in range(WARMUP):
        backbone()
        step()
    pairs = [(elapsed(backbone, run.device), elapsed(step, run.device)) for _ in range(repeats)]
    trainer.writer.close()
    return statistics.median(b for b, _ in pairs), statistics.median(s for _, s in pairs)


def loader_times(args: argparse.Namespace, data_dir: Path) -> tuple[float, float]:
    """Seconds to the first toy batch and mean seconds per following batch, --num_workers default."""
    dataset = get_dataset("toy", data_dir, "train", args.train_resolution)
    batches = iter(make_loader(dataset, args.batch_size, args.num_workers, torch.device(args.device)))
    first = elapsed(lambda: next(batches), torch.device("cpu"))
    t0 = time.perf_counter()
    for _ in range(LOADER_BATCHES):
        next(batches)
    return first, (time.perf_counter() - t0) / LOADER_BATCHES


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine(device: str) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    line = (f"CPU {cpu_model()} ({cores} cores usable, torch threads {torch.get_num_threads()}, "
            f"load average {os.getloadavg()[0]:.2f}); torch {torch.__version__}")
    if device == "cuda":
        line += f"; GPU {torch.cuda.get_device_name()}"
    return line


def ms(t: float) -> str:
    return f"{t * 1e3:.0f} ms"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", choices=list(SIZES), default="small")
    ap.add_argument("--repeats", type=int, default=3)
    opts = ap.parse_args(argv)
    size, dist = SIZES[opts.sizes], DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device(opts.device))
    print(machine(opts.device))
    print(f"sizes={opts.sizes}: {size['resolution']} px, batch {size['batch']}, K={size['K']}, p={size['p']}, "
          f"full bank {size['K'] * 100}; median of {opts.repeats}\n")
    print("| backbone | stage | backbone fwd | step | ratio |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp, fastest = Path(tmp_name), float("inf")
        for name in size["backbones"]:
            ckpt = tmp / f"{name}.pth"
            save_random_checkpoint(name, ckpt)
            for stage, structure in STAGES:
                args = stage_args(stage, ckpt, size, opts.device, tmp)
                t_backbone, t_step = time_stage(setup_run(args, dist, structure), opts.repeats)
                fastest = min(fastest, t_step)
                print(f"| {name.removeprefix('random_')} | {stage} | {ms(t_backbone)} | {ms(t_step)} | "
                      f"{t_step / t_backbone:.2f} |", flush=True)
        first, per_batch = loader_times(args, tmp / "data")
        verdict = "keeps up" if per_batch <= fastest else "does NOT keep up"
        print(f"\ndata loading (toy set, --num_workers {args.num_workers}, batch {args.batch_size}): first batch "
              f"{ms(first)}, then {ms(per_batch)}/batch; fastest step {ms(fastest)}: {verdict}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
