"""Datasets: official layouts built in tmp_path, label maps, transforms, toy set, user folders, errors."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loader import toy
from loader.dataloader import IMAGENET_MEAN, IMAGENET_STD, denormalize, get_dataset
from loader.datasets_table import DATASETS
from loader.layouts import LAYOUTS
from utils.errors import UserError


# ---------------------------------------------------------------- tree builders (shared with crop tests)

def save_image(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb.astype(np.uint8)).save(path)


def save_label(path: Path, ids: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(ids.astype(np.uint8), mode="L")
    if palette:  # Pascal VOC masks are palette PNGs
        im = im.convert("P")
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
        im.putdata(ids.astype(np.uint8).ravel().tolist())
    im.save(path)


def quadrants(h: int, w: int) -> np.ndarray:
    """RGB image with four flat quadrants (survives JPEG well): (H, W, 3)."""
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (200, 30, 30)
    img[: h // 2, w // 2:] = (30, 200, 30)
    img[h // 2:, : w // 2] = (30, 30, 200)
    img[h // 2:, w // 2:] = (220, 220, 220)
    return img


def make_coco(data_dir: Path, labels: dict[str, dict[str, np.ndarray]],
              lists: dict[str, dict[str, list[str]]]) -> Path:
    """data_dir/cocostuff with images/annotations per year and curated list files."""
    root = data_dir / "cocostuff"
    for year, by_id in labels.items():
        for i, lab in by_id.items():
            save_image(root / "images" / year / f"{i}.jpg", quadrants(*lab.shape))
            save_label(root / "annotations" / year / f"{i}.png", lab)
    for year, named in lists.items():
        for list_name, ids in named.items():
            (root / "curated" / year).mkdir(parents=True, exist_ok=True)
            (root / "curated" / year / list_name).write_text("".join(f"{i}\n" for i in ids))
    return root


def make_cityscapes(data_dir: Path, split: str, items: dict[tuple[str, str], np.ndarray]) -> Path:
    root = data_dir / "cityscapes"
    for (city, name), lab in items.items():
        save_image(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", quadrants(*lab.shape))
        save_label(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png", lab)
    return root


def make_pascal(data_dir: Path, split: str, items: dict[str, np.ndarray]) -> Path:
    voc = data_dir / "pascalvoc" / "VOCdevkit" / "VOC2012"
    for i, lab in items.items():
        save_image(voc / "JPEGImages" / f"{i}.jpg", quadrants(*lab.shape))
        save_label(voc / "SegmentationClass" / f"{i}.png", lab, palette=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in items))
    return voc


def probe_label(values: list[int], side: int = 8) -> np.ndarray:
    """Square label whose row r holds values[r] (rows beyond the list repeat the last value)."""
    rows = [values[min(r, len(values) - 1)] for r in range(side)]
    return np.repeat(np.array(rows, np.uint8)[:, None], side, axis=1)


def label_rows(ds, i: int = 0) -> list[int]:
    """Class of each label row (asserting each row is constant)."""
    label = ds[i]["label"]
    assert (label == label[:, :1]).all()
    return label[:, 0].tolist()


# ---------------------------------------------------------------- label maps, end to end

COCO_PROBES = [0, 1, 12, 89, 90, 91, 119, 181]  # + 255 in the last row


@pytest.mark.parametrize("name, expected", [
    # published CAUSE / STEGO tables: fine id -> class, 255 -> -1
    ("cocostuff27", [9, 11, 8, 4, 4, 17, 26, 24]),
    ("coco81", [1, 2, 12, 80, -1, 0, 0, 0]),       # fine 90 is an unused thing slot
    ("coco171", [0, 1, 11, 79, -1, 80, 108, 170]),
])
def test_coco_label_maps(tmp_path, name, expected):
    lab = probe_label(COCO_PROBES + [255], side=9)
    make_coco(tmp_path, {"val2017": {"a": lab}},
              {"val2017": {"Coco164kFull_Stuff_Coarse.txt": ["a"], "Coco164kFull_Stuff_Coarse_7.txt": ["a"]}})
    ds = get_dataset(name, tmp_path, "val", 9)
    assert ds.n_classes == DATASETS[name].n_classes
    assert label_rows(ds) == expected + [-1]


def test_cityscapes_label_map_and_order(tmp_path):
    lab = probe_label([0, 6, 7, 8, 26, 33, 34, 255])
    make_cityscapes(tmp_path, "val", {("zurich", "zurich_000001"): lab, ("aachen", "aachen_000009"): lab,
                                      ("aachen", "aachen_000002"): lab})
    ds = get_dataset("cityscapes", tmp_path, "val", 8)
    assert label_rows(ds) == [-1, -1, 0, 1, 19, 26, -1, -1]
    assert [ds.image_path(i).name for i in range(len(ds))] == [
        "aachen_000002_leftImg8bit.png", "aachen_000009_leftImg8bit.png", "zurich_000001_leftImg8bit.png"]


def test_pascal_label_map_reads_palette_indices(tmp_path):
    make_pascal(tmp_path, "train", {"2007_000032": probe_label([0, 1, 15, 20, 21, 255])})
    ds = get_dataset("pascalvoc", tmp_path, "train", 8)
    assert ds.n_classes == 21
    assert label_rows(ds) == [0, 1, 15, 20, -1, -1, -1, -1]


# ---------------------------------------------------------------- layouts and lists

def test_coco_lists_per_split(tmp_path):
    lab = probe_label([0])
    make_coco(tmp_path, {"train2017": {"t1": lab, "t2": lab, "t3": lab}, "val2017": {"v1": lab, "v2": lab}},
              {"train2017": {"Coco164kFull_Stuff_Coarse.txt": ["t1", "t3"],
                             "Coco164kFull_Stuff_Coarse_7.txt": ["t2"]},
               "val2017": {"Coco164kFull_Stuff_Coarse.txt": ["v1", "v2"],
                           "Coco164kFull_Stuff_Coarse_7.txt": ["v2"]}})
    names = lambda ds: [ds.image_path(i).name for i in range(len(ds))]  # noqa: E731
    assert names(get_dataset("cocostuff27", tmp_path, "train", 8)) == ["t1.jpg", "t3.jpg"]
    assert names(get_dataset("cocostuff27", tmp_path, "val", 8)) == ["v2.jpg"]      # curated 7-subset
    assert names(get_dataset("coco81", tmp_path, "val", 8)) == ["v1.jpg", "v2.jpg"]  # full curated list
    assert names(get_dataset("coco171", tmp_path, "train", 8)) == ["t1.jpg", "t3.jpg"]
    assert get_dataset("coco171", tmp_path, "train", 8).image_path(1) == \
        tmp_path / "cocostuff" / "images" / "train2017" / "t3.jpg"


def test_every_table_dataset_has_a_layout():
    assert set(LAYOUTS) == set(DATASETS)


# ---------------------------------------------------------------- transforms

def test_constant_image_is_normalised_and_resized(tmp_path):
    rgb = (124, 116, 104)
    img = np.zeros((30, 50, 3), np.uint8) + np.array(rgb, np.uint8)
    save_image(tmp_path / "images" / "a.png", img)
    ds = get_dataset("directory", tmp_path, "val", 16, n_classes=3)
    item = ds[0]
    assert item["ind"] == 0 and item["img"].shape == (3, 16, 16) and item["img"].dtype == torch.float32
    assert item["label"].shape == (16, 16) and item["label"].dtype == torch.long
    for c in range(3):
        want = (rgb[c] / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(item["img"][c], torch.full((16, 16), want), atol=1e-5)
    assert (denormalize(item["img"]) == np.array(rgb, np.uint8)).all()


def test_denormalize_round_trips_every_level():
    levels = torch.arange(256, dtype=torch.float32).view(1, 16, 16).expand(3, 16, 16) / 255
    norm = (levels - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = denormalize(norm)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert (out[..., 1] == np.arange(256).reshape(16, 16)).all()


def test_pascal_squashes_while_others_center_crop(tmp_path):
    lab = np.full((6, 12), 2, np.uint8)
    lab[:, :4] = 1  # left third class 1, the rest class 2
    make_pascal(tmp_path, "val", {"p": lab})
    (tmp_path / "dir" / "images").mkdir(parents=True)
    save_image(tmp_path / "dir" / "images" / "p.png", quadrants(6, 12))
    save_label(tmp_path / "dir" / "labels" / "p.png", lab)
    squashed = get_dataset("pascalvoc", tmp_path, "val", 6)[0]["label"]
    cropped = get_dataset("directory", tmp_path / "dir", "val", 6, n_classes=3)[0]["label"]
    assert squashed[0].tolist() == [1, 1, 2, 2, 2, 2]   # resize 12x6 -> 6x6, nearest
    assert cropped[0].tolist() == [1, 2, 2, 2, 2, 2]    # short side already 6, center columns 3..8
    assert (squashed == squashed[:1]).all() and (cropped == cropped[:1]).all()


def test_short_side_resize_then_center_crop(tmp_path):
    img = np.zeros((40, 20, 3), np.uint8)  # tall: rows 0..9 red, 10..29 green, 30..39 blue
    img[:10, :, 0] = 255
    img[10:30, :, 1] = 255
    img[30:, :, 2] = 255
    save_image(tmp_path / "a.png", img)
    out = denormalize(get_dataset("directory", tmp_path, "val", 10)[0]["img"])  # 20x40 -> 10x20 -> crop 10x10
    assert out.shape == (10, 10, 3)
    assert (out[:, :, 1] == 255).all() and (out[:, :, 0] == 0).all()  # only the green middle survives


# ---------------------------------------------------------------- user folders

def test_directory_with_labels(tmp_path):
    for rel in ("b/two.jpg", "a/one.png"):
        save_image(tmp_path / "images" / rel, quadrants(8, 8))
        save_label((tmp_path / "labels" / rel).with_suffix(".png"), probe_label([0, 2, 3, 255]))
    ds = get_dataset("directory", tmp_path, "train", 8)
    assert ds.has_labels and ds.n_classes == 4 and len(ds) == 2  # the largest id 3 + 1; 255 is not a class
    assert "classes: 4 (ids 0..3 found in the labels; 255 = ignore); pass --n_classes to set more" in ds.files.notes
    assert ds.image_path(0) == tmp_path / "images" / "a" / "one.png"
    assert label_rows(ds, 1) == [0, 2, 3, -1, -1, -1, -1, -1]  # 255 is ignored
    assert len(get_dataset("directory", tmp_path, "val", 8)) == 2  # split is ignored
    assert get_dataset("directory", tmp_path, "train", 8, n_classes=6).n_classes == 6  # more than the labels hold


def test_directory_label_beyond_n_classes_is_refused_naming_the_file(tmp_path):
    save_image(tmp_path / "images" / "a.png", quadrants(8, 8))
    save_image(tmp_path / "images" / "b.png", quadrants(8, 8))
    save_label(tmp_path / "labels" / "a.png", probe_label([0, 1]))
    save_label(tmp_path / "labels" / "b.png", probe_label([1, 2, 255]))
    with pytest.raises(UserError) as e:
        get_dataset("directory", tmp_path, "train", 8, n_classes=2)
    assert str(e.value).startswith(f"label {tmp_path / 'labels' / 'b.png'} holds class id 2, but --n_classes 2 "
                                   "allows ids 0..1")


def test_directory_without_labels_and_labels_off(tmp_path):
    save_image(tmp_path / "x.JPG", quadrants(8, 8))
    save_image(tmp_path / "sub" / "y.jpeg", quadrants(8, 8))
    (tmp_path / "notes.txt").write_text("not an image")
    ds = get_dataset("directory", tmp_path, "train", 4)
    assert not ds.has_labels and len(ds) == 2 and ds.n_classes == DATASETS["directory"].n_classes == 27
    assert "classes: no labels, so 27 clusters (the default); pass --n_classes to choose how many" in ds.files.notes
    assert (ds[1]["label"] == -1).all() and ds[1]["label"].shape == (4, 4)
    make_pascal(tmp_path / "voc", "val", {"p": probe_label([1])})
    off = get_dataset("pascalvoc", tmp_path / "voc", "val", 8, labels=False)
    assert not off.has_labels and (off[0]["label"] == -1).all()


def test_directory_image_without_label_is_unlabelled(tmp_path):
    save_image(tmp_path / "images" / "a.png", quadrants(8, 8))
    save_image(tmp_path / "images" / "b.png", quadrants(8, 8))
    save_label(tmp_path / "labels" / "a.png", probe_label([1]))
    ds = get_dataset("directory", tmp_path, "train", 8)
    assert ds.has_labels and ds.files.labelled == 1
    assert label_rows(ds, 0) == [1] * 8
    assert (ds[1]["label"] == -1).all()


# ---------------------------------------------------------------- errors

def names_path(path: Path) -> str:
    return re.escape(str(path))


def test_missing_folders_and_lists_name_the_path(tmp_path):
    with pytest.raises(UserError, match=names_path(tmp_path / "nope")):
        get_dataset("cocostuff27", tmp_path / "nope", "train", 8)
    with pytest.raises(UserError, match=names_path(tmp_path / "cocostuff")):
        get_dataset("cocostuff27", tmp_path, "train", 8)
    (tmp_path / "cocostuff").mkdir()
    val7 = tmp_path / "cocostuff" / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse_7.txt"
    with pytest.raises(UserError, match=names_path(val7)):
        get_dataset("cocostuff27", tmp_path, "val", 8)
    with pytest.raises(UserError, match=names_path(tmp_path / "cityscapes")):
        get_dataset("cityscapes", tmp_path, "train", 8)
    (tmp_path / "pascalvoc" / "VOCdevkit" / "VOC2012").mkdir(parents=True)
    with pytest.raises(UserError, match=r"ImageSets/Segmentation/train\.txt"):
        get_dataset("pascalvoc", tmp_path, "train", 8)
    with pytest.raises(UserError, match="no images"):
        get_dataset("directory", tmp_path / "cocostuff", "train", 8)


def test_unreadable_files_are_named(tmp_path):
    make_pascal(tmp_path, "val", {"good": probe_label([1]), "bad": probe_label([1]), "rgb": probe_label([1]),
                                  "small": probe_label([1])})
    voc = tmp_path / "pascalvoc" / "VOCdevkit" / "VOC2012"
    (voc / "JPEGImages" / "bad.jpg").write_bytes(b"this is not a jpeg")
    save_image(voc / "SegmentationClass" / "rgb.png", quadrants(8, 8))
    save_label(voc / "SegmentationClass" / "small.png", probe_label([1], side=4))
    ds = get_dataset("pascalvoc", tmp_path, "val", 8)
    assert ds[0]["label"].shape == (8, 8)
    with pytest.raises(UserError, match=r"bad\.jpg"):
        ds[1]
    with pytest.raises(UserError, match=r"rgb\.png.*single-channel"):
        ds[2]
    with pytest.raises(UserError, match=r"small\.png is 4x4 but image .*small\.jpg is 8x8"):
        ds[3]
    (voc / "JPEGImages" / "good.jpg").unlink()
    with pytest.raises(UserError, match=r"image file not found: .*good\.jpg"):
        ds[0]


def test_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="unknown dataset"):
        get_dataset("imagenet", tmp_path, "train", 8)
    with pytest.raises(UserError, match="unknown split"):
        get_dataset("cityscapes", tmp_path, "test", 8)
    with pytest.raises(UserError, match="directory dataset only"):
        get_dataset("cityscapes", tmp_path, "train", 8, n_classes=19)
    with pytest.raises(UserError, match="unknown crop type"):
        get_dataset("cityscapes", tmp_path, "train", 8, crop_type="seven")
    with pytest.raises(UserError, match="crop_dataset.py --dataset cityscapes --crop_type five"):
        get_dataset("cityscapes", tmp_path, "train", 8, crop_type="five")


# ---------------------------------------------------------------- toy

@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("toydata")
    toy.ensure_toy(data_dir)
    return data_dir


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_toy_sizes_and_classes(toy_dir):
    train = get_dataset("toy", toy_dir, "train", 128)
    val = get_dataset("toy", toy_dir, "val", 128)
    n = len(toy.TOY_CLASSES)
    assert (len(train), len(val), train.n_classes) == (240, 48, n)
    assert [p.name for p in (toy_dir).iterdir()] == ["toy"]  # no temporary folder left behind
    with Image.open(train.image_path(0)) as im:
        assert im.size == (160, 160)
    for split, ds in (("train", train), ("val", val)):
        present = np.zeros(n, int)
        for i in range(len(ds)):
            with Image.open(ds.files.labels[i]) as im:
                present[np.unique(np.asarray(im))] += 1
        assert (present >= len(ds) // 3).all(), (split, present)  # every class in many images
    item = train[0]
    assert item["img"].shape == (3, 128, 128) and set(item["label"].unique().tolist()) <= set(range(n))


def test_toy_colours_are_jittered(toy_dir):
    means = []
    for i in range(40):
        img = np.asarray(Image.open(toy_dir / "toy" / "images" / "train" / f"{i:04d}.png"), dtype=float)
        lab = np.asarray(Image.open(toy_dir / "toy" / "labels" / "train" / f"{i:04d}.png"))
        if (lab == toy.WATER).sum() > 500:
            means.append(img[lab == toy.WATER].mean(0))
    assert len(means) > 5 and np.std(np.array(means), axis=0).max() > 4  # not one constant colour


def test_toy_classes_are_pairwise_opposed_after_normalisation(toy_dir):
    """Mean normalised colour of each class over the training images: every pair has cosine
    near -1/3 (regular tetrahedron), the jitter and textures averaging out."""
    n = len(toy.TOY_CLASSES)
    sums, counts = np.zeros((n, 3)), np.zeros(n)
    for i in range(60):
        img = np.asarray(Image.open(toy_dir / "toy" / "images" / "train" / f"{i:04d}.png"), dtype=float) / 255
        lab = np.asarray(Image.open(toy_dir / "toy" / "labels" / "train" / f"{i:04d}.png"))
        normalised = (img - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)
        for c in range(n):
            sums[c] += normalised[lab == c].sum(0)
            counts[c] += (lab == c).sum()
    means = sums / counts[:, None]
    unit = means / np.linalg.norm(means, axis=1, keepdims=True)
    cos = unit @ unit.T
    assert n == 4 and np.allclose(cos[~np.eye(n, dtype=bool)], -1 / 3, atol=0.05), cos


def test_toy_is_deterministic(toy_dir, tmp_path):
    (tmp_path / "again").mkdir()
    toy.write_toy(tmp_path / "again", seed=toy.TOY_SEED)
    assert digest(tmp_path / "again") == digest(toy_dir / "toy")
    other = [toy.render_scene(np.random.default_rng([1, 0, i]))[0] for i in range(3)]
    same = [toy.render_scene(np.random.default_rng([toy.TOY_SEED, 0, i]))[0] for i in range(3)]
    assert all((a == np.asarray(Image.open(toy_dir / "toy" / "images" / "train" / f"{i:04d}.png"))).all()
               for i, a in enumerate(same))
    assert not any((a == b).all() for a, b in zip(other, same))


def test_interrupted_toy_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = toy.render_scene

    def failing(rng, size=toy.TOY_SIZE):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(rng, size)

    monkeypatch.setattr(toy, "render_scene", failing)
    with pytest.raises(KeyboardInterrupt):
        toy.ensure_toy(tmp_path)
    assert list(tmp_path.iterdir()) == []
