"""Evaluation (test_mlp.py / test_tr.py): unsupervised mIoU/accuracy without and with CRF, linear probe.

Protocol of the published test scripts: teacher features, bilinear upsampling to label size, cluster
logits = cos(feature, cluster_probe), argmax; the CRF pass averages features with the flipped image's
and refines log_softmax(3 x logits); Hungarian matching over the histogram of the whole split.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from loader.sampler import make_loader
from modules.functional import cluster_logits
from stages.common import Run
from stages.trained import check_grid, load_trained, segment_features, upsample
from utils.class_names import class_info
from utils.crf import CRFPool
from utils.io import read_provenance, save_json
from utils.metrics import UnsupervisedMetrics
from utils.visualize import colorize, plot_class_iou, plot_confusion, save_image, save_panel, to_uint8_image

FOLDERS = ("imgs", "labels", "kmeans", "crfs", "hungarians")


@torch.no_grad()
def evaluate(run: Run) -> None:
    args = run.args
    resolution = run.derived.test_resolution
    segment, cluster = load_trained(run)
    check_grid(run, segment, resolution)
    dataset = run.dataset("val", resolution)
    n_classes = run.derived.n_classes
    info = class_info(args.dataset, n_classes if args.dataset == "directory" else None)
    out = run.paths.results
    metrics = {"unsupervised": UnsupervisedMetrics(n_classes), "unsupervised_crf": UnsupervisedMetrics(n_classes),
               "linear": UnsupervisedMetrics(n_classes, matching=False)}
    loader = make_loader(dataset, args.batch_size, args.num_workers, run.device, shuffle=False,
                         rank=run.dist.rank, world_size=run.dist.world_size, pad=False)
    saved: list[int] = []
    workers = args.crf_workers
    with CRFPool(workers) as pool:
        for batch in tqdm(loader, desc=f"[test {run.structure}] {args.dataset}", disable=not run.dist.is_main):
            img, label = batch["img"], batch["label"].to(run.device)  # (B, 3, H, W), (B, H, W)
            size = tuple(label.shape[-2:])
            feat = segment_features(run, segment, img, flip_average=False)  # (B, r, h, w)
            cluster_pred = cluster_logits(upsample(feat, size), cluster.cluster_probe).argmax(1)  # (B, H, W)
            linear_pred = upsample(segment.linear(feat).float(), size).argmax(1)
            feat_flip = segment_features(run, segment, img, flip_average=True)
            crf_input = torch.log_softmax(3 * cluster_logits(upsample(feat_flip, size), cluster.cluster_probe), 1)
            rgb = [to_uint8_image(im) for im in img]
            names = [str(dataset.image_path(int(i))) for i in batch["ind"]]
            crf_pred = torch.from_numpy(np.stack(pool.map(rgb, crf_input.cpu().numpy(), names))).to(run.device)
            if dataset.has_labels:
                metrics["unsupervised"].update(cluster_pred, label)
                metrics["unsupervised_crf"].update(crf_pred, label)
                metrics["linear"].update(linear_pred, label)
            for k, ind in enumerate(batch["ind"].tolist()):
                if args.save_images < 0 or ind < args.save_images:
                    _save_maps(out, ind, rgb[k], label[k], cluster_pred[k], crf_pred[k], linear_pred[k], info.palette)
                    saved.append(ind)
    if not dataset.has_labels:
        run.log(f"{args.data_dir} has no labels: metrics and Hungarian maps skipped; cluster and CRF maps in {out}")
        return
    for m in metrics.values():
        m.sync()
    scores = {name: m.compute() for name, m in metrics.items()}
    if run.dist.is_main:
        _report(run, scores, info, out)
    crf_metrics = metrics["unsupervised_crf"]
    for ind in saved:
        maps = np.load(out / "maps" / f"{ind}.npz")
        matched = crf_metrics.map_prediction(torch.from_numpy(maps["crf"].astype(np.int64))).numpy()
        save_image(out / "hungarians" / f"{ind}.png", colorize(matched, info.palette))
        save_panel(out / "panels" / f"{ind}.png", np.asarray(_read_rgb(out / "imgs" / f"{ind}.png")),
                   [maps["label"], maps["cluster"], maps["crf"], matched], info.palette,
                   ["image", "label", "cluster", "crf", "hungarian"])


def _save_maps(out: Path, ind: int, rgb: np.ndarray, label: torch.Tensor, cluster: torch.Tensor,
               crf: torch.Tensor, linear: torch.Tensor, palette: np.ndarray) -> None:
    """Pictures in the published folders, and the raw maps (int16) that the metrics can be recomputed from."""
    maps = {name: t.cpu().numpy().astype(np.int16) for name, t in
            (("label", label), ("cluster", cluster), ("crf", crf), ("linear", linear))}
    save_image(out / "imgs" / f"{ind}.png", rgb)
    save_image(out / "labels" / f"{ind}.png", colorize(maps["label"], palette))
    save_image(out / "kmeans" / f"{ind}.png", colorize(maps["cluster"], palette))
    save_image(out / "crfs" / f"{ind}.png", colorize(maps["crf"], palette))
    path = out / "maps" / f"{ind}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **maps)


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _report(run: Run, scores: dict[str, dict[str, Any]], info, out: Path) -> None:
    """metrics.json (every number, flags, checkpoints), per-class IoU chart, confusion picture, summary lines."""
    paths = run.paths
    report = {
        name: {"mIoU": s["mIoU"], "Acc": s["Acc"], "IoU": dict(zip(info.names, s["IoU"])),
               "assignment": s["assignment"]}
        for name, s in scores.items()
    }
    report["settings"] = {**run.shared_settings(), **run.head_settings(),
                          "test_resolution": run.derived.test_resolution}
    report["checkpoints"] = {
        "backbone": str(run.args.ckpt), "segment": str(paths.segment), "cluster": str(paths.cluster),
        "segment_provenance": read_provenance(paths.segment), "cluster_provenance": read_provenance(paths.cluster),
    }
    report["flags"] = run.flags()
    save_json(report, out / "metrics.json")
    crf = scores["unsupervised_crf"]
    plot_class_iou(out / "class_iou.png", info.names, crf["IoU"], info.is_thing)
    plot_confusion(out / "confusion.png", crf["confusion"], info.names)
    for name, s in scores.items():
        run.log(f"[{name:>16}] mIoU {s['mIoU']:.2f}  Acc {s['Acc']:.2f}")
    run.log(f"wrote {out}/metrics.json")
