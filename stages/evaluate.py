"""Evaluation (test_mlp.py / test_tr.py), and the split evaluation the k-means baseline shares.

Protocol of the published test scripts (see stages/predict.py): the no-CRF pass scores the argmax
of cos(upsampled teacher feature, cluster probe); the CRF pass averages the features with the
flipped image's and refines log_softmax(3 x logits); clusters are matched to classes by the
Hungarian method over the histogram of the whole split; the linear probe is scored unmatched.

Outputs under the results folder, per image `<i>` (its index in the split): the published
`imgs/imgs_<i>.png`, `labels/labels_<i>.png`, `kmeans/kmeans_<i>.png` (no-CRF prediction),
`crfs/crfs_<i>.png`, `hungarians/hungarians_<i>.png` (CRF prediction mapped to classes), plus
`panels/panels_<i>.png` (all side by side, with a legend of the colours shown; no label column
for an image without label) and `maps/maps_<i>.npz` (the raw int16 maps the metrics can be
recomputed from); for the split: index.csv (`<i>` -> the image and label files it was made
from), legend.png (class colour -> name), metrics.json, class_iou.png, confusion.png, and model.json
(what the outputs were made from: the folder holds one model's outputs, stages/results.py).
Labels and Hungarian maps use the class colours; the raw cluster ids of kmeans/ and crfs/ use
cluster colours (`utils.visualize.cluster_palette`), none of which is a class colour.
The published code colours each batch's Hungarian maps with the matching of the images seen so
far; here every map uses the matching of the whole split, the one the metrics report.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from loader.class_names import ClassInfo, class_info
from loader.sampler import make_loader
from loader.transforms import denormalize, to_uint8_image
from stages.artifacts import record_differences
from stages.common import Run
from stages.feature_cache import head_cache_record
from stages.predict import FeatureFn, predict
from stages.results import claim_results
from stages.trained import check_grid, load_trained, segment_features, trained_paths
from utils.crf import CRFPool, default_workers
from utils.config import dataset_folder, setting_folder
from utils.io import atomic_write, code_version, file_record, read_provenance, save_json
from utils.metrics import UnsupervisedMetrics
from utils.visualize import (cluster_palette, colorize, panel_columns, plot_class_iou, plot_confusion, save_image,
                             save_legend, save_panel)

SCORES = ("unsupervised", "unsupervised_crf", "linear")


@dataclass
class Method:
    """What a split evaluation scores: features + probe (+ linear probe), where it writes, what it records."""
    title: str                        # progress bar and log prefix
    features: FeatureFn               # images (B, 3, H, W) -> features (B, r, h, w)
    probe: torch.Tensor               # (C, r) cluster centres compared by cosine
    linear: torch.nn.Module | None    # (B, r, h, w) -> (B, C, h, w) linear probe, if any
    out: Path                         # results folder
    record: dict[str, Any]            # settings and checkpoints written into metrics.json


def output_path(out: Path, folder: str, ind: int, suffix: str = ".png") -> Path:
    """`out/<folder>/<folder>_<ind><suffix>`, the published naming."""
    return Path(out) / folder / f"{folder}_{ind}{suffix}"


def kmeans_results_dir(run: Run) -> Path:
    """results/<dataset>/KMEANS/<ckpt name>/<C>: the k-means baseline of this backbone."""
    return Path(run.args.results_dir) / dataset_folder(run.args) / "KMEANS" / run.derived.backbone_name / \
        setting_folder(run.derived.n_classes, run.args)


@torch.no_grad()
def evaluate(run: Run) -> None:
    """test_{mlp,tr}.py: evaluate the trained head and cluster probe on the val split."""
    segment, cluster = load_trained(run)
    check_grid(run, segment, run.derived.test_resolution)
    segment_path, cluster_path = trained_paths(run)
    segment_record, cluster_record = read_provenance(segment_path), read_provenance(cluster_path)
    record = {
        "settings": {**run.shared_settings(), **run.head_settings(), "test_resolution": run.derived.test_resolution,
                     "precision": run.args.precision},
        "upstream": {"backbone": file_record(run.backbone_file), "segment": file_record(segment_path),
                     "cluster": file_record(cluster_path)},
        "checkpoints": {"backbone": str(run.args.ckpt), "segment": str(segment_path), "cluster": str(cluster_path),
                        "segment_provenance": segment_record, "cluster_provenance": cluster_record},
        "feature_cache": head_cache_record(cluster_record, segment_record),
    }
    method = Method(f"test {run.structure}", segment_features(run, segment), cluster.cluster_probe,
                    segment.linear, run.paths.results, record)
    scores = evaluate_split(run, method)
    if scores is not None:
        _compare_with_baseline(run, scores)


@torch.no_grad()
def evaluate_split(run: Run, method: Method) -> dict[str, dict[str, Any]] | None:
    """Score `method` on the val split, write its pictures and report; the scores (None if unlabeled).

    Every rank scores its shard; histograms are summed over ranks and rank 0 writes the report."""
    args = run.args
    dataset = run.dataset("val", run.derived.test_resolution)
    n_classes = run.derived.n_classes
    info = class_info(args.dataset, n_classes if args.dataset == "directory" else None)
    names = SCORES if method.linear is not None else SCORES[:2]
    metrics = {name: UnsupervisedMetrics(n_classes, matching=name != "linear") for name in names}
    loader = make_loader(dataset, args.batch_size, args.num_workers, run.device, shuffle=False,
                         rank=run.dist.rank, world_size=run.dist.world_size, pad=False)
    saved: list[int] = []
    claim_results(run, method.out, method.record)
    if run.dist.is_main:
        save_index(method.out / "index.csv", dataset)
        save_legend(method.out / "legend.png", info.names, info.palette)
    with CRFPool(_crf_workers(run)) as pool:
        for batch in tqdm(loader, desc=f"[{method.title}] {args.dataset}", disable=not run.dist.is_main):
            img, label = batch["img"], batch["label"].to(run.device)  # (B, 3, H, W), (B, H, W)
            pred = predict(method.features, method.probe, img, tuple(label.shape[-2:]), crf=True,
                           linear=method.linear)
            crf_images = [to_uint8_image(im) for im in img]
            files = [str(dataset.image_path(int(i))) for i in batch["ind"]]
            crf = torch.from_numpy(np.stack(pool.map(crf_images, pred.crf_input.cpu().numpy(), files)))
            crf = crf.to(run.device)  # (B, H, W)
            predictions = {"unsupervised": pred.cluster, "unsupervised_crf": crf, "linear": pred.linear}
            if dataset.has_labels:
                for name, m in metrics.items():
                    m.update(predictions[name], label)
            for k, ind in enumerate(batch["ind"].tolist()):
                if args.save_images < 0 or ind < args.save_images:
                    maps = {"label": label[k], "cluster": pred.cluster[k], "crf": crf[k]}
                    if pred.linear is not None:
                        maps["linear"] = pred.linear[k]
                    _save_maps(method.out, ind, denormalize(img[k]), maps, info, dataset.has_labels, n_classes)
                    saved.append(ind)
    if not dataset.has_labels:
        run.log(f"{args.data_dir} has no labels: metrics and Hungarian maps skipped; "
                f"cluster and CRF maps written to {method.out}")
        return None
    for m in metrics.values():
        m.sync()
    scores = {name: m.compute() for name, m in metrics.items()}
    if run.dist.is_main:
        _report(run, method, scores, info, len(dataset), dataset.files.labelled)
    _save_matched(method.out, saved, metrics["unsupervised_crf"], info, n_classes)
    return scores


def save_index(path: Path, dataset) -> None:
    """CSV `index,image,label`: which files each numbered output was made from (absolute paths;
    label empty for an unlabelled image)."""
    labels = dataset.files.labels

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            rows = csv.writer(f)
            rows.writerow(["index", "image", "label"])
            for i in range(len(dataset)):
                label = labels[i] if labels is not None else None
                label_text = "" if label is None else Path(label).absolute()
                rows.writerow([i, Path(dataset.image_path(i)).absolute(), label_text])
    atomic_write(path, write)


def _crf_workers(run: Run) -> int:
    """--crf_workers, or the cores shared out among the ranks of this machine."""
    if run.args.crf_workers is not None:
        return run.args.crf_workers
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", run.dist.world_size))
    return max(1, default_workers() // max(1, local_ranks))


def _save_maps(out: Path, ind: int, rgb: np.ndarray, maps: dict[str, torch.Tensor], info: ClassInfo,
               labelled: bool, n_clusters: int) -> None:
    """The image, its coloured maps, and the raw maps (int16) that the metrics can be recomputed from."""
    arrays = {name: t.cpu().numpy().astype(np.int16) for name, t in maps.items()}
    clusters = cluster_palette(n_clusters, info.palette)
    save_image(output_path(out, "imgs", ind), rgb)
    if labelled and (arrays["label"] >= 0).any():  # no all-magenta picture for an image without label
        save_image(output_path(out, "labels", ind), colorize(arrays["label"], info.palette))
    save_image(output_path(out, "kmeans", ind), colorize(arrays["cluster"], clusters))
    save_image(output_path(out, "crfs", ind), colorize(arrays["crf"], clusters))
    path = output_path(out, "maps", ind, ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    if not labelled:
        save_panel(output_path(out, "panels", ind), rgb,
                   panel_columns(None, arrays["cluster"], arrays["crf"], None, info.names, info.palette, clusters))


def _save_matched(out: Path, saved: list[int], crf_metrics: UnsupervisedMetrics, info: ClassInfo,
                  n_clusters: int) -> None:
    """Hungarian-matched CRF maps and the side-by-side panels of the saved images."""
    clusters = cluster_palette(n_clusters, info.palette)
    for ind in saved:
        maps = np.load(output_path(out, "maps", ind, ".npz"))
        matched = crf_metrics.map_prediction(torch.from_numpy(maps["crf"].astype(np.int64))).numpy()
        save_image(output_path(out, "hungarians", ind), colorize(matched, info.palette))
        rgb = np.asarray(_read_rgb(output_path(out, "imgs", ind)))
        save_panel(output_path(out, "panels", ind), rgb, panel_columns(
            maps["label"], maps["cluster"], maps["crf"], matched, info.names, info.palette, clusters))


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def read_metrics(path: Path) -> dict[str, Any] | None:
    """A metrics.json written by an evaluation, or None when there is none (or it is unreadable)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _finite(values: list[float]) -> list[float | None]:
    """NaN (class absent from labels and predictions) -> None, so metrics.json is standard JSON."""
    return [None if math.isnan(v) else v for v in values]


