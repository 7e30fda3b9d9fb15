"""reproduce.py rows as everything that makes them (K, p, batch, seed, stage flags): distinct paths and jobs,
the published default's paths unchanged, sweeps, stale stages, the table's seed lines and aggregates, the
figure. Files only (no SLURM, no training): the SLURM sweep is in tests/test_reproduce_slurm.py."""
from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

import pytest

from launch.cli import main
from launch.figure import figure
from launch.jobs import write_script
from launch.rows import Row, Settings, flags_hash, row_stages, sweep
from launch.status import format_status, to_run
from launch.table import markdown, table_rows, write_outputs
from loader.datasets_table import DATASETS
from tests.test_reproduce import settings
from utils.config import ArtifactPaths, build_parser, setting_folder
from utils.io import file_sha256


def plan_of(rows: list[Row], s: Settings) -> list:
    return [(r, row_stages(r, s)) for r in sweep(rows, s)]


def test_the_published_default_keeps_its_paths_and_job_names(tmp_path):
    s = settings(tmp_path)
    stages = {st.script: st for st in row_stages(Row("cocostuff27", "ck/dino_vit_base_8.pth", "TR"), s)}
    assert stages["train_mediator"].artifact == tmp_path / "CAUSE/cocostuff27/modularity/dino_vit_base_8/2048/modular.npy"
    assert stages["train_front_door_tr"].artifact == tmp_path / "CAUSE/cocostuff27/dino_vit_base_8/2048/segment_tr.pth"
    assert stages["test_tr"].artifact == tmp_path / "results/cocostuff27/TR/dino_vit_base_8/2048/metrics.json"
    assert stages["test_kmeans"].artifact == tmp_path / "results/cocostuff27/KMEANS/dino_vit_base_8/27/metrics.json"
    assert [st.name for st in stages.values()] == [
        "cause-cocostuff27-dino_vit_base_8-train_mediator", "cause-cocostuff27-dino_vit_base_8-test_kmeans",
        "cause-cocostuff27-dino_vit_base_8-TR-train_front_door_tr", "cause-cocostuff27-dino_vit_base_8-TR-fine_tuning_tr",
        "cause-cocostuff27-dino_vit_base_8-TR-test_tr"]


def _stage_path(stage) -> Path:
    """Where the stage's own script puts its artifact, computed from the flags the row gives it."""
    parsed = build_parser(stage.script.removeprefix("train_"), DATASETS).parse_args(list(stage.argv))
    structure = stage.script.rsplit("_", 1)[1].upper() if stage.script.endswith(("_mlp", "_tr")) else None
    paths = ArtifactPaths.of(parsed, "random_vit_tiny_8", structure)
    if stage.script == "test_kmeans":
        return Path(parsed.results_dir) / "toy" / "KMEANS" / "random_vit_tiny_8" / \
            setting_folder(DATASETS["toy"].n_classes, parsed) / "metrics.json"
    if stage.script == "train_mediator":
        return paths.codebook
    if stage.script.startswith("test_"):
        return paths.results / "metrics.json"
    return paths.cluster if stage.script.startswith("fine_tuning") else paths.segment


def test_a_sweep_gives_each_row_its_own_paths_and_jobs_that_the_stage_scripts_compute_too(tmp_path):
    s = settings(tmp_path, num_codebook=(16, 32), projection_dim=(64,), seed=(0, 1),
                 passthrough=("--max_steps", "2", "--num_workers", "0"))
    plan = plan_of([Row("toy", "ck/random_vit_tiny_8.pth", st) for st in ("MLP", "TR")], s)
    assert len(plan) == 8
    stages = [st for _, sts in plan for st in sts]
    # one job name <-> one artifact; what a setting shares is shared, nothing else
    name_of = {st.artifact: st.name for st in stages}
    assert len(set(name_of.values())) == len(name_of) == len({st.name for st in stages})
    count = {script: len({st.artifact for st in stages if st.script == script}) for script in
             ("train_mediator", "test_kmeans", "train_front_door_tr", "test_mlp")}
    assert count == {"train_mediator": 4, "test_kmeans": 2, "train_front_door_tr": 4, "test_mlp": 4}  # K x seed
    # readable folders: K, p and the seed in words, the stage flags as a hash (--num_workers changes nothing)
    hashed = flags_hash(("--max_steps", "2"))
    row, sts = plan[-1]
    assert (row.num_codebook, row.projection_dim, row.seed, row.structure) == (32, 64, 1, "TR")
    assert sts[-1].artifact.parent.name == f"32_p64_{hashed}_seed1"
    assert sts[1].artifact.parent.name == f"4_p64_{hashed}_seed1"  # the k-means baseline: C=4 classes, any K
    # every stage gets the seed, and its own script finds the folder from its flags alone
    for row, sts in plan:
        for st in sts:
            assert st.argv[st.argv.index("--seed") + 1] == str(row.seed)
            assert _stage_path(st) == st.artifact, st.script


