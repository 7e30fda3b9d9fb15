"""Images per second of `Segmenter.predict` (without and with the CRF) against the backbone forward alone.

    python -m benchmarks.bench_predict [--backbone dino_vit_small_8] [--structure TR] [--resolution 320]
        [--batch 8] [--repeats 3] [--device cpu|cuda] [--threads N] [--no_crf]

The segmenter is loaded by `cause.load_segmenter` from a random-init backbone file of the named architecture
and random published-layout head and cluster files (K = 2048, r = 90, p = 2048, 27 classes), written to a
temporary folder. Input: a float batch (B, 3, S, S) in [0, 1] on the CPU, S = --resolution, the training
size of the TR head, so predict works at S and returns ids at S. The reference is `Run.features` (the
frozen backbone under the same AMP policy, the host-to-device copy included) on the same batch, normalised.
predict and the reference are timed alternately after a warm-up; each figure is the median of --repeats.
The 1-minute load average is printed: other processes slow CPU figures down.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torchvision.transforms.functional as TF

import cause
from loader.transforms import IMAGENET_MEAN, IMAGENET_STD
from models import save_random_checkpoint
from modules.segment import Cluster, SegmentMLP, SegmentTR

K, R, P, C = 2048, 90, 2048, 27


def write_model(folder: Path, backbone: str, structure: str, resolution: int) -> Path:
    """A random backbone file and random published-layout heads where load_segmenter looks; the backbone path."""
    ckpt = folder / f"{backbone}.pth"
    save_random_checkpoint(backbone, ckpt)
    model = cause.load_backbone(ckpt)
    dim, patch = model.embed_dim, model.patch_size
    out = folder / "CAUSE" / "cocostuff27" / backbone / str(K)
    out.mkdir(parents=True)
    segment = SegmentTR(dim, (resolution // patch) ** 2, R, P, C) if structure == "TR" else SegmentMLP(dim, R, P, C)
    torch.save(segment.state_dict(), out / f"segment_{structure.lower()}.pth")
    torch.save(Cluster(dim, R, K, C).state_dict(), out / f"cluster_{structure.lower()}.pth")
    return ckpt


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="dino_vit_small_8")
    p.add_argument("--structure", default="TR", choices=["MLP", "TR"])
    p.add_argument("--resolution", type=int, default=320)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no_crf", action="store_true", help="skip the CRF row (it is slow on CPU)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_model(Path(tmp), a.backbone, a.structure, a.resolution)
        seg = cause.load_segmenter(ckpt, "cocostuff27", structure=a.structure, output_dir=Path(tmp) / "CAUSE",
                                   device=a.device, train_resolution=a.resolution, test_resolution=a.resolution)
    device = seg.run.device
    images = torch.rand(a.batch, 3, a.resolution, a.resolution)
    normalised = TF.normalize(images, IMAGENET_MEAN, IMAGENET_STD)
    rows: dict[str, Callable[[], object]] = {
        "backbone forward (Run.features)": lambda: seg.run.features(normalised),
        "predict": lambda: seg.predict(images, batch_size=a.batch),
    }
    if not a.no_crf:
        rows["predict, crf=True"] = lambda: seg.predict(images, crf=True, batch_size=a.batch)
    for fn in rows.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(a.repeats):
        for name, fn in rows.items():
            times[name].append(timed(fn, device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{a.backbone}, CAUSE-{a.structure}, {a.resolution}x{a.resolution}, batch {a.batch}, {name}, "
          f"precision {seg.run.amp.name}, load average {os.getloadavg()[0]:.1f}")
    base = statistics.median(times["backbone forward (Run.features)"])
    print("| | images/s | time vs backbone |\n|---|---|---|")
    for row, values in times.items():
        median = statistics.median(values)
        print(f"| {row} | {a.batch / median:.2f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
