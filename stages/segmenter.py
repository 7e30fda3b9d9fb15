"""A trained CAUSE model as one `nn.Module`: images in, cluster (or class) ids out at each image's size.

The one code path from images to segments: `segment_images.py`, `cause.load_segmenter` and the
`torch.hub` entries all predict through `Segmenter.predict`. Paths and PIL images are read as displayed
(`loader/own_images.py`: EXIF orientation, modes, 16-bit); a model is named by its flags or by its folder
(`stages/model_folder.py`).

Working size. MLP: the image keeps its aspect: short side resized to the test resolution, both
sides rounded to a multiple of the patch. TR: its head has one learned query per patch of its
training grid, so the image is resized to the training square (aspect not kept, as the published
Pascal VOC protocol does). Images are resized nearest-neighbour: PIL images (and paths) with PIL, as
in training; tensors with `nearest-exact` (pixel centres too, but at some scales its rounding picks
the neighbouring source row or column where PIL's does not). Prediction at the working size, as
the evaluation predicts at label size (features upsampled bilinearly, cosine to the cluster probe,
argmax; with `crf`, flip-averaged features and the dense CRF on the working image); the id map is
then resized (nearest) to the image's own size.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from loader.class_names import class_info
from loader.datasets_table import DATASETS
from loader.files import read_image
from loader.layouts import directory_has_labels
from loader.own_images import displayed_rgb
from loader.transforms import IMAGENET_MEAN, IMAGENET_STD, to_uint8_image
from stages.common import Amp, Run, setup_run
from stages.model_folder import apply_model_folder
from stages.evaluate import read_metrics
from stages.predict import predict
from stages.trained import check_report_of_trained, load_trained, segment_features
from utils.config import Bounded, build_parser
from utils.crf import CRFPool
from utils.distributed import DistInfo, parse_gpu_list, resolve_device
from utils.errors import UserError, did_you_mean
from utils.io import settings_mismatch

ImageLike = Union[Image.Image, str, os.PathLike, torch.Tensor]
Images = Union[ImageLike, Sequence[ImageLike]]


PREDICT_BATCH = 8  # images per forward pass of Segmenter.predict unless it is given one

class Segmenter(torch.nn.Module):
    """Frozen backbone + CAUSE teacher head + cluster probe, in eval mode.

    Attributes: `cluster_probe` (C, r), `class_names` (C names of the dataset's classes), `structure`,
    `patch_size`, `n_classes`, `run` (the flags and artifact paths it was loaded with); `assignment`
    (cluster -> class, -1 = unmatched) is read from the evaluation's metrics.json on first use.
    """

    def __init__(self, run: Run, segment: torch.nn.Module, cluster: torch.nn.Module) -> None:
        super().__init__()
        self.run = run
        self.backbone = run.backbone
        self.segment = segment
        self.cluster = cluster
        self.structure = run.structure
        self.patch_size = run.derived.patch_size
        self.n_classes = run.derived.n_classes
        info = class_info(run.args.dataset, self.n_classes if run.args.dataset == "directory" else None)
        self.class_names: tuple[str, ...] = info.names
        self.palette: np.ndarray = info.palette
        self._features = segment_features(run, segment)
        self._assignments: dict[bool, torch.Tensor] = {}
        self.eval()

    @classmethod
    def from_run(cls, run: Run) -> "Segmenter":
        """Load the run's trained segment head and cluster probe, with the provenance checks of the scripts."""
        segment, cluster = load_trained(run)
        return cls(run, segment, cluster)

    @property
    def cluster_probe(self) -> torch.Tensor:
        return self.cluster.cluster_probe  # (C, r)

    @property
    def assignment(self) -> torch.Tensor:
        """Cluster -> class ids (C,) long, -1 = unmatched: the Hungarian matching the evaluation recorded."""
        return self.assignment_for(crf=False)

    def assignment_for(self, crf: bool) -> torch.Tensor:
        """The assignment of the plain (crf=False) or the CRF (crf=True) evaluation."""
        if crf not in self._assignments:
            self._assignments[crf] = torch.from_numpy(load_assignment(self.run, crf))
        return self._assignments[crf]

    def train(self, mode: bool = True) -> "Segmenter":
        """Always eval: the backbone is frozen and the heads are the trained teachers (dropout off)."""
        return super().train(False)

    def _apply(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        """`.to(device)`, `.cuda()`, `.cpu()`: the run follows the weights (inputs go there, AMP policy of it)."""
        super()._apply(fn, *args, **kwargs)
        device = self.cluster.cluster_probe.device
        if device != self.run.device:
            self.run.dist = dataclasses.replace(self.run.dist, device=device)
            self.run.amp = Amp.for_device(device, self.run.args.precision)
        return self

    def working_size(self, height: int, width: int) -> tuple[int, int]:
        return working_size(self.run, height, width)

    @torch.no_grad()
    def features(self, images: Images) -> torch.Tensor:
        """Teacher head features (B, r, h, w) at the working size (h, w = working size / patch).

        All images must share one working size (TR: always; MLP: images of one size)."""
        items = _as_images(images)
        batch = list(self._batches(items, len(items)))
        if len(batch) != 1:
            raise UserError("Segmenter.features: the images have different working sizes; pass images of one "
                            "size (or one at a time)")
        return self._features(batch[0][1])

    @torch.no_grad()
    def predict(self, images: Images, crf: bool = False, matched: bool = False,
                batch_size: int | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Ids at each image's own size: a LongTensor (B, H, W) when all images have one size, else a list of
        (H, W) maps. Raw cluster ids, or with `matched` class ids (-1 = a cluster matched to no class).

        `images`: a float tensor (B, 3, H, W) or (3, H, W) with values in [0, 1], a PIL image, a path, or a
        list of them; paths and PIL images are read as displayed (`loader.own_images`). `crf`: refine with the
        dense CRF. `batch_size`: images per forward pass (default `PREDICT_BATCH`)."""
        items = _as_images(images)
        table = self.assignment_for(crf).to(self.run.device) if matched else None
        out: list[torch.Tensor | None] = [None] * len(items)
        for indices, img in self._batches(items, batch_size or PREDICT_BATCH):
            size = tuple(img.shape[-2:])
            ids = self._ids(img, size, crf)  # (b, h, w)
            if table is not None:
                ids = table[ids]
            for i, one in zip(indices, ids):
                out[i] = resize_ids(one, _size(items[i]))
        if len({tuple(m.shape) for m in out}) == 1:
            return torch.stack(out)  # type: ignore[arg-type]
        return out  # type: ignore[return-value]

    def _ids(self, img: torch.Tensor, size: tuple[int, int], crf: bool) -> torch.Tensor:
        """Cluster ids (B, h, w) of normalised images (B, 3, h, w)."""
        pred = predict(self._features, self.cluster_probe, img, size, crf=crf)
        if not crf:
            return pred.cluster
        with CRFPool(0) as pool:
            maps = pool.map([to_uint8_image(i) for i in img.cpu()], pred.crf_input.cpu().numpy())
        return torch.from_numpy(np.stack(maps)).to(pred.cluster.device)

    def _batches(self, items: list[Image.Image | torch.Tensor], batch_size: int
                 ) -> Iterator[tuple[list[int], torch.Tensor]]:
        """(indices, normalised images (b, 3, h, w) on the device), made one batch at a time, per group of
        at most `batch_size` images sharing a working size."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(self.working_size(*_size(item)), []).append(i)
        for size, indices in groups.items():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                yield chunk, torch.stack([to_working_tensor(items[i], size) for i in chunk]).to(self.run.device)


def working_size(run: Run, height: int, width: int) -> tuple[int, int]:
    """(h, w) the model sees: the TR training square, or for MLP the aspect-keeping patch-rounded size."""
    patch = run.derived.patch_size
    if run.structure == "TR":
        return run.derived.train_resolution, run.derived.train_resolution
    scale = run.derived.test_resolution / min(height, width)
    h, w = (max(patch, round(side * scale / patch) * patch) for side in (height, width))
    return h, w


def to_working_tensor(image: Image.Image | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """An RGB PIL image or a (3, H, W) tensor in [0, 1] -> (3, h, w) at `size`, nearest, ImageNet-normalised."""
    if isinstance(image, Image.Image):
        x = TF.to_tensor(TF.resize(image, list(size), interpolation=InterpolationMode.NEAREST))
    else:
        x = image.float()
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x[None], size, mode="nearest-exact")[0]
    return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


def resize_ids(ids: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(h, w) integer map -> (H, W) long, nearest neighbour (pixel centres, as PIL does)."""
    if tuple(ids.shape) == tuple(size):
        return ids.long()
    t = ids.float()[None, None]
    return F.interpolate(t, size, mode="nearest-exact")[0, 0].long()


def _size(item: Image.Image | torch.Tensor) -> tuple[int, int]:
    return (item.height, item.width) if isinstance(item, Image.Image) else tuple(item.shape[-2:])


def _as_images(images: Images) -> list[Image.Image | torch.Tensor]:
    """PIL RGB images (paths and PIL images read as displayed) and (3, H, W) float tensors in [0, 1]; UserError
    naming what does not fit."""
    if isinstance(images, torch.Tensor):
        return _check_tensor(images)
    if isinstance(images, (Image.Image, str, os.PathLike)):
        images = [images]
    if not isinstance(images, Iterable):
        raise UserError(f"images: expected a tensor (B, 3, H, W), a PIL image, a path or a list of them, "
                        f"got {type(images).__name__}")
    items: list[Image.Image | torch.Tensor] = []
    for item in images:
        if isinstance(item, Image.Image):
            items.append(displayed_rgb(item, "images: a PIL image"))
        elif isinstance(item, (str, os.PathLike)):
            items.append(read_image(Path(item), own=True))
        elif isinstance(item, torch.Tensor):
            items += _check_tensor(item)
        else:
            raise UserError(f"images: expected PIL images, paths or tensors, got a {type(item).__name__}")
    if not items:
        raise UserError("images: expected at least one image, got none")
    return items


def _check_tensor(t: torch.Tensor) -> list[torch.Tensor]:
    batch = t[None] if t.ndim == 3 else t
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise UserError(f"images: expected a tensor (B, 3, H, W) or (3, H, W), got shape {tuple(t.shape)}")
    if not batch.is_floating_point():
        raise UserError(f"images: expected a float tensor with values in [0, 1], got {t.dtype} "
                        "(divide uint8 images by 255)")
    if batch.numel() and (batch.min() < 0 or batch.max() > 1):
        raise UserError(f"images: expected values in [0, 1], got [{batch.min().item():.3g}, "
                        f"{batch.max().item():.3g}] (pass the images before normalisation)")
    return list(batch)


def load_assignment(run: Run, crf: bool) -> np.ndarray:
    """Cluster -> class table (-1 = unmatched) from the test split's metrics.json of this run."""
    path = run.paths.results / "metrics.json"
    metrics = read_metrics(path)
    test_script = f"test_{run.structure.lower()}.py"
    matched = "matched=True" if getattr(run.args, "caller", None) == "load_segmenter" else "--matched"
    if run.args.dataset == "directory" and not directory_has_labels(Path(run.args.data_dir)):
        raise UserError(f"{matched} maps clusters to classes with the assignment {test_script} finds from labels, "
                        f"and {Path(run.args.data_dir).absolute()} has no label files: drop {matched} (the "
                        f"outputs then hold cluster ids), or add labels/ to that folder and run {test_script}")
    if metrics is None:
        raise UserError(f"{matched} needs the evaluation's {path.absolute()}: run {test_script} "
                        "with the same flags first")
    diffs = settings_mismatch(metrics.get("settings", {}), {**run.shared_settings(), **run.head_settings()})
    if diffs:
        raise UserError(f"{path} was made for another model ({'; '.join(diffs)})")
    check_report_of_trained(run, metrics, path)
    name = "unsupervised_crf" if crf else "unsupervised"
    table = metrics.get(name, {}).get("assignment")
    if table is None or len(table) != run.derived.n_classes:
        raise UserError(f"{path} holds no {name} assignment of {run.derived.n_classes} clusters; "
                        f"run {test_script} again")
    return np.asarray(table, dtype=np.int64)


# segment_images.py flags that are no argument of load_segmenter, and where their job is done instead
NOT_LOADING = {"input": "pass the images to Segmenter.predict", "out": "Segmenter.predict returns the ids",
               "crf": "pass crf=True to Segmenter.predict", "matched": "pass matched=True to Segmenter.predict"}


def stage_args(stage: str, **flags: Any) -> argparse.Namespace:
    """The flags of `stage`'s script as a Namespace: its defaults, with `flags` (flag names without `--`)
    checked as the command line checks them; UserError naming an unknown flag (and the closest one) or a bad
    value."""
    parser = build_parser(stage, DATASETS)
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    args = argparse.Namespace(**{dest: a.default for dest, a in actions.items()})
    for key, value in flags.items():
        action = actions.get(key)
        if action is None:
            raise UserError(f"unknown argument {key!r}{did_you_mean(key, actions)}: expected one of "
                            f"{', '.join(sorted(set(actions) - set(NOT_LOADING)))}")
        if value is not None and action.type is not None and (isinstance(value, str) or isinstance(action.type,
                                                                                                    Bounded)):
            try:
                value = action.type(str(value))
            except (argparse.ArgumentTypeError, ValueError) as e:
                raise UserError(f"{key}={value!r}: {e}") from None
        if action.choices is not None and value not in action.choices:
            raise UserError(f"{key}={value!r}: expected one of {', '.join(map(str, action.choices))}"
                            f"{did_you_mean(str(value), action.choices)}")
        setattr(args, key, value)
    args.stage = stage
    return args


def load_segmenter(ckpt: str | os.PathLike | None = None, dataset: str | None = None, structure: str | None = None,
                   output_dir: str | os.PathLike | None = None, device: str = "auto",
                   model: str | os.PathLike | None = None, **flags: Any) -> Segmenter:
    """The trained CAUSE model in the folder `model` (every setting read from its JSONs), or the one the stages
    wrote under `output_dir` (default CAUSE) for `dataset` and backbone `ckpt` (a file, a Hugging Face model
    folder or id), as `segment_images.py` loads it. `flags`: the scripts' model flags as keyword arguments
    (`num_codebook=256`, `projection_dim=256`, `segment=..., cluster=...`, `gpu="0"`); with `model`, those given
    must agree with it. `structure`: "TR" by default, or the one `model` holds. Errors: UserError, one line
    starting with "load_segmenter: "."""
    try:
        return _load_segmenter(ckpt, dataset, structure, output_dir, device, model, flags)
    except UserError as e:
        raise UserError(f"load_segmenter: {e}") from None


def _load_segmenter(ckpt: str | os.PathLike | None, dataset: str | None, structure: str | None,
                    output_dir: str | os.PathLike | None, device: str, model: str | os.PathLike | None,
                    flags: dict[str, Any]) -> Segmenter:
    unused = next((key for key in flags if key in NOT_LOADING), None)
    if unused is not None:
        raise UserError(f"{unused!r} is no argument of load_segmenter ({NOT_LOADING[unused]})")
    if model is None and (ckpt is None or dataset is None):
        raise UserError("pass model=<the folder of a trained model>, or ckpt= and dataset=")
    named = {"ckpt": ckpt, "dataset": dataset, "structure": structure, "output_dir": output_dir}
    given = {key: str(value) if isinstance(value, os.PathLike) else value
             for key, value in {**named, **flags}.items() if value is not None}
    args = stage_args("segment_images", device=device, **given)
    args.caller = "load_segmenter"  # errors spell flags as its keyword arguments
    if model is not None:
        args.model = str(model)
        apply_model_folder(args, set(given), "load_segmenter")
    gpus = parse_gpu_list(args.gpu)
    kind = resolve_device(args.device, args.gpu)
    dist = DistInfo(rank=0, world_size=1, local_rank=0,
                    device=torch.device(kind, gpus[0] if gpus else 0) if kind == "cuda" else torch.device("cpu"))
    return Segmenter.from_run(setup_run(args, dist, args.structure))