def test_the_flags_hash_ignores_order_and_how_a_stage_runs():
    assert flags_hash(("--max_steps", "2", "--lr", "0.1")) == flags_hash(("--lr=0.1", "--max_steps", "2",
                                                                        "--num_workers", "3", "--crf_workers", "0"))
    assert flags_hash(("--max_steps", "2")) != flags_hash(("--max_steps", "3")) != ""
    assert flags_hash(("--num_workers", "3")) == ""


def test_list_shows_the_cross_product(capsys):
    assert main(["list", "--dataset", "toy", "--structure", "TR", "--num_codebook", "16,32", "--seed", "0,1",
                 "--", "--max_steps", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["dataset", "structure", "backbone", "recipe", "K", "p", "batch", "seed", "flags",
                                "folder", "published"]
    hashed = flags_hash(("--max_steps", "2"))
    assert [line.split()[4:10] for line in lines[1:]] == [
        ["16", "256", "8", "0", hashed, f"16_{hashed}"], ["16", "256", "8", "1", hashed, f"16_{hashed}_seed1"],
        ["32", "256", "8", "0", hashed, f"32_{hashed}"], ["32", "256", "8", "1", hashed, f"32_{hashed}_seed1"]]


def test_a_bad_sweep_value_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["list", "--dataset", "toy", "--seed", "0,x"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "--seed" in err and "'x'" in err


def _write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def _scores(crf: float) -> dict:
    return {"unsupervised": {"mIoU": crf - 1, "Acc": 60.0}, "unsupervised_crf": {"mIoU": crf, "Acc": 61.0},
            "linear": {"mIoU": 30.0, "Acc": 70.0}}


def test_a_128px_baseline_under_a_64px_row_is_stale_everywhere(tmp_path):
    """`bash run` made the k-means baseline at the default 128 px; a 64-px row finds it in its folder (run by
    hand with its --variant): status, table and run see that it is not the row's."""
    s = settings(tmp_path, passthrough=("--test_resolution", "64"))
    row = Row("toy", str(tmp_path / "random_vit_tiny_8.pth"), "TR")
    plan = plan_of([row], s)
    kmeans = plan[0][1][1]
    _write(kmeans.artifact, {**_scores(99.6), "settings": {"test_resolution": 128},
                             "flags": {"test_resolution": None, "seed": 0, "kmeans_samples": 200000}})
    status = format_status(plan, s.log_dir)
    assert "test_kmeans            stale        made with other settings (test_resolution: recorded 128, the row " \
           "asks 64); `run` redoes it" in status
    assert status.splitlines()[0].endswith(": stale")
    text = markdown(table_rows(plan, s))
    assert "| 99.6 (stale) | 61.0 (stale) |" in text and "| 99.6 |" not in text
    written = write_outputs(table_rows(plan, s), tmp_path / "t.md")
    assert next(csv.DictReader(open(written[1])))["k-means CRF mIoU"] == ""
    redo = to_run(kmeans, upstream_redone=False)
    assert redo.argv[-1] == "--overwrite"
    assert "nothing to do" not in write_script(redo, s.log_dir, None, []).read_text()
    # made at 64 px: done
    _write(kmeans.artifact, {**_scores(99.6), "settings": {"test_resolution": 64},
                             "flags": {"test_resolution": 64, "seed": 0, "kmeans_samples": 200000}})
    assert "test_kmeans            done" in format_status(plan, s.log_dir)
    assert to_run(kmeans, upstream_redone=False) is None


def test_a_retrained_stage_2_makes_the_old_results_stale(tmp_path):
    s = settings(tmp_path)
    plan = plan_of([Row("toy", str(tmp_path / "random_vit_tiny_8.pth"), "TR")], s)
    by = {st.script: st for st in plan[0][1]}
    for st in plan[0][1][:-1]:
        st.artifact.parent.mkdir(parents=True, exist_ok=True)
        st.artifact.write_bytes(b"made")
    _write(by["test_kmeans"].artifact, _scores(50.0))
    segment, cluster = by["train_front_door_tr"].artifact, by["fine_tuning_tr"].artifact
    upstream = {"segment": {"path": str(segment), "sha256": file_sha256(segment)},
                "cluster": {"path": str(cluster), "sha256": file_sha256(cluster)}}
    _write(by["test_tr"].artifact, {**_scores(40.0), "upstream": upstream, "flags": {"seed": 0}})
    assert "test_tr                done" in format_status(plan, s.log_dir)
    segment.write_bytes(b"retrained")  # a new stage-2 head; the old metrics.json is still there
    status = format_status(plan, s.log_dir)
    assert f"test_tr                stale        made from an earlier segment: {segment} has changed since" in status
    assert "| 40.0 (stale) |" in markdown(table_rows(plan, s))
    # a stage made on top of a stale one is stale too, and run redoes everything after a redone stage
    _write(segment.with_suffix(".json"), {"stage": "front_door_tr", "flags": {"epoch": 7}})
    status = format_status(plan, s.log_dir)
    assert "train_front_door_tr    stale        made with other settings (epoch: recorded 7, the row asks 2)" in status
    assert f"fine_tuning_tr         stale        made on {by['train_front_door_tr'].name}, which is stale now" in status
    assert to_run(by["fine_tuning_tr"], upstream_redone=True).argv[-1] == "--overwrite"


def test_status_and_table_say_what_they_read_and_where_else_the_rows_are(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    toy = ["--dataset", "toy", "--structure", "TR", "--ckpt", str(tmp_path / "random_vit_tiny_8.pth")]
    codebook = tmp_path / "CAUSE/toy/modularity/random_vit_tiny_8/256/modular.npy"  # as `bash run` writes it
    codebook.parent.mkdir(parents=True)
    codebook.write_bytes(b"x")
    for command in ("status", "table"):
        assert main([command, *toy]) == 0
        err = capsys.readouterr().err.splitlines()
        assert err[0] == "reading recipe published: artifacts CAUSE_published/, results results_published/, " \
                         "jobs logs_published/reproduce/"
        assert err[1] == "nothing of these rows under CAUSE_published/ or results_published/ (recipe published), " \
                         "but they have files under CAUSE/ and results/: add --recipe default"
    assert main(["status", *toy, "--recipe", "default", "--", "--max_steps", "2"]) == 0
    err = capsys.readouterr().err.splitlines()
    hashed = flags_hash(('--max_steps', '2'))
    assert err == [f"reading recipe default: artifacts CAUSE/, results results/, jobs logs/reproduce/; the stage "
                   f"flags after -- are {hashed} in the folder names",
                   f"nothing in these rows' folders (256_{hashed}), but their backbone's folders hold other settings "
                   f"(256): pass the sizes, --seed and stage flags after -- that `run` had"]
    assert main(["status", *toy, "--recipe", "default"]) == 0
    assert capsys.readouterr().err.splitlines() == ["reading recipe default: artifacts CAUSE/, results results/, "
                                                    "jobs logs/reproduce/"]


def _published_row_metrics(tmp_path: Path, crfs: list[float], **extra) -> tuple[list, Settings]:
    s = settings(tmp_path, seed=tuple(range(len(crfs))))
    plan = plan_of([Row("cocostuff27", str(tmp_path / "dino_vit_base_8.pth"), "TR")], s)
    for (row, stages), crf in zip(plan, crfs):
        _write(stages[-1].artifact, {**_scores(crf), "flags": {"seed": row.seed}, **extra})
    return plan, s


def test_the_table_has_a_line_per_seed_and_their_aggregate(tmp_path):
    plan, s = _published_row_metrics(tmp_path, [40.0, 44.0, 41.0], code_version="abc1234")
    rows = table_rows(plan, s)
    assert [r.values["seed"] for r in rows] == [0, 1, 2, "all"]
    agg = rows[-1]
    std = statistics.stdev([40.0, 44.0, 41.0])  # 2.08
    assert agg.values["n"] == 3 and agg.values["CRF mIoU"] == pytest.approx(125 / 3)
    assert agg.cell("CRF mIoU") == f"41.7 ± {std:.1f} [40.0, 44.0]" == "41.7 ± 2.1 [40.0, 44.0]"
    assert agg.cell("published in seed range") == "yes: 41.9 in [40.0, 44.0]"
    assert agg.cell("CRF mIoU - published") == "-0.2 ± 2.1 [-1.9, 2.1]"
    assert rows[1].cell("CRF mIoU") == "44.0" and rows[1].cell("commit") == "abc1234"
    written = write_outputs(rows, tmp_path / "t.md")
    got = list(csv.DictReader(open(written[1])))
    assert float(got[3]["CRF mIoU"]) == pytest.approx(125 / 3) and float(got[3]["CRF mIoU std"]) == pytest.approx(std)
    assert (float(got[3]["CRF mIoU min"]), float(got[3]["CRF mIoU max"])) == (40.0, 44.0)
    plan, s = _published_row_metrics(tmp_path / "b", [40.0, 41.0])
    assert table_rows(plan, s)[-1].cell("published in seed range") == "no: 41.9 outside [40.0, 41.0]"


def test_commit_and_cache_columns_come_from_the_records(tmp_path):
    cache = {"key": "0123456789abcdef", "dtype": "fp16", "dir": "/cache/x"}
    plan, s = _published_row_metrics(tmp_path, [40.0], code_version="abc1234", feature_cache=cache)
    codebook = plan[0][1][0].artifact
    codebook.parent.mkdir(parents=True)
    codebook.write_bytes(b"x")
    _write(codebook.with_suffix(".json"), {"stage": "mediator", "code_version": "0ff1ce5", "flags": {}})
    row = table_rows(plan, s)[0]
    assert row.cell("commit") == "0ff1ce5, abc1234 (stages ran at different commits)"
    assert row.cell("cache") == "fp16 01234567"


def _table_with(tmp_path: Path, dataset: str, ckpt: str, crfs: list[float]):
    s = settings(tmp_path, seed=tuple(range(len(crfs))))
    plan = plan_of([Row(dataset, str(tmp_path / ckpt), "TR")], s)
    for (_, stages), crf in zip(plan, crfs):
        _write(stages[-1].artifact, _scores(crf))
    _write(plan[0][1][1].artifact, _scores(30.0))
    return table_rows(plan, s)


def test_the_figure_shows_values_spread_baseline_and_published_only_where_it_exists(tmp_path):
    toy = _table_with(tmp_path / "toy", "toy", "random_vit_tiny_8.pth", [60.0, 64.0])
    fig = figure(toy)
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sorted(legend) == ["CAUSE, measured", "k-means on the backbone", "one seed"]  # toy: nothing published
    assert {t.get_text() for t in ax.texts} >= {"30.0", "62.0\n± 2.8"}
    assert fig.get_size_inches()[0] * fig.dpi >= 640 and ax.title.get_text()
    published = _table_with(tmp_path / "coco", "cocostuff27", "dino_vit_base_8.pth", [40.0])
    assert "published" in [t.get_text() for t in figure(published).axes[0].get_legend().get_texts()]
    written = write_outputs(toy, tmp_path / "out" / "t.md")
    png, pdf = written[2], written[3]
    assert png.read_bytes()[:4] == b"\x89PNG" and pdf.read_bytes()[:4] == b"%PDF"
    width = int.from_bytes(png.read_bytes()[16:20], "big")
    assert width >= 1200  # 200 dpi


def test_settings_namespace_matches_the_stage_parser_defaults():
    """The folder reads --seed and --variant as every stage parses them (0 and '': the published layout)."""
    for stage in ("mediator", "test_tr", "test_kmeans", "segment_images"):
        extra = ["--input", "x", "--out", "y"] if stage == "segment_images" else []
        parsed = build_parser(stage, DATASETS).parse_args(extra)
        assert (parsed.seed, parsed.variant) == (0, "")
        assert setting_folder(2048, parsed) == "2048"
    assert setting_folder(16, argparse.Namespace(seed=3, variant="p64")) == "16_p64_seed3"
