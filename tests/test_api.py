"""The Python API (cause.load_segmenter, torch.hub's cause_tr): the same ids as segment_images.py, pixel for
pixel; tensors, PIL images and paths; attributes; provenance and bad input as one line."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import cause
from loader.toy import TOY_CLASSES
from stages.inference import main as segment_images
from tests.conftest import for_stage
from stages.predict import cluster_ids, upsampled_logits
from tests.toy_fixtures import C, CKPT, K, P, R, RES, artifact_dir, flags, train_toy
from utils.errors import UserError
from utils.io import file_record

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(toy_root: Path) -> Path:
    return train_toy(toy_root)


@pytest.fixture(scope="module")
def photos(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two toy scenes at other sizes than the model's, one of them not square."""
    folder = tmp_path_factory.mktemp("api_photos")
    sources = sorted((toy_root / "data" / "toy" / "images" / "val").glob("*.png"))
    paths = [folder / "wide.png", folder / "small.png"]
    Image.open(sources[0]).convert("RGB").resize((211, 97)).save(paths[0])
    Image.open(sources[1]).convert("RGB").resize((50, 50)).save(paths[1])
    return paths


def hub_kwargs(toy_root: Path, out: Path) -> dict:
    return {"dataset": "toy", "ckpt": str(toy_root / f"{CKPT}.pth"), "output_dir": str(out / "CAUSE"),
            "results_dir": str(out / "results"), "num_codebook": K, "projection_dim": P,
            "train_resolution": RES, "test_resolution": RES, "device": "cpu"}


def labels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im).astype(np.int64)


@pytest.mark.slow
def test_hub_predict_equals_segment_images_pixel_for_pixel(trained, toy_root, photos, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in photos))
    segment_images(for_stage("segment_images", flags(toy_root, trained))
                   + ["--input", str(listing), "--out", str(tmp_path / "o")])
    model = torch.hub.load(str(ROOT), "cause_tr", source="local", **hub_kwargs(toy_root, trained))
    assert isinstance(model, torch.nn.Module) and not model.training
    written = [labels(tmp_path / "o" / f"{p.stem}_labels.png") for p in photos]

    by_path = model.predict(photos)  # two sizes: one (H, W) map each
    assert [m.shape for m in by_path] == [(97, 211), (50, 50)] and by_path[0].dtype == torch.long
    for ids, expected in zip(by_path, written):
        np.testing.assert_array_equal(ids.numpy(), expected)
    image = Image.open(photos[0]).convert("RGB")
    np.testing.assert_array_equal(model.predict(image)[0].numpy(), written[0])
    batch = torch.stack([TF.to_tensor(image)] * 2)  # (2, 3, 97, 211) in [0, 1]
    ids = model.predict(batch)
    assert ids.shape == (2, 97, 211)
    np.testing.assert_array_equal(ids[1].numpy(), written[0])

    assert model.features(batch).shape == (2, R, RES // 8, RES // 8)
    assert model.cluster_probe.shape == (C, R) and model.class_names == tuple(TOY_CLASSES)

    # matched ids follow the evaluation's assignment (a made-up permutation of the clusters)
    settings = json.loads((artifact_dir(trained) / "cluster_tr.json").read_text())["settings"]
    made_from = {name: file_record(artifact_dir(trained) / f"{name}_tr.pth") for name in ("segment", "cluster")}
    assignment = np.array([3, 0, 1, 2])
    report = tmp_path / "results" / "toy" / "TR" / CKPT / str(K) / "metrics.json"
    report.parent.mkdir(parents=True)
    report.write_text(json.dumps({"settings": settings, "upstream": made_from,
                                  "unsupervised": {"assignment": assignment.tolist()}}))
    matched = cause.load_segmenter(**{**hub_kwargs(toy_root, trained), "results_dir": str(tmp_path / "results")})
    assert matched.assignment.tolist() == assignment.tolist()
    np.testing.assert_array_equal(matched.predict(image, matched=True)[0].numpy(), assignment[written[0]])


@pytest.mark.slow
def test_a_stale_head_and_bad_input_are_one_line(trained, toy_root, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(trained / "CAUSE", out / "CAUSE")
    kwargs = hub_kwargs(toy_root, out)
    model = cause.load_segmenter(**kwargs)
    for images, words in ((torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "float tensor"),
                          (torch.full((3, 8, 8), 2.0), "values in [0, 1]"),
                          (torch.zeros(2, 8, 8), "(B, 3, H, W)"),
                          ([tmp_path / "none.png"], "none.png"),
                          ([], "at least one image")):
        with pytest.raises(UserError, match=re.escape(words)) as e:
            model.predict(images)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="load_segmenter: unknown argument 'num_codebooks' .did you mean 'num_codebook'"):
        cause.load_segmenter(**{**kwargs, "num_codebooks": 3})
    with pytest.raises(UserError, match="projection_dim"):  # the head was trained with another width
        cause.load_segmenter(**{**kwargs, "projection_dim": P * 2})

    segment = artifact_dir(out) / "segment_tr.pth"
    state = torch.load(segment)
    state["linear.f.bias"] = state["linear.f.bias"] + 1  # the head changed after the probe was fine-tuned from it
    torch.save(state, segment)
    with pytest.raises(UserError) as e:
        cause.load_segmenter(**kwargs)
    assert "segment_tr" in str(e.value) and "\n" not in str(e.value)


def test_cluster_ids_are_the_argmax_of_the_upsampled_cosine():
    """predict's arg-max from low-resolution logits equals the arg-max of cos(upsampled features, probe)."""
    torch.manual_seed(0)
    feat, probe = torch.randn(2, R, 6, 5), torch.randn(C, R) * torch.rand(C, 1) * 3  # rows of unequal norms
    expected = upsampled_logits(feat, probe, (37, 29)).argmax(1)
    assert torch.equal(cluster_ids(feat, probe, (37, 29)), expected)