def _report(run: Run, method: Method, scores: dict[str, dict[str, Any]], info: ClassInfo, n_images: int,
            n_labelled: int) -> None:
    """metrics.json (every number, the flags and checkpoints), per-class IoU chart, confusion picture."""
    out = method.out
    report: dict[str, Any] = {
        name: {"mIoU": s["mIoU"], "Acc": s["Acc"], "IoU": _finite(s["IoU"]), "assignment": s["assignment"],
               "histogram": s["histogram"].tolist()}
        for name, s in scores.items()
    }
    report.update(method.record)
    report.update(run.data_record())
    report.update({"classes": list(info.names), "images": n_images, "labelled_images": n_labelled,
                   "flags": run.flags(), "code_version": code_version()})
    save_json(report, out / "metrics.json")
    crf = scores["unsupervised_crf"]
    plot_class_iou(out / "class_iou.png", info.names, crf["IoU"], info.is_thing)
    plot_confusion(out / "confusion.png", crf["confusion"], info.names)
    for name, s in scores.items():
        run.log(f"[{method.title}] {name:>16}: mIoU {s['mIoU']:.2f}  Acc {s['Acc']:.2f}")
    run.note_same_folder_val()
    run.log(f"wrote {out}/metrics.json")


def _compare_with_baseline(run: Run, scores: dict[str, dict[str, Any]]) -> None:
    """One line setting CAUSE against its backbone's k-means baseline, when test_kmeans.py has run on the
    same data (folder and fingerprint) from the same backbone file at this test resolution."""
    path = kmeans_results_dir(run) / "metrics.json"
    baseline = read_metrics(path)
    if baseline is None:
        run.log("no k-means baseline of this backbone yet (run test_kmeans.py with the same data and backbone "
                "flags to compare)")
        return
    current = {k: v for k, v in run.shared_settings().items() if k != "num_codebook"}
    current["test_resolution"] = run.derived.test_resolution
    recorded = {"settings": {k: v for k, v in baseline.get("settings", {}).items() if k in current},
                "upstream": baseline.get("upstream", {})}
    diffs = record_differences(recorded, current, {"backbone": file_record(run.backbone_file)})
    if diffs:
        run.log(f"the k-means baseline {path} was made otherwise ({'; '.join(diffs)}): not compared "
                f"(run test_kmeans.py with this run's flags and --overwrite)")
        return
    cause, kmeans = scores["unsupervised_crf"], baseline["unsupervised_crf"]
    run.log(f"with CRF: CAUSE mIoU {cause['mIoU']:.2f} Acc {cause['Acc']:.2f} | k-means on the backbone "
            f"mIoU {kmeans['mIoU']:.2f} Acc {kmeans['Acc']:.2f}")
