"""reproduce.py without SLURM: rows, bad input (one line, nothing written), status and table from the files
on disk, and the toy TR row end to end with --launcher local."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.cli import main
from launch.rows import Row, Settings, row_stages, select_rows, stage_flags
from launch.status import format_status
from launch.table import markdown, table_rows, write_outputs
from loader.datasets_table import DATASETS
from downloads.sources import PUBLISHED
from tests.conftest import TOY_CKPT, TOY_K as K
from tests.toy_fixtures import P, RES, train_toy

REPO = Path(__file__).resolve().parents[1]


def settings(tmp: Path, **overrides) -> Settings:
    values = dict(recipe="default", data_dir=str(tmp / "data"), output_dir=str(tmp / "CAUSE"),
                  results_dir=str(tmp / "results"), log_dir=str(tmp / "logs"),
                  num_codebook=None, projection_dim=None, batch_size=None, n_classes=None, gpu=None)
    values.update(overrides)
    return Settings(**values)


def test_rows_from_the_selectors():
    assert len(select_rows(None, None, None, "checkpoint")) == len(PUBLISHED)
    tr = select_rows(["cityscapes"], ["TR"], None, "ck")
    assert {r.backbone for r in tr} == {p.backbone for p in PUBLISHED if (p.dataset, p.structure) == ("cityscapes", "TR")}
    assert all(r.ckpt == f"ck/{r.backbone}.pth" for r in tr)
    assert select_rows(["toy"], None, None, "ck") == [Row("toy", "ck/random_vit_tiny_8.pth", s) for s in ("MLP", "TR")]
    crossed = select_rows(["pascalvoc", "coco81"], ["MLP"], ["a/dino_vit_base_16.pth"], "ck")
    assert [(r.dataset, r.backbone, r.published) for r in crossed] == [("pascalvoc", "dino_vit_base_16", None),
                                                                      ("coco81", "dino_vit_base_16", None)]
    assert select_rows(["cocostuff27"], ["TR"], ["x/dino_vit_base_8.pth"], "ck")[0].published.miou == 41.9


def _run_script_flags(tmp_path: Path, dataset: str, script: str = "train_front_door_tr.py",
                      **variables: str) -> list[str]:
    """The flags `bash run` (with these shell `variables`) gives `script` (a stand-in python records every
    stage's flags)."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/bash\nif [ "$1" = -m ]; then exec {sys.executable} "$@"; fi\n'
                    f'echo "$@" >> {tmp_path}/argv\n')
    fake.chmod(0o755)
    (tmp_path / "b.pth").write_bytes(b"")
    (tmp_path / "argv").unlink(missing_ok=True)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "dataset": dataset, "ckpt": str(tmp_path / "b.pth"),
           **variables}
    done = subprocess.run(["bash", str(REPO / "run")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return next(line for line in (tmp_path / "argv").read_text().splitlines()
                if line.startswith(script)).split()


def test_defaults_come_from_the_dataset_table(tmp_path):
    """`bash run` and reproduce.py take K, p and the batch from the same table: they cannot drift."""
    for dataset in ("toy", "cityscapes"):
        table = DATASETS[dataset]
        expected = [str(table.num_codebook), str(table.projection_dim), str(table.batch_size)]
        script = _run_script_flags(tmp_path, dataset)
        ours = stage_flags("train_front_door_tr", Row(dataset, "c/dino_vit_base_8.pth", "TR"), settings(tmp_path))
        for argv in (script, ours):
            assert [argv[argv.index(f) + 1] for f in ("--num_codebook", "--projection_dim", "--batch_size")] \
                == expected
    assert [DATASETS["toy"].num_codebook, DATASETS["cityscapes"].batch_size] == [256, 16]


def test_stage_flags_after_double_dash_go_where_accepted(tmp_path):
    s = settings(tmp_path, passthrough=("--val_images", "2", "--max_steps", "1", "--kmeans_samples", "50"))
    row = Row("toy", "c/random_vit_tiny_8.pth", "TR")
    stages = {st.script: st for st in row_stages(row, s)}
    assert "--val_images" in stages["train_front_door_tr"].argv and "--val_images" not in stages["test_tr"].argv
    assert "--kmeans_samples" in stages["test_kmeans"].argv and "--kmeans_samples" not in stages["train_mediator"].argv
    assert stages["train_front_door_tr"].after == (stages["train_mediator"].name,)
    # the default row (no stage flags after --) keeps the published job names
    plain = {st.script: st for st in row_stages(row, settings(tmp_path))}
    assert plain["train_front_door_tr"].name == "cause-toy-random_vit_tiny_8-TR-train_front_door_tr"


def _bad(capsys, tmp_path, *argv: str) -> str:
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    code = main([*argv[:cut], "--log_dir", str(tmp_path / "logs"), "--output_dir", str(tmp_path / "CAUSE"),
                 *argv[cut:]])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "logs").exists() and not (tmp_path / "CAUSE").exists()
    return err


def test_bad_input_one_line_nothing_written(capsys, tmp_path, monkeypatch):
    data = ["--data_dir", str(tmp_path / "data")]
    assert "--dataset cocostuf" in _bad(capsys, tmp_path, "run", "--dataset", "cocostuf")
    assert "--structure TRR" in _bad(capsys, tmp_path, "status", "--structure", "TRR")
    assert "unknown backbone 'dino_vit_huge_8'" in _bad(capsys, tmp_path, "run", "--ckpt", "x/dino_vit_huge_8.pth")
    err = _bad(capsys, tmp_path, "run", "--dataset", "cocostuff27", "--ckpt", str(tmp_path / "dino_vit_base_8.pth"))
    assert f"python download.py backbone dino_vit_base_8 --dest {tmp_path}" in err
    (tmp_path / "dino_vit_base_8.pth").write_bytes(b"")
    err = _bad(capsys, tmp_path, "run", "--dataset", "coco81", "--ckpt", str(tmp_path / "dino_vit_base_8.pth"), *data)
    assert f"python download.py dataset cocostuff --data_dir {tmp_path / 'data'}" in err
    assert "--bogus after --" in _bad(capsys, tmp_path, "run", "--dataset", "toy", "--", "--bogus", "1")
    assert "--output_dir after --" in _bad(capsys, tmp_path, "run", "--dataset", "toy", "--", "--output_dir", "x")
    err = _bad(capsys, tmp_path, "run", "--dataset", "toy", "--ckpt", str(tmp_path / "random_vit_tiny_8.pth"),
               "--", "--max_steps", "-1")
    assert "refuses its flags" in err and "--max_steps" in err
    assert "--slurm_gpus is for --launcher slurm" in _bad(capsys, tmp_path, "run", "--dataset", "toy",
                                                          "--slurm_gpus", "0")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert "sbatch not found on PATH" in _bad(capsys, tmp_path, "run", "--dataset", "toy", "--launcher", "slurm")
    assert "--gpu is for --launcher local" in _bad(capsys, tmp_path, "run", "--dataset", "toy", "--launcher",
                                                   "slurm", "--gpu", "0")


def _metrics(path: Path, crf: float, acc: float, recipe: bool = False, **record) -> None:
    """A metrics.json as the test scripts write it (its scores, flags and commit, and `record`'s fields)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"unsupervised": {"mIoU": crf - 2, "Acc": acc - 2},
                                "unsupervised_crf": {"mIoU": crf, "Acc": acc},
                                "linear": {"mIoU": 50.5, "Acc": 80.25}, "flags": {"published_recipe": recipe},
                                "code_version": "abc1234", **record}))


def test_table_reads_metrics_and_published_values(tmp_path):
    s = settings(tmp_path, recipe="published")
    done = Row("cocostuff27", str(tmp_path / "dino_vit_base_8.pth"), "TR")
    todo = Row("cocostuff27", str(tmp_path / "dino_vit_base_8.pth"), "MLP")
    plan = [(r, row_stages(r, s)) for r in (done, todo)]
    test, kmeans = plan[0][1][-1], plan[0][1][1]
    _metrics(test.artifact, 40.04, 70.0, recipe=True)
    _metrics(kmeans.artifact, 12.5, 44.0, recipe=True)
    rows = table_rows(plan, s)
    text = markdown(rows)
    assert "| cocostuff27 | TR | dino_vit_base_8 | published | 2048 | 2048 | 16 | 0 | - | - | 41.9 | 74.9 | 38.0 | " \
           "68.0 | 40.0 | 70.0 | 50.5 | 80.2 | -1.9 | 12.5 | 44.0 | - | - | abc1234 | partial |" in text
    assert "| cocostuff27 | MLP | dino_vit_base_8 | published | 2048 | 2048 | 16 | 0 | - | - | 34.3 | 72.8 | - | - | " \
           "- | - | - | - | - | 12.5 | 44.0 | - | - | abc1234 | partial |" in text  # its k-means baseline (shared) is done
    written = write_outputs(rows, tmp_path / "out" / "table.md")
    assert [p.name for p in written] == ["table.md", "table.csv", "table.png", "table.pdf"]
    got = list(csv.DictReader(open(written[1])))
    assert float(got[0]["CRF mIoU"]) == 40.04 and float(got[0]["CRF mIoU - published"]) == pytest.approx(40.04 - 41.9)
    assert written[2].read_bytes()[:4] == b"\x89PNG"


def test_status_from_files(tmp_path):
    s = settings(tmp_path)
    row = Row("toy", str(tmp_path / f"{TOY_CKPT}.pth"), "TR")
    stages = {st.script: st for st in row_stages(row, s)}
    mediator, front = stages["train_mediator"], stages["train_front_door_tr"]
    mediator.artifact.parent.mkdir(parents=True)
    mediator.artifact.write_bytes(b"x")
    front.state.parent.mkdir(parents=True)
    torch.save({"epoch": 1, "step_in_epoch": 3}, front.state)
    logs = tmp_path / "logs" / "reproduce"
    logs.mkdir(parents=True)
    (logs / f"{front.name}.exit").write_text("130\n")
    text = format_status([(row, row_stages(row, s))], s.log_dir)
    assert "train_mediator         done" in text
    assert "train_front_door_tr    interrupted  epoch 2/2, 3 step(s) of it done; run again to resume" in text
    front.state.unlink()
    (logs / f"{front.name}.exit").write_text("2\n")
    (logs / f"{front.name}.log").write_text("[reproduce] start\nloading\nerror: data/x.png is unreadable\ndone\n")
    text = format_status([(row, row_stages(row, s))], s.log_dir)
    assert f"failed       exit 2; log {logs / (front.name + '.log')}: error: data/x.png is unreadable" in text
    assert "fine_tuning_tr         blocked      cause-toy-random_vit_tiny_8-TR-train_front_door_tr did not finish" in text
    assert text.splitlines()[0] == f"toy {TOY_CKPT} TR K=256 p=256 batch=8 seed=0: failed"


@pytest.mark.slow
def test_toy_row_with_the_local_launcher(toy_root, tmp_path):
    """The Done-when row on a machine without SLURM: stages 1-3 are those the evaluation tests share (copied into
    the row's folder, made with the row's flags: done, so skipped), the k-means baseline and the test run; then
    status says done and the table has metrics.json's value."""
    trained = train_toy(toy_root)
    where = ["--dataset", "toy", "--structure", "TR", "--ckpt", str(toy_root / f"{TOY_CKPT}.pth"),
             "--recipe", "default", "--data_dir", str(toy_root / "data"), "--output_dir", str(tmp_path / "CAUSE"),
             "--results_dir", str(tmp_path / "results"), "--log_dir", str(tmp_path / "logs"),
             "--num_codebook", str(K), "--projection_dim", str(P)]
    tiny = ["--max_steps", "2", "--epoch", "1", "--num_workers", "0", "--crf_workers", "0", "--save_images", "0",
            "--train_resolution", str(RES), "--test_resolution", str(RES), "--device", "cpu",
            "--kmeans_samples", "2000"]
    s = settings(tmp_path, num_codebook=(K,), projection_dim=(P,), passthrough=tuple(tiny))
    stages = row_stages(Row("toy", str(toy_root / f"{TOY_CKPT}.pth"), "TR", K, P), s)
    for made, copy in ((trained / "CAUSE/toy/modularity" / TOY_CKPT / str(K), stages[0].artifact.parent),
                       (trained / "CAUSE/toy" / TOY_CKPT / str(K), stages[2].artifact.parent)):
        shutil.copytree(made, copy, ignore=shutil.ignore_patterns("state_*"))
    run = subprocess.run([sys.executable, "reproduce.py", "run", *where, "--", *tiny], cwd=REPO, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr
    for stage in stages[0], stages[2], stages[3]:
        assert f"{stage.name}: done" in run.stdout
    assert f"{stages[-1].name}: running" in run.stdout
    status = subprocess.run([sys.executable, "reproduce.py", "status", *where, "--", *tiny], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    assert status.splitlines()[0] == f"toy {TOY_CKPT} TR K={K} p={P} batch=8 seed=0: done", status
    table = subprocess.run([sys.executable, "reproduce.py", "table", *where, "--out", str(tmp_path / "t.md"), "--",
                            *tiny], cwd=REPO, capture_output=True, text=True, check=True).stdout
    crf = json.loads(stages[-1].artifact.read_text())["unsupervised_crf"]
    assert f"| {crf['mIoU']:.1f} | {crf['Acc']:.1f} |" in table
    assert float(next(csv.DictReader(open(tmp_path / "t.csv")))["CRF mIoU"]) == crf["mIoU"]
