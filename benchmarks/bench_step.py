"""One training step of each stage over the frozen backbone's forward alone, same batch: one markdown table.

    python -m benchmarks.bench_step [--device cpu|cuda] [--sizes tiny|small|paper] [--repeats 3]
        [--stages front_door_tr ...] [--backbones vit_base_8 ...] [--batch B] [--threads N]

Each row builds the stage's own trainer (``stages.<stage>.build_trainer``) on a random-init
backbone with the architecture of the DINO one of the same size (all 12 blocks), and times
``Trainer._one_step``: forward under the AMP policy, backward, clipping, Adam, and for stage 2
the EMA and concept-bank update against a full bank (K x 100 entries), TensorBoard scalars
included.  The reference is ``Run.features`` (the backbone forward the step starts with, no
grad, same AMP policy) on the same batch.  Batches are random images and labels kept on the
CPU (pinned on CUDA), so both timings include the host-to-device copy.  The two are timed
alternately after a warm-up; each cell is the median over ``--repeats``.  All stages run
at one resolution so the rows share the backbone cost (the published MLP runs train at 224).

The floor of a step is what no implementation of the stage can avoid: the backbone forward,
plus for stage 2 the two products with the bank the contrastive loss needs, timed as bare
matmuls of the same shapes and dtype (anchors x keys^T forward, (anchors x keys) x keys for the
anchors' gradient; keys = the full bank and the batch's teacher tokens).  Peak memory is the
high-water mark during the first timed step: process resident set on CPU (VmHWM, reset through
/proc/self/clear_refs; it includes the backbone, heads and bank), ``max_memory_allocated`` on CUDA.
The 1-minute load average is printed on every row: other processes slow CPU rows down.

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
from loader.datasets_table import DATASETS
from loader.sampler import make_loader
from models import save_random_checkpoint
from models.spec import make_spec, parse_backbone_name
from stages import fine_tuning, front_door, mediator
from stages.common import Run, setup_run
from stages.segments import build_segment
from stages.trainer import Trainer
from utils.config import build_parser, stage_argv
from utils.distributed import DistInfo
from utils.errors import UserError

SIZES = {
    "tiny": dict(backbones=("vit_tiny_8",), resolution=32, batch=1, K=8, p=8),  # CI (gpu_check.sh --dry-run)
    "small": dict(backbones=("vit_small_8",), resolution=128, batch=4, K=512, p=256),
    "paper": dict(backbones=("vit_small_8", "vit_base_8"), resolution=320, batch=16, K=2048, p=2048),
}
STAGES: tuple[tuple[str, str | None], ...] = (
    ("mediator", None), ("front_door_mlp", "MLP"), ("front_door_tr", "TR"),
    ("fine_tuning_mlp", "MLP"), ("fine_tuning_tr", "TR"),
)
WARMUP = 1
LOADER_BATCHES = 8
BANK_CAPACITY = 100  # entries per concept of a full bank


def random_backbone(name: str, path: Path) -> None:
    """Write a random-init `vit_<size>_<patch>` with the published block count (12, 24 for large)."""
    spec = parse_backbone_name(f"random_{name}")
    save_random_checkpoint(spec.name, path, depth=make_spec("dino", spec.size, spec.patch_size).depth)


def stage_args(stage: str, ckpt: Path, size: dict, device: str, tmp: Path) -> argparse.Namespace:
    """The stage's own flags at these sizes, with every output under `tmp`."""
    flags = {"dataset": "cocostuff27", "ckpt": ckpt, "train_resolution": size["resolution"],
             "batch_size": size["batch"], "num_codebook": size["K"], "projection_dim": size["p"], "device": device,
             "output_dir": tmp / "CAUSE", "log_dir": tmp / "logs", "results_dir": tmp / "results"}
    argv = stage_argv(stage, [x for k, v in flags.items() for x in (f"--{k}", str(v))])  # those the stage takes
    args = build_parser(stage, DATASETS).parse_args(argv)
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


