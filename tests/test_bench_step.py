"""benchmarks.bench_step: options, the backbone it times, and one row end to end at a tiny size."""
from pathlib import Path

import pytest
import torch

from benchmarks import bench_step
from models import load_backbone


def test_options_select_stages_and_backbones():
    opts = bench_step.parse_options(["--stages", "fine_tuning_tr", "front_door_tr",
                                     "--backbones", "random_vit_base_8", "vit_small_16", "--batch", "4"])
    assert opts.stages == ["fine_tuning_tr", "front_door_tr"]
    assert opts.backbones == ["vit_base_8", "vit_small_16"] and opts.batch == 4


@pytest.mark.parametrize("argv", [["--stages", "front_door"], ["--backbones", "vit_huge_8"],
                                  ["--backbones", "vit_base_9"], ["--batch", "0"], ["--threads", "-1"]])
def test_bad_options_exit_2_naming_the_option(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench_step.parse_options(argv)
    assert e.value.code == 2
    assert f"error: argument {argv[0]}" in capsys.readouterr().err.strip().splitlines()[-1]


def test_backbone_has_the_published_depth_not_the_toy_one(tmp_path: Path):
    # The toy's random backbones have 2 blocks; timing against one made every ratio 6x too large.
    bench_step.random_backbone("vit_tiny_8", tmp_path / "random_vit_tiny_8.pth")
    assert len(load_backbone(tmp_path / "random_vit_tiny_8.pth").blocks) == 12


def test_one_row_per_selected_stage(monkeypatch, capsys):
    tiny = dict(backbones=("vit_tiny_8",), resolution=64, batch=2, K=8, p=8)
    monkeypatch.setitem(bench_step.SIZES, "small", tiny)
    monkeypatch.setattr(bench_step, "loader_times", lambda args, data_dir: (0.0, 0.0))  # not under test here
    bench_step.main(["--device", "cpu", "--stages", "front_door_tr", "mediator", "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| vit_tiny_8 |")]
    assert [r[1].strip() for r in rows] == ["mediator", "front_door_tr"]  # table order, only those
    for r in rows:
        backbone, floor, step = (float(c.strip().removesuffix(" ms")) for c in r[2:5])
        assert backbone > 0 and floor > 0 and step > 0
        assert float(r[5]) == pytest.approx(step / backbone, rel=0.05, abs=0.01)
        assert int(r[7].strip().removesuffix(" MiB")) > 0
    assert torch.get_num_threads() == 1
