"""A trained model named by its folder (stages/model_folder.py) without a trained model, and the small items of
training on your folder: closest names for typos, no empty artifact folders after a failed run, the enlarged-images
note at the resolution in force."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from downloads.fetch import fetch_backbone
from loader.datasets_table import DATASETS
from models import load_backbone
from stages.model_folder import apply_model_folder
from tests.conftest import TOY_CKPT, cli, toy_flags
from utils.config import build_parser, given_flags
from utils.errors import UserError


def segment_args(*argv: str) -> tuple[argparse.Namespace, set[str]]:
    parser = build_parser("segment_images", DATASETS)
    argv = ["--input", "x", "--out", "y", *argv]
    return parser.parse_args(argv), given_flags(parser, argv)


def model_folder(folder: Path, structures: tuple[str, ...], settings: dict | None = None) -> Path:
    """Head and probe files (contents unread here), with the probe's JSON when `settings` are given."""
    folder.mkdir(parents=True)
    for s in structures:
        for kind in ("segment", "cluster"):
            (folder / f"{kind}_{s}.pth").write_bytes(b"")
        if settings is not None:
            (folder / f"cluster_{s}.json").write_text(json.dumps({
                "settings": {**settings, "structure": s.upper()}, "flags": {"ckpt": "elsewhere/b.pth"},
                "upstream": {"backbone": {"path": str(folder.parent / "b.pth"), "sha256": "0"}}}))
    return folder


SETTINGS = {"dataset": "directory", "data_dir": "/data/mine", "num_codebook": 32, "reduced_dim": 90,
            "projection_dim": 16, "n_classes": 5, "train_resolution": 64, "published_12_heads": False,
            "published_recipe": False}


def test_given_flags_are_those_on_the_command_line_whatever_their_value():
    _, given = segment_args("--structure", "TR", "--num_codebook", "2048")  # both the defaults
    assert given == {"input", "out", "structure", "num_codebook"}


def test_every_setting_comes_from_the_folder_whatever_its_name(tmp_path):
    (tmp_path / "b.pth").write_bytes(b"")
    folder = model_folder(tmp_path / "any name at all", ("tr",), SETTINGS)
    args, given = segment_args("--model", str(folder), "--projection_dim", "16", "--test_resolution", "48")
    apply_model_folder(args, given, "segment_images.py")
    assert (args.dataset, args.data_dir, args.num_codebook, args.projection_dim, args.n_classes) == \
        ("directory", "/data/mine", 32, 16, 5)
    assert (args.train_resolution, args.test_resolution, args.structure) == (64, 48, "TR")
    assert args.ckpt == str(tmp_path / "b.pth")  # the resolved upstream path, not the flag as typed
    assert (args.segment, args.cluster) == (str(folder / "segment_tr.pth"), str(folder / "cluster_tr.pth"))


@pytest.mark.parametrize("argv,words", [
    (("--num_codebook", "2048"), "--num_codebook 2048 disagrees with the model in {folder}, trained with "
                                 "--num_codebook 32 (cluster_tr.json)"),
    (("--dataset", "toy"), "--dataset toy disagrees"),
    (("--structure", "MLP"), "holds no CAUSE-MLP model (segment_mlp.pth and cluster_mlp.pth); it holds TR"),
    (("--segment", "s.pth"), "--segment s.pth and a model folder"),
])
def test_flags_that_disagree_with_the_folder_are_refused_in_one_line(argv, words, tmp_path):
    (tmp_path / "b.pth").write_bytes(b"")
    folder = model_folder(tmp_path / "m", ("tr",), SETTINGS)
    args, given = segment_args("--model", str(folder), *argv)
    with pytest.raises(UserError) as e:
        apply_model_folder(args, given, "segment_images.py")
    assert words.format(folder=folder.absolute()) in str(e.value) and "\n" not in str(e.value)


def test_a_folder_with_both_heads_asks_which_and_one_without_json_asks_for_flags(tmp_path):
    (tmp_path / "b.pth").write_bytes(b"")
    both = model_folder(tmp_path / "both", ("mlp", "tr"), SETTINGS)
    args, given = segment_args("--model", str(both))
    with pytest.raises(UserError, match="holds a CAUSE-MLP and a CAUSE-TR model: pass --structure MLP or "
                                        "--structure TR"):
        apply_model_folder(args, given, "segment_images.py")
    args, given = segment_args("--model", str(both), "--structure", "MLP")
    apply_model_folder(args, given, "segment_images.py")
    assert args.structure == "MLP" and args.segment.endswith("segment_mlp.pth")

    published = model_folder(tmp_path / "published", ("tr",))
    args, given = segment_args("--model", str(published))
    with pytest.raises(UserError, match="cluster_tr.json not found: .*name the model by its flags"):
        apply_model_folder(args, given, "segment_images.py")
    moved = model_folder(tmp_path / "moved" / "m", ("tr",), SETTINGS)  # its backbone b.pth is not beside it
    args, given = segment_args("--model", str(moved))
    with pytest.raises(UserError, match=r"the backbone .*b\.pth that cluster_tr\.json records is not there any "
                                        r"more: pass --ckpt <where it is now>"):
        apply_model_folder(args, given, "segment_images.py")


def test_typos_get_the_closest_name(toy_root, capsys):
    with pytest.raises(SystemExit):
        build_parser("mediator", DATASETS).parse_args(["--dataset", "cocostuf27"])
    err = capsys.readouterr().err
    assert "invalid choice: 'cocostuf27'" in err and "(did you mean 'cocostuff27'?)" in err
    with pytest.raises(UserError, match=f"no such checkpoint file \\(did you mean '{toy_root / TOY_CKPT}.pth'\\?\\)"):
        load_backbone(toy_root / "random_vit_tiny8.pth")
    with pytest.raises(UserError, match="unknown backbone 'dino_vit_bse_8' \\(did you mean 'dino_vit_base_8'\\?\\)"):
        fetch_backbone("dino_vit_bse_8", toy_root / "none")


def test_a_failed_run_leaves_no_folders_and_notes_the_size_in_force(toy_root, tmp_path, capsys):
    """front_door_tr without a codebook stops before training: no empty artifact tree is left behind. The
    note on small images says the size they are enlarged to in this run (--train_resolution 32), not 320."""
    folder = tmp_path / "mine"
    folder.mkdir()
    for name, side in (("small.png", 24), ("big.png", 40)):
        Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(folder / name)
    with pytest.raises(SystemExit) as e:
        cli("front_door_tr", "TR", "stages.front_door:train_front_door",
            toy_flags(toy_root, tmp_path / "o", dataset="directory", data_dir=folder, train_resolution=32))
    assert e.value.code == 2
    out = capsys.readouterr().out
    assert "1 of 2 images have a side under 32 px and are enlarged to it" in out and "320 px" not in out
    assert not (tmp_path / "o" / "CAUSE").exists()
