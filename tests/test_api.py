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
from tests.test_inference import save_random_mlp
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


def phone_photo(source: Path, path: Path) -> Path:
    """A toy scene stored 240x120 as a JPEG whose EXIF says "turn 90 degrees clockwise to display" (orientation 6,
    as phones write it): every viewer shows it 120x240."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(source).convert("RGB").resize((240, 120)).save(path, exif=exif)
    return path


@pytest.mark.slow
def test_a_model_folder_segments_photos_as_displayed_with_nothing_repeated(trained, toy_root, tmp_path, capsys):
    """The folder of the trained model, copied under a name of its own: segment_images.py --model and
    load_segmenter(model=) give the ids of the model named by its flags. A phone photo comes out at its displayed
    size, as its upright copy does; a 16-bit (x257) copy of a gray image gets the ids of the 8-bit one."""
    folder = tmp_path / "my model"
    shutil.copytree(artifact_dir(trained), folder)
    photos = tmp_path / "photos"
    photos.mkdir()
    source = sorted((toy_root / "data" / "toy" / "images" / "val").glob("*.png"))
    phone = phone_photo(source[0], photos / "phone.jpg")
    with Image.open(phone) as im:
        upright = Image.fromarray(np.rot90(np.asarray(im.convert("RGB")), -1).copy())  # no EXIF: as displayed
    gray = np.asarray(Image.open(source[1]).convert("L").resize((70, 50)))
    Image.fromarray(gray).save(photos / "gray8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(photos / "gray16.png")

    segment_images(["--model", str(folder), "--input", str(photos), "--out", str(tmp_path / "o"), "--device", "cpu"])
    written = {p.stem: labels(tmp_path / "o" / f"{p.stem}_labels.png") for p in photos.iterdir()}
    assert written["phone"].shape == (240, 120)
    np.testing.assert_array_equal(written["gray16"], written["gray8"])

    by_flags = cause.load_segmenter(**hub_kwargs(toy_root, trained))
    by_folder = cause.load_segmenter(model=folder, device="cpu")
    for model in (by_flags, by_folder):
        np.testing.assert_array_equal(model.predict(upright)[0].numpy(), written["phone"])
        np.testing.assert_array_equal(model.predict(phone)[0].numpy(), written["phone"])
        with Image.open(phone) as im:  # a PIL image with its EXIF orientation
            np.testing.assert_array_equal(model.predict(im)[0].numpy(), written["phone"])

    for kwargs, words in (({"num_codebook": 7}, "load_segmenter: num_codebook=7 disagrees with the model in "
                                                f"{folder}, trained with num_codebook={K}"),
                          ({"crf": True}, "load_segmenter: 'crf' is no argument of load_segmenter (pass crf=True "
                                          "to Segmenter.predict)"),
                          ({"matched": True}, "'matched' is no argument"), ({"out": "o"}, "'out' is no argument")):
        with pytest.raises(UserError) as e:
            cause.load_segmenter(model=folder, device="cpu", **kwargs)
        assert words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as stop:
        segment_images(["--model", str(folder), "--input", str(photos), "--out", str(tmp_path / "x"),
                        "--projection_dim", "2048"])
    assert stop.value.code == 2 and not (tmp_path / "x").exists()
    assert f"error: --projection_dim 2048 disagrees with the model in {folder}, trained with --projection_dim {P}" \
        in capsys.readouterr().err


@pytest.mark.slow
def test_a_missing_head_names_the_trained_one_and_the_flags_that_reach_it(trained, toy_root):
    kwargs = {k: v for k, v in hub_kwargs(toy_root, trained).items() if k not in ("num_codebook", "projection_dim")}
    with pytest.raises(UserError) as e:
        cause.load_segmenter(**kwargs)
    message = str(e.value)
    assert message.startswith("load_segmenter: segment head not found: ") and "/2048/segment_tr.pth" in message
    assert f"exists under other settings in {artifact_dir(trained)} (num_codebook={K} projection_dim={P}): " \
           f"pass model='{artifact_dir(trained)}', or those arguments" in message


@pytest.mark.slow
@pytest.mark.parametrize("structure,crf", [("MLP", False), ("MLP", True), ("TR", True)])
def test_predict_equals_segment_images_for_mlp_and_with_the_crf(structure, crf, trained, toy_root, photos, tmp_path):
    """One code path: MLP (the image's own aspect) and the CRF, pixel for pixel, as for TR without it above. A
    list of maps for images of two sizes, a stacked tensor for images of one size."""
    out = trained
    if structure == "MLP":
        out = tmp_path
        save_random_mlp(out)  # published layout: the flags name it
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in photos))
    segment_images(for_stage("segment_images", flags(toy_root, out)) + [
        "--structure", structure, "--crf", str(crf), "--input", str(listing), "--out", str(tmp_path / "o")])
    written = [labels(tmp_path / "o" / f"{p.stem}_labels.png") for p in photos]
    model = cause.load_segmenter(structure=structure, **hub_kwargs(toy_root, out))
    ids = model.predict(photos, crf=crf)
    assert isinstance(ids, list) and [m.shape for m in ids] == [(97, 211), (50, 50)]
    for got, expected in zip(ids, written):
        np.testing.assert_array_equal(got.numpy(), expected)
    if not crf:  # the return type does not depend on the CRF
        same_size = model.predict([photos[1], photos[1]])
        assert isinstance(same_size, torch.Tensor) and same_size.shape == (2, 50, 50)
        np.testing.assert_array_equal(same_size[1].numpy(), written[1])
