"""--help of every script: only the flags its code reads, each with its default."""
from __future__ import annotations

import argparse

import pytest

import crop_dataset
import download
from loader.datasets_table import DATASETS
from utils.config import STAGE_EPOCHS, build_parser, stage_argv
from utils.errors import UserError

# Every script takes these: data, backbone and devices.
EVERYWHERE = {"dataset", "data_dir", "n_classes", "skip_bad_images", "ckpt", "published_12_heads", "published_recipe",
              "device", "precision", "gpu", "distributed", "port", "dist_timeout",
              "seed", "variant"}  # seed and variant select the setting's folders (utils/config.py setting_folder)
TRAINING = EVERYWHERE | {"train_resolution", "num_workers", "batch_size", "num_codebook", "grid", "epoch", "lr",
                         "max_steps", "seed", "save_every", "resume", "overwrite", "max_nonfinite", "output_dir",
                         "log_dir", "feature_cache", "feature_cache_dtype"}
HEAD_TRAINING = TRAINING | {"reduced_dim", "projection_dim", "load_segment", "validate", "val_images"}
TEST = EVERYWHERE | {"test_resolution", "num_workers", "batch_size", "crf_workers", "results_dir", "save_images"}
TRAINED = TEST | {"num_codebook", "reduced_dim", "projection_dim", "segment", "cluster", "output_dir", "overwrite"}

EXPECTED = {
    "mediator": TRAINING,
    "front_door_mlp": HEAD_TRAINING | {"test_resolution"},           # validates at the test resolution
    "front_door_tr": HEAD_TRAINING,                                  # validates at the training resolution
    "fine_tuning_mlp": HEAD_TRAINING | {"test_resolution", "load_cluster", "published_label_leak"},
    "fine_tuning_tr": HEAD_TRAINING | {"load_cluster", "published_label_leak"},
    "test_mlp": TRAINED,
    "test_tr": TRAINED | {"train_resolution"},                       # the TR head's query grid
    "test_kmeans": TEST | {"seed", "kmeans_samples", "overwrite"},
    "segment_images": EVERYWHERE | {"train_resolution", "test_resolution", "num_codebook", "reduced_dim",
                                    "projection_dim", "segment", "cluster", "results_dir", "output_dir", "input",
                                    "out", "structure", "crf", "matched", "model"},
}


def flags(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if a.option_strings and a.dest != "help"}


def download_parsers() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in download.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {f"download {name}": p for name, p in sub.choices.items()}


def all_parsers() -> dict[str, argparse.ArgumentParser]:
    return {**{stage: build_parser(stage, DATASETS) for stage in STAGE_EPOCHS},
            "crop_dataset": crop_dataset.build_parser(), **download_parsers()}


def test_the_table_covers_every_stage() -> None:
    assert set(EXPECTED) == set(STAGE_EPOCHS)


@pytest.mark.parametrize("stage", sorted(EXPECTED))
def test_each_script_offers_exactly_the_flags_its_code_reads(stage: str) -> None:
    got = flags(build_parser(stage, DATASETS))
    assert got == EXPECTED[stage], f"extra: {sorted(got - EXPECTED[stage])}, missing: {sorted(EXPECTED[stage] - got)}"


def test_crop_and_download_flags() -> None:
    assert flags(crop_dataset.build_parser()) == {"dataset", "crop_type", "data_dir", "num_workers"}
    assert {k: flags(p) for k, p in download_parsers().items()} == {
        "download list": set(), "download backbone": {"dest", "url"},
        "download dataset": {"data_dir", "crop", "keep_archive", "num_workers"},
        "download published": {"dataset", "ckpt", "structure", "output_dir", "data_dir", "ckpt_dir"}}


@pytest.mark.parametrize("script", sorted(all_parsers()))
def test_every_flag_shows_its_default_in_help(script: str) -> None:
    parser = all_parsers()[script]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        text = formatter._get_help_string(action) % {"default": action.default}
        assert action.help, f"{script} {action.option_strings[0]} has no help text"
        if action.required:
            continue
        assert "default" in text, f"{script} {action.option_strings[0]}: {text!r}"
        if action.default is not None and "(default: " in text and text.endswith(")"):
            shown = text.rsplit("(default: ", 1)[1][:-1]
            expected = str(action.default).lower() if isinstance(action.default, bool) else str(action.default)
            assert shown in (expected, "min(8, CPUs - 1)"), f"{script} {action.option_strings[0]}: {shown}"
    assert "(default: " in parser.format_help() or script == "download list"


def test_help_text_names_a_bool_default_as_the_flag_spells_it() -> None:
    text = build_parser("mediator", DATASETS).format_help()
    assert "stochastic 4x4 grid sampling (default: true)" in " ".join(text.split())
    assert "[an integer >= 1] (default: 16)" in " ".join(text.split())


def test_segment_images_refuses_training_flags(capsys: pytest.CaptureFixture) -> None:
    parser = build_parser("segment_images", DATASETS)
    for flag in ("--lr", "--resume", "--epoch", "--save_every", "--max_nonfinite", "--batch_size"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["--input", "x", "--out", "y", flag, "1"])
        assert e.value.code == 2
        assert f"unrecognized arguments: {flag}" in capsys.readouterr().err


def test_stage_argv_keeps_each_scripts_flags_with_their_values() -> None:
    argv = ["--dataset", "toy", "--lr", "0.1", "--resume", "--crf_workers=2", "--output_dir", "o", "--overwrite"]
    assert stage_argv("mediator", argv) == ["--dataset", "toy", "--lr", "0.1", "--resume", "--output_dir", "o",
                                            "--overwrite"]
    assert stage_argv("test_kmeans", argv) == ["--dataset", "toy", "--crf_workers=2", "--overwrite"]
    assert stage_argv("test_tr", argv) == ["--dataset", "toy", "--crf_workers=2", "--output_dir", "o", "--overwrite"]
    with pytest.raises(UserError, match="--typo: no script takes this flag"):
        stage_argv("mediator", ["--typo", "1"])