def bank_products(run: Run) -> Callable[[], object] | None:
    """Stage 2 only: the contrastive loss's two products with the full bank as bare matmuls.

    Anchors (R, p), R = B x n sampled tokens; keys (M + R, p): the bank and the batch's teacher."""
    if not run.args.stage.startswith("front_door"):
        return None
    a, side = run.args, run.derived.train_resolution // run.derived.patch_size
    rows = a.batch_size * ((side // 4) ** 2 if a.grid else side * side)
    anchors = torch.randn(rows, a.projection_dim, device=run.device)
    keys = torch.randn(a.num_codebook * BANK_CAPACITY + rows, a.projection_dim, device=run.device)

    def products() -> object:
        with run.amp.autocast():
            logits = anchors @ keys.T  # (R, M + R)
            return logits @ keys  # (R, p): the anchors' gradient
    return products


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS


def peak_memory(device: torch.device) -> int:
    """Bytes: CUDA max allocated, or the process's resident high-water mark, since the last reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024


def time_stage(run: Run, repeats: int) -> tuple[float, float, float, int]:
    """Median seconds of (backbone forward, floor, training step) on one batch, and the peak memory
    of the first timed step (before the floor's bare-matmul operands are allocated)."""
    trainer, batch = build_stage_trainer(run), random_batch(run)

    def step() -> None:
        if trainer._one_step(batch) is None:
            raise RuntimeError(f"{run.args.stage}: the step was skipped (non-finite loss); timing would be wrong")

    def backbone() -> None:
        run.features(batch["img"])

    for _ in range(WARMUP):
        backbone()
        step()
    reset_peak_memory(run.device)  # the first timed step, before the floor's own tensors exist
    times = [(elapsed(backbone, run.device), elapsed(step, run.device))]
    peak = peak_memory(run.device)
    products = bank_products(run)

    def floor() -> None:
        backbone()
        if products is not None:
            products()

    floors = [elapsed(floor, run.device) for _ in range(repeats)]
    times += [(elapsed(backbone, run.device), elapsed(step, run.device)) for _ in range(repeats - 1)]
    backbone_s, step_s = (statistics.median(column) for column in zip(*times))
    return backbone_s, statistics.median(floors), step_s, peak


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


def backbone_name(value: str) -> str:
    """`vit_<size>_<patch>` (a `random_` prefix is accepted), checked against the known sizes."""
    name = value.removeprefix("random_")
    try:
        parse_backbone_name(f"random_{name}")
    except UserError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected vit_<tiny|small|base|large>_<patch dividing 224>, "
                                         "e.g. vit_base_8") from None
    return name


def positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}")
    return int(value)


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the steps run (default: CUDA when present)")
    ap.add_argument("--sizes", choices=list(SIZES), default="small",
                    help="tiny: ViT-Tiny/8, 32 px, batch 1, K=p=8 (a CI check that it runs); small: 128 px, "
                         "batch 4, K=512, p=256; paper: 320 px, batch 16, K=2048, p=2048")
    ap.add_argument("--repeats", type=positive_int, default=3, help="timed steps per row (median)")
    ap.add_argument("--stages", nargs="+", choices=[s for s, _ in STAGES], default=[s for s, _ in STAGES],
                    metavar="STAGE", help=f"rows to time, in table order (default: all of {[s for s, _ in STAGES]})")
    ap.add_argument("--backbones", nargs="+", type=backbone_name, default=None, metavar="NAME",
                    help="vit_<size>_<patch> backbones to time (default per --sizes: small vit_small_8, "
                         "paper vit_small_8 vit_base_8)")
    ap.add_argument("--batch", type=positive_int, default=None,
                    help="images per step instead of the --sizes one (every cost of a step is linear in it)")
    ap.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    return ap.parse_args(argv)


def sizes_and_process(opts: argparse.Namespace) -> tuple[dict, DistInfo]:
    """The --sizes preset (with --batch) and the single process on --device; --threads applied."""
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    size = {**SIZES[opts.sizes], **({"batch": opts.batch} if opts.batch else {})}
    return size, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device(opts.device))


def main(argv: list[str] | None = None) -> None:
    opts = parse_options(argv)
    size, dist = sizes_and_process(opts)
    stages = [(s, structure) for s, structure in STAGES if s in opts.stages]
    print(machine(opts.device))
    print(f"sizes={opts.sizes}: {size['resolution']} px, batch {size['batch']}, K={size['K']}, p={size['p']}, "
          f"full bank {size['K'] * BANK_CAPACITY}; median of {opts.repeats}\n")
    print("| backbone | stage | backbone fwd | floor | step | step / backbone | step / floor | peak memory | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp, fastest = Path(tmp_name), float("inf")
        for name in opts.backbones or size["backbones"]:
            ckpt = tmp / f"random_{name}.pth"
            random_backbone(name, ckpt)
            for stage, structure in stages:
                args = stage_args(stage, ckpt, size, opts.device, tmp)
                t_backbone, t_floor, t_step, peak = time_stage(setup_run(args, dist, structure), opts.repeats)
                fastest = min(fastest, t_step)
                print(f"| {name} | {stage} | {ms(t_backbone)} | {ms(t_floor)} | {ms(t_step)} | "
                      f"{t_step / t_backbone:.2f} | {t_step / t_floor:.2f} | {peak / 2**20:.0f} MiB | "
                      f"{os.getloadavg()[0]:.1f} |", flush=True)
        first, per_batch = loader_times(args, tmp / "data")
        verdict = "keeps up" if per_batch <= fastest else "does NOT keep up"
        print(f"\ndata loading (toy set, --num_workers {args.num_workers}, batch {args.batch_size}): first batch "
              f"{ms(first)}, then {ms(per_batch)}/batch; fastest step {ms(fastest)}: {verdict}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
