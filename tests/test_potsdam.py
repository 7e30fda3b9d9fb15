"""Potsdam-3 and PotsdamRaw (STEGO's .mat tiles): layout, split lists, the 6 -> 3 merge, crops, every stage."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.io import savemat

import crop_dataset
from loader.class_names import class_info
from loader.dataloader import denormalize, get_dataset
from loader.datasets_table import DATASETS
from tests.conftest import cli
from stages.evaluate import evaluate
from stages.fine_tuning import fine_tune
from stages.front_door import train_front_door
from stages.mediator import train_mediator
from tests.conftest import TOY_CKPT, TOY_K, toy_flags
from tests.test_datasets import label_rows, probe_label, quadrants
from utils.errors import UserError

SIDE = 16
# STEGO's merge, written out: impervious surfaces 0 and car 4 -> 0, building 1 and clutter 5 -> 1,
# low vegetation 2 and tree 3 -> 2; 255 (and anything else) is ignored.
RAW_ROWS = [0, 1, 2, 3, 4, 5, 255, 6]
MERGED_ROWS = [0, 1, 2, 2, 0, 1, -1, -1]


def save_tile(folder: Path, name: str, rgb: np.ndarray, gt: np.ndarray | None) -> None:
    """imgs/<name>.mat with 'img' (H, W, 4): RGB plus an infrared channel; gt/<name>.mat with 'gt' (H, W)."""
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    infrared = np.full(rgb.shape[:2] + (1,), 77, np.uint8)
    savemat(folder / "imgs" / f"{name}.mat", {"img": np.concatenate([rgb, infrared], axis=2)})
    if gt is not None:
        (folder / "gt").mkdir(parents=True, exist_ok=True)
        savemat(folder / "gt" / f"{name}.mat", {"gt": gt.astype(np.uint8)})


def make_potsdam(data_dir: Path, lists: dict[str, list[str]], rng: np.random.Generator | None = None) -> Path:
    """data_dir/potsdam in STEGO's layout: a tile per listed id and the split lists.

    Tiles are four flat quadrants with the probe label, or (given `rng`) random pixels and ids 0..5.
    """
    root = data_dir / "potsdam"
    for ids in lists.values():
        for i in ids:
            if rng is None:
                save_tile(root, i, quadrants(SIDE, SIDE), probe_label(RAW_ROWS, SIDE))
            else:
                save_tile(root, i, rng.integers(0, 256, (SIDE, SIDE, 3), np.uint8), rng.integers(0, 6, (SIDE, SIDE)))
    for list_name, ids in lists.items():
        (root / list_name).write_text("".join(f"{i}\n" for i in ids))
    return root


SPLITS = {"labelled_train.txt": ["t0", "t1"], "labelled_test.txt": ["v0"], "unlabelled_train.txt": ["u0"]}


def names(ds) -> list[str]:
    return [ds.image_path(i).name for i in range(len(ds))]


def test_potsdam_merges_six_classes_into_three(tmp_path):
    make_potsdam(tmp_path, SPLITS)
    ds = get_dataset("potsdam", tmp_path, "val", SIDE)
    assert ds.n_classes == 3 == DATASETS["potsdam"].n_classes == len(class_info("potsdam").names)
    assert label_rows(ds) == [MERGED_ROWS[min(r, 7)] for r in range(SIDE)]


def test_potsdam_split_lists_and_rgb_without_infrared(tmp_path):
    make_potsdam(tmp_path, SPLITS)
    assert names(get_dataset("potsdam", tmp_path, "train", SIDE)) == ["t0.mat", "t1.mat"]
    assert names(get_dataset("potsdam", tmp_path, "val", SIDE)) == ["v0.mat"]  # labelled_test
    img = get_dataset("potsdam", tmp_path, "train", SIDE)[1]["img"]
    assert img.shape == (3, SIDE, SIDE)
    np.testing.assert_array_equal(denormalize(img), quadrants(SIDE, SIDE))


def test_float_tiles_are_scaled_as_to_pil_image(tmp_path):
    root = tmp_path / "potsdam"
    rgb = np.zeros((SIDE, SIDE, 4), np.float32)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 0.5, 1.0, 0.2  # to_pil_image: int(v * 255) -> 127, 255, 51
    (root / "imgs").mkdir(parents=True)
    savemat(root / "imgs" / "f.mat", {"img": rgb})
    save_tile(root, "g", quadrants(SIDE, SIDE), probe_label([0], SIDE))
    (root / "gt" / "g.mat").rename(root / "gt" / "f.mat")
    (root / "labelled_test.txt").write_text("f\n")
    pixel = denormalize(get_dataset("potsdam", tmp_path, "val", SIDE)[0]["img"])[0, 0]
    assert pixel.tolist() == [127, 255, 51]


def test_potsdamraw_reads_every_tile_in_numeric_order(tmp_path):
    folder = tmp_path / "potsdamraw" / "processed"
    for name in ["1_0_0", "0_0_10", "0_0_2", "0_1_0"]:
        save_tile(folder, name, quadrants(SIDE, SIDE), probe_label(RAW_ROWS, SIDE))
    (folder / "imgs" / "notes.txt").write_text("not a tile")
    for split in ("train", "val"):
        ds = get_dataset("potsdamraw", tmp_path, split, SIDE)
        assert names(ds) == ["0_0_2.mat", "0_0_10.mat", "0_1_0.mat", "1_0_0.mat"]
    assert label_rows(ds, 3) == [MERGED_ROWS[min(r, 7)] for r in range(SIDE)]


def test_unreadable_tiles_name_the_file(tmp_path):
    root = make_potsdam(tmp_path, {"labelled_test.txt": ["v0"]})
    savemat(root / "imgs" / "v0.mat", {"image": np.zeros((4, 4, 4), np.uint8)})
    with pytest.raises(UserError, match=r"v0\.mat holds no variable 'img'"):
        get_dataset("potsdam", tmp_path, "val", SIDE)[0]
    (root / "imgs" / "v0.mat").write_bytes(b"not matlab")
    with pytest.raises(UserError, match=r"cannot read .*v0\.mat as a MATLAB file"):
        get_dataset("potsdam", tmp_path, "val", SIDE)[0]
    with pytest.raises(UserError, match=r"labelled_train\.txt"):
        get_dataset("potsdam", tmp_path, "train", SIDE)


def test_crop_dataset_writes_five_crops_of_the_merged_labels(tmp_path):
    make_potsdam(tmp_path, {"labelled_train.txt": ["t0"]})
    assert crop_dataset.main(["--dataset", "potsdam", "--crop_type", "five", "--data_dir", str(tmp_path),
                              "--num_workers", "0"]) == 0
    ds = get_dataset("potsdam", tmp_path, "train", SIDE // 2, crop_type="five")
    assert len(ds) == 5
    assert label_rows(ds, 0) == MERGED_ROWS  # crop 0 is the top-left 8x8: raw rows 0..7


@pytest.mark.slow
def test_every_stage_runs_on_potsdam(toy_root, tmp_path, capsys):
    lists = {"labelled_train.txt": [f"t{i}" for i in range(4)], "labelled_test.txt": ["v0", "v1"]}
    make_potsdam(tmp_path / "data", lists, np.random.default_rng(0))
    out = tmp_path / "out"
    argv = lambda **kw: toy_flags(toy_root, out, dataset="potsdam", data_dir=tmp_path / "data",  # noqa: E731
                                  train_resolution=64, test_resolution=64, batch_size=2, epoch=1, **kw)
    cli("mediator", None, train_mediator, argv())
    cli("front_door_tr", "TR", train_front_door, argv())
    cli("fine_tuning_tr", "TR", fine_tune, argv())
    cli("test_tr", "TR", evaluate, argv())
    metrics = json.loads((out / "results" / "potsdam" / "TR" / TOY_CKPT / str(TOY_K) / "metrics.json").read_text())
    assert metrics["classes"] == list(class_info("potsdam").names) and metrics["images"] == 2
    assert len(metrics["unsupervised_crf"]["IoU"]) == 3
    assert np.array(metrics["unsupervised_crf"]["histogram"]).sum() == 2 * 64 * 64  # every pixel labelled
    assert "skipped" not in capsys.readouterr().out   # every training step had a finite loss


def test_potsdamraw_block_without_gt_is_all_ignore_with_one_count_line(tmp_path):
    """STEGO's PotsdamRaw reads a block without gt/<name>.mat as all-ignore (its FileNotFoundError branch)."""
    folder = tmp_path / "potsdamraw" / "processed"
    save_tile(folder, "0_0_0", quadrants(SIDE, SIDE), probe_label(RAW_ROWS, SIDE))
    for name in ["0_0_1", "1_0_0"]:
        save_tile(folder, name, quadrants(SIDE, SIDE), None)
    ds = get_dataset("potsdamraw", tmp_path, "val", SIDE)
    assert names(ds) == ["0_0_0.mat", "0_0_1.mat", "1_0_0.mat"]
    assert ds[1]["label"].unique().tolist() == [-1] == ds[2]["label"].unique().tolist()
    assert label_rows(ds) == [MERGED_ROWS[min(r, 7)] for r in range(SIDE)]
    assert ds.files.notes == (f"PotsdamRaw: 2 of 3 blocks have no label under {folder / 'gt'}; they are all-ignore, "
                              f"as STEGO reads them",)
