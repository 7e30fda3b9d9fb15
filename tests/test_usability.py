"""What a new user meets on their own data: flag ranges, Ctrl-C and resume, image formats, corrupt
files, partial labels, messages that say what happened, output names, legend, resume state size."""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import crop_dataset
from loader.cropping import crop_command
from loader.dataloader import get_dataset
from loader.files import find_images
from modules.bank import ConceptBank
from stages.stops import resume_command
from tests.conftest import cli
from stages.trainer import Trainer
from loader.class_names import class_info
from utils.config import STAGE_EPOCHS, Bounded, build_parser, dataset_folder
from loader.datasets_table import DATASETS
from utils.errors import UserError
from utils.visualize import GAP, IGNORE_COLOR, LEGEND_ROW, colorize, save_legend
from tests.conftest import TOY_CKPT, TOY_K, one_thread, toy_codebook_path, toy_flags

REPO = Path(__file__).resolve().parents[1]
STRUCTURES = {"mediator": None, "test_kmeans": None, "segment_images": "TR"}
N_CLASSES = 3
RES = 64


# --- defect 4: every numeric flag is range-checked at parse time ------------------------------------

def parsers() -> dict[str, argparse.ArgumentParser]:
    """The parser of every script: the stage scripts' shared one per stage, and crop_dataset.py's."""
    return {**{stage: build_parser(stage, DATASETS) for stage in STAGE_EPOCHS}, "crop_dataset": crop_dataset.build_parser()}


PARSERS = parsers()


def numeric_actions() -> list[tuple[str, argparse.Action]]:
    return [(script, a) for script, p in PARSERS.items() for a in p._actions
            if a.type in (int, float) or isinstance(a.type, Bounded)]


def out_of_range(script: str, kind: Bounded) -> list[str]:
    """Values just outside the range of `kind`; for the mediator's flags also a non-number (and NaN, inf)."""
    values = []
    if kind.lo is not None:
        values.append(str(kind.lo if kind.above else kind.lo - 1))
    if kind.hi is not None:
        values.append(str(kind.hi + 1))
    if script == "mediator":
        values += ["x"] + (["nan", "inf"] if kind.kind is float else [])
    return values


def test_every_numeric_flag_of_every_script_has_a_range_shown_in_help():
    actions = numeric_actions()
    assert len({a.dest for _, a in actions}) >= 18  # batch_size, lr, ports, ... (a guard against finding none)
    for script, action in actions:
        assert isinstance(action.type, Bounded), f"{script} {action.option_strings[0]} has no range check"
        assert action.type.describe() in action.help, action.option_strings[0]


@pytest.mark.parametrize("script,flag,value", [
    (script, a.option_strings[0], v) for script, a in numeric_actions() if isinstance(a.type, Bounded)
    for v in out_of_range(script, a.type)])
def test_out_of_range_value_stops_with_one_line_naming_the_flag(script, flag, value, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [flag, value, "--output_dir", "o", "--results_dir", "r", "--log_dir", "l"]
    if script == "segment_images":
        argv += ["--input", "in", "--out", "out"]

    def body(run):
        raise AssertionError("the stage ran")
    with pytest.raises(SystemExit) as e:
        if script == "crop_dataset":
            crop_dataset.main([flag, value])
        else:
            cli(script, STRUCTURES.get(script, "TR"), body, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: argument {flag}: expected "), err
    described = next(a.type.describe() for a in PARSERS[script]._actions if flag in a.option_strings)
    assert described in err[0]
    assert list(tmp_path.iterdir()) == []


def test_zero_epochs_and_steps_are_accepted_as_the_untrained_baseline():
    args = build_parser("mediator", DATASETS).parse_args(["--epoch", "0", "--max_steps", "0"])
    assert (args.epoch, args.max_steps) == (0, 0)


@pytest.mark.slow
def test_script_with_batch_size_0_prints_one_line_and_writes_nothing(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "train_mediator.py"), "--batch_size", "0"], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: argument --batch_size: expected an integer >= 1, got 0 (--help lists the flags)"]
    assert list(tmp_path.iterdir()) == []


# --- defect 5: Ctrl-C saves the state and prints the resume command ---------------------------------

def mediator_flags(root: Path, out: Path) -> list[str]:
    return toy_flags(root, out, "mediator", epoch=2, max_steps=3, batch_size=2, train_resolution=RES)


def ctrl_c_during_second_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGINT to this process while the trainer's second step runs (global_step 1)."""
    original = Trainer._one_step

    def one_step(self, batch):
        if self.global_step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch)
    monkeypatch.setattr(Trainer, "_one_step", one_step)


@pytest.mark.slow
def test_ctrl_c_saves_state_prints_resume_command_and_resume_matches(toy_root, tmp_path, capsys, monkeypatch):
    from stages.mediator import train_mediator
    straight, killed = tmp_path / "straight", tmp_path / "with space"
    cli("mediator", None, train_mediator, mediator_flags(toy_root, straight))
    ctrl_c_during_second_step(monkeypatch)
    argv = mediator_flags(toy_root, killed)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli("mediator", None, train_mediator, argv)
    monkeypatch.undo()
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    state = toy_codebook_path(killed).with_name("state_mediator.pth")
    assert lines == [f"interrupted: the training state is saved in {state}; resume with: {resume_command(argv)}"]
    assert shlex.split(resume_command(argv))[2:] == [*argv, "--resume"]  # quoted: the folder has a space
    assert torch.load(state, weights_only=False)["global_step"] == 2  # the step in progress finished
    cli("mediator", None, train_mediator, argv + ["--resume"])
    assert "resumed mediator from" in capsys.readouterr().out and not state.exists()
    np.testing.assert_array_equal(np.load(toy_codebook_path(killed)), np.load(toy_codebook_path(straight)))


def test_ctrl_c_in_the_last_step_finishes_the_stage_with_exit_0(toy_root, tmp_path, capsys, monkeypatch):
    """The stage completes (nothing left to resume), so it ends as done: exit 0 (no SystemExit), and what
    depends on it (an afterok job) may go on; one line says that the stop came too late."""
    from stages.mediator import train_mediator
    ctrl_c_during_second_step(monkeypatch)  # here the last step
    cli("mediator", None, train_mediator, toy_flags(toy_root, tmp_path, epoch=1, max_steps=2, batch_size=2,
                                                    train_resolution=RES))
    assert toy_codebook_path(tmp_path).exists() and not list(tmp_path.rglob("state_*.pth"))
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("stopped")] == [
        "stopped (SIGINT) during the last step: the stage finished and its artifact is saved (exit 0); the next "
        "stage starts from it"]


def slow_validation_stopped_by_sigterm(monkeypatch: pytest.MonkeyPatch, seconds: float) -> list[float]:
    """Every trainer gets a validation that sends SIGTERM to this process, then works `seconds` in short
    slices (as batches do); returns the time of each SIGTERM sent."""
    import time
    original, sent = Trainer.__post_init__, []

    def validate() -> dict[str, float]:
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.02)
        return {"linear_acc": 0.0}

    def post_init(self) -> None:
        original(self)
        self.validate = validate
    monkeypatch.setattr(Trainer, "__post_init__", post_init)
    return sent


@pytest.mark.parametrize("epochs", [2, 1])
def test_stop_during_epoch_end_validation_is_honoured_at_once(epochs, toy_root, tmp_path, capsys, monkeypatch):
    """SIGTERM during a 30 s validation: the run exits 143 within seconds with the state of that epoch end
    saved (it was saved before validation), also after the last epoch; resuming gives the same codebook
    as a run never stopped."""
    import time
    from stages.mediator import train_mediator
    argv = toy_flags(toy_root, tmp_path / "stopped", epoch=epochs, max_steps=2, batch_size=2, train_resolution=RES)
    sent = slow_validation_stopped_by_sigterm(monkeypatch, seconds=30.0)
    with pytest.raises(SystemExit) as e:
        cli("mediator", None, train_mediator, argv)
    took = time.monotonic() - sent[0]
    monkeypatch.undo()
    assert e.value.code == 143 and took < 5.0, took
    state = torch.load(toy_codebook_path(tmp_path / "stopped").with_name("state_mediator.pth"), weights_only=False)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 0)
    assert "stopped during the validation after epoch 1" in capsys.readouterr().out
    cli("mediator", None, train_mediator, argv + ["--resume"])
    straight = toy_flags(toy_root, tmp_path / "straight", epoch=epochs, max_steps=2, batch_size=2,
                         train_resolution=RES)
    cli("mediator", None, train_mediator, straight)
    np.testing.assert_array_equal(np.load(toy_codebook_path(tmp_path / "stopped")),
                                  np.load(toy_codebook_path(tmp_path / "straight")))


def test_resume_log_counts_epochs_as_the_bar_does(toy_root, tmp_path, capsys, monkeypatch):
    from stages.mediator import train_mediator
    monkeypatch.setattr(Trainer, "_one_step", lambda self, batch: os.kill(os.getpid(), signal.SIGINT))
    argv = toy_flags(toy_root, tmp_path, epoch=2, max_steps=2, batch_size=2, train_resolution=RES)
    with pytest.raises(SystemExit):
        cli("mediator", None, train_mediator, argv)
    monkeypatch.undo()
    capsys.readouterr()
    cli("mediator", None, train_mediator, argv + ["--resume"])
    captured = capsys.readouterr()
    assert "resumed mediator from" in captured.out and ": epoch 1/2, 1 step(s) of it done" in captured.out
    assert "epoch 1/2" in captured.err  # the bar of the resumed run


@pytest.fixture(scope="module")
def straight_codebook(toy_root, tmp_path_factory) -> np.ndarray:
    """The codebook of an uninterrupted mediator run with `mediator_flags`, in process on one thread (as the
    signalled scripts run: OMP_NUM_THREADS=1)."""
    out = tmp_path_factory.mktemp("straight")
    with one_thread():
        cli("mediator", None, "stages.mediator:train_mediator", mediator_flags(toy_root, out))
    return np.load(toy_codebook_path(out))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_stop_signal_to_the_real_script_saves_once_and_its_command_resumes(signum, straight_codebook, toy_root,
                                                                            tmp_path):
    """A real process with 2 loader workers: the signal to the whole process group (as Ctrl-C in a terminal or
    a scheduler sends it) mid-training; one line naming the command, exit 128 + signal, that command finishes."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "my run"
    proc = subprocess.Popen([sys.executable, str(REPO / "train_mediator.py"),
                             *mediator_flags(toy_root, out), "--num_workers", "2"],
                            env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
    seen = b""
    while b"epoch 1/2" not in seen:  # the first bar: training has started, the workers are up
        chunk = proc.stderr.read1(4096)
        assert chunk, seen.decode()[-2000:]
        seen += chunk
    os.killpg(proc.pid, signum)
    err = (seen + proc.stderr.read()).decode()
    assert proc.wait(timeout=600) == 128 + signum, err[-2000:]
    assert "Traceback" not in err and "killed by signal" not in err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("interrupted")]
    state = toy_codebook_path(out).with_name("state_mediator.pth")
    assert len(lines) == 1, err[-2000:]
    assert lines[0].startswith(f"interrupted: the training state is saved in {state}; resume with: ")
    assert state.exists()
    command = shlex.split(lines[0].split("resume with: ", 1)[1])
    assert command[-1] == "--resume" and str(out / "CAUSE") in command
    resumed = subprocess.run(command, env=env, capture_output=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    np.testing.assert_array_equal(np.load(toy_codebook_path(out)), straight_codebook)


STAGE_SCRIPTS = ("train_mediator.py", "train_front_door_mlp.py", "train_front_door_tr.py", "fine_tuning_mlp.py",
                 "fine_tuning_tr.py", "test_mlp.py", "test_tr.py", "test_kmeans.py", "segment_images.py", "download.py",
                 "crop_dataset.py")


def test_help_answers_without_importing_torch():
    """Every script's --help, in one fresh interpreter: the usage, and torch never imported."""
    probe = ("import runpy, sys, contextlib, io\n"
             "for script in sys.argv[1:]:\n"
             "    sys.argv = [script, '--help']\n"
             "    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
             "        runpy.run_path(script, run_name='__main__')\n"
             "    assert out.getvalue().startswith('usage: '), (script, out.getvalue()[:200])\n"
             "    assert 'torch' not in sys.modules, script\n")
    done = subprocess.run([sys.executable, "-c", probe, *STAGE_SCRIPTS], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


def test_ctrl_c_during_start_up_prints_one_line_and_exits_130(toy_root, tmp_path):
    """SIGINT while the script imports torch (seen in -X importtime's log): one line, no traceback."""
    proc = subprocess.Popen([sys.executable, "-X", "importtime", str(REPO / "train_mediator.py"),
                             *mediator_flags(toy_root, tmp_path)], env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = []
    for line in proc.stderr:
        log.append(line)
        if line.startswith("import time:") and line.split("|")[-1].strip() == "torch._C":  # inside `import torch`
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, "".join(log)[-2000:] + rest[-2000:]
    said = [line for line in rest.splitlines() if not line.startswith("import time:")]
    assert said == ["interrupted (SIGINT) before a training state was saved; one saved earlier, if any, is kept "
                    "(the same command with --resume continues it)"]


def test_ctrl_c_in_a_test_script_offers_no_resume(toy_root, tmp_path, capsys, monkeypatch):
    """An evaluation has no training state: the line says so instead of naming --resume."""
    from stages.evaluate import evaluate
    monkeypatch.setattr("stages.common.setup_run", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit) as e:
        cli("test_tr", "TR", evaluate, toy_flags(toy_root, tmp_path))
    assert e.value.code == 130
    assert capsys.readouterr().err.splitlines() == [
        "interrupted (SIGINT) before it finished; nothing to resume: run the same command again"]


# --- defects 6, 7 and partial labels: a user's folder -----------------------------------------------

FORMATS = {"a.jpg": "JPEG", "b.png": "PNG", "c.webp": "WEBP", "sub/d.tif": "TIFF", "e.bmp": "BMP"}
LABELLED = ("a.jpg", "b.png", "sub/d.tif")


def own_folder(root: Path, corrupt: bool = True) -> Path:
    """images/ in five formats (plus notes.txt and, with `corrupt`, a broken bad.png); labels for three."""
    rng = np.random.default_rng(0)
    for name, fmt in FORMATS.items():
        path = root / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (RES, RES, 3), dtype=np.uint8)).save(path, format=fmt)
    for k, name in enumerate(LABELLED):
        label = root / "labels" / Path(name).with_suffix(".png")
        label.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.full((RES, RES), k % N_CLASSES, np.uint8)
        pixels[0] = 255
        Image.fromarray(pixels).save(label)
    (root / "images" / "notes.txt").write_text("not an image")
    if corrupt:
        (root / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken" * 10)
    return root


def test_every_pillow_format_is_found_and_other_files_are_listed(tmp_path):
    folder = own_folder(tmp_path, corrupt=False) / "images"
    found = find_images(folder)
    assert [p.relative_to(folder).as_posix() for p in found.images] == sorted(FORMATS)
    assert found.skipped == [folder / "notes.txt"]
    assert found.note(folder) == (f"skipped 1 file(s) under {folder} that are not images Pillow opens: notes.txt",)


def test_partial_labels_are_used_where_present(tmp_path):
    root = own_folder(tmp_path, corrupt=False)
    ds = get_dataset("directory", root, "val", RES, n_classes=N_CLASSES)
    assert len(ds) == 5 and ds.has_labels and ds.files.labelled == 3
    assert f"labels: 3 of 5 images have one under {root / 'labels'}; the linear probe and the metrics use " \
           "those 3" in ds.files.notes
    by_name = {ds.image_path(i).relative_to(root / "images").as_posix(): ds[i]["label"] for i in range(len(ds))}
    for k, name in enumerate(LABELLED):
        assert (by_name[name][0] == -1).all() and (by_name[name][1:] == k % N_CLASSES).all()
    for name in set(FORMATS) - set(LABELLED):
        assert (by_name[name] == -1).all()


def test_a_corrupt_image_stops_before_training_or_is_skipped_and_named(tmp_path):
    root = own_folder(tmp_path)
    bad = root / "images" / "bad.png"
    with pytest.raises(UserError, match="unreadable image .*bad.png .*pass --skip_bad_images true") as e:
        get_dataset("directory", root, "train", RES, n_classes=N_CLASSES)
    assert str(bad) in str(e.value)
    ds = get_dataset("directory", root, "train", RES, n_classes=N_CLASSES, skip_bad_images=True)
    assert len(ds) == 5 and bad not in ds.files.images
    assert [n for n in ds.files.notes if n.startswith("skipped unreadable")] == [
        next(n for n in ds.files.notes if str(bad) in n)]


def dir_flags(root: Path, folder: Path, out: Path, **overrides: object) -> list[str]:
    return toy_flags(root, out, **{"dataset": "directory", "data_dir": folder, "n_classes": N_CLASSES,
                                   "train_resolution": RES, "test_resolution": RES, "batch_size": 2,
                                   **overrides})


def stage(name: str, structure: str | None, target: str, argv: list[str]) -> None:
    module, function = target.split(":")
    cli(name, structure, getattr(importlib.import_module(module), function), argv)


def test_corrupt_image_stops_the_script_with_one_line_and_nothing_written(toy_root, tmp_path, capsys):
    folder = own_folder(tmp_path / "mine")
    with pytest.raises(SystemExit) as e:
        stage("mediator", None, "stages.mediator:train_mediator", dir_flags(toy_root, folder, tmp_path / "o"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error")] == [
        next(line for line in err.splitlines() if f"unreadable image {folder / 'images' / 'bad.png'}" in line)]
    assert not [p for p in (tmp_path / "o").rglob("*") if p.is_file()]  # (an empty output folder may be made)


@pytest.mark.slow
def test_own_folder_end_to_end(toy_root, tmp_path, capsys):
    """The README's own-data section on a mixed, partly labelled folder with one corrupt image."""
    folder = own_folder(tmp_path / "my photos")
    out = tmp_path / "o"
    flags = dir_flags(toy_root, folder, out, skip_bad_images="true")
    stage("mediator", None, "stages.mediator:train_mediator", flags)
    log = capsys.readouterr().out
    assert f"skipped 1 file(s) under {folder / 'images'} that are not images Pillow opens: notes.txt" in log
    assert f"skipped unreadable image {folder / 'images' / 'bad.png'}" in log
    assert "labels: 3 of 5 images have one" in log
    stage("front_door_tr", "TR", "stages.front_door:train_front_door", flags)
    stage("fine_tuning_tr", "TR", "stages.fine_tuning:fine_tune", flags)
    stage("test_tr", "TR", "stages.evaluate:evaluate", flags)
    log = capsys.readouterr().out
    assert log.count(f"note: a directory dataset's val split is its training folder ({folder})") == 3  # 2, 3, test
    own = dataset_folder(argparse.Namespace(dataset="directory", data_dir=folder))  # directory_my_photos_<hash>
    results = out / "results" / own / "TR" / TOY_CKPT / str(TOY_K)
    metrics = json.loads((results / "metrics.json").read_text())
    assert (metrics["images"], metrics["labelled_images"]) == (5, 3)
    with open(results / "index.csv") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["image"]).relative_to(folder / "images").as_posix() for r in rows] == sorted(FORMATS)
    assert [bool(r["label"]) for r in rows] == [name in LABELLED for name in sorted(FORMATS)]
    for r in rows:  # the picture numbered i shows the image named in row i
        shown = np.asarray(Image.open(results / "imgs" / f"imgs_{r['index']}.png"))
        assert shown.shape == (RES, RES, 3)
        # no label column (nor an all-magenta labels/ picture) for an image without label
        columns = 5 if r["label"] else 4
        assert Image.open(results / "panels" / f"panels_{r['index']}.png").width == columns * RES + (columns - 1) * GAP
        assert (results / "labels" / f"labels_{r['index']}.png").is_file() == bool(r["label"])
    assert (results / "legend.png").is_file()


def test_probe_skipped_without_labels_is_said_not_shown_as_zero(toy_root, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    folder = tmp_path / "unlabelled"
    own_folder(folder, corrupt=False)
    os.rename(folder / "labels", tmp_path / "elsewhere")
    flags = dir_flags(toy_root, folder, tmp_path / "o", max_steps=1, epoch=1)
    stage("mediator", None, "stages.mediator:train_mediator", flags)
    capsys.readouterr()
    stage("front_door_tr", "TR", "stages.front_door:train_front_door", flags)
    captured = capsys.readouterr()
    assert "[front_door_tr] probe skipped: no labels" in captured.out
    assert "probe=skipped: no labels" in captured.err and "linear=" not in captured.err
    events = EventAccumulator(str(next(next((tmp_path / "o" / "logs").rglob("front_door_tr")).iterdir()))).Reload()
    assert "front_door_tr/contrastive" in events.Tags()["scalars"]
    assert "front_door_tr/linear" not in events.Tags()["scalars"]
    assert "front_door_tr/acc" not in events.Tags()["scalars"]
    assert any("front_door_tr/probe" in tag for tag in events.Tags()["tensors"])


def test_matched_on_an_unlabelled_folder_says_why(toy_root, tmp_path, capsys):
    folder = tmp_path / "unlabelled"
    own_folder(folder, corrupt=False)
    os.rename(folder / "labels", tmp_path / "elsewhere")
    flags = dir_flags(toy_root, folder, tmp_path / "o")
    with pytest.raises(SystemExit) as e:
        stage("segment_images", "TR", "stages.inference:segment_images",
              flags + ["--input", str(folder / "images"), "--out", str(tmp_path / "seg"), "--matched", "true"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --matched maps clusters to classes with the assignment test_tr.py finds from labels, "
                   f"and {folder} has no label files: drop --matched (the outputs then hold cluster ids), or add "
                   f"labels/ to that folder and run test_tr.py"]


# --- messages: quoting and absolute paths -----------------------------------------------------------

def test_suggested_commands_are_shell_quoted():
    data_dir = Path("/data/my photos/it's")
    assert shlex.split(crop_command("cocostuff27", "five", data_dir))[-1] == str(data_dir)
    argv = ["--data_dir", "my photos", "--output_dir", "a;b"]
    assert shlex.split(resume_command(argv))[-5:] == [*argv, "--resume"]


def test_relative_data_dir_error_names_the_absolute_path(toy_root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        stage("mediator", None, "stages.mediator:train_mediator",
              toy_flags(toy_root, tmp_path, dataset="directory", data_dir="nowhere"))
    err = capsys.readouterr().err
    assert f"data directory not found: expected the folder {tmp_path / 'nowhere'}" in err
    with pytest.raises(SystemExit):
        stage("front_door_tr", "TR", "stages.front_door:train_front_door",
              toy_flags(toy_root, tmp_path, output_dir="rel/CAUSE"))
    codebook = tmp_path / "rel" / "CAUSE" / "toy" / "modularity" / TOY_CKPT / str(TOY_K) / "modular.npy"
    assert f"concept codebook (modular.npy) not found: {codebook} " in capsys.readouterr().err


# --- pictures: ignore colour and legend --------------------------------------------------------------

def test_ignore_has_its_own_colour_in_every_dataset_palette():
    for name in DATASETS:
        palette = class_info(name, 5 if name == "directory" else None).palette
        assert not (np.asarray(palette) == IGNORE_COLOR).all(axis=1).any(), name
        np.testing.assert_array_equal(colorize(np.array([[0, -1]]), palette),
                                      [[palette[0], IGNORE_COLOR]])


def test_legend_shows_each_class_colour_and_ignore(tmp_path):
    palette = np.array([[10, 20, 30], [40, 50, 60], [70, 80, 90]], dtype=np.uint8)
    save_legend(tmp_path / "legend.png", ["sky", "road"], palette)
    picture = np.asarray(Image.open(tmp_path / "legend.png").convert("RGB"))
    swatch = [picture[GAP + k * LEGEND_ROW + 2, GAP + 2].tolist() for k in range(3)]
    assert swatch == [[10, 20, 30], [40, 50, 60], list(IGNORE_COLOR)]
    with pytest.raises(UserError, match="3 names but a palette of 2"):
        save_legend(tmp_path / "x.png", ["a", "b", "c"], palette[:2])


# --- resume state size ------------------------------------------------------------------------------

def test_bank_state_keeps_only_stored_vectors_and_resumes_after_wrapping():
    data = torch.Generator().manual_seed(1)
    steps = [(torch.randint(0, 4, (2, 6), generator=data), torch.randn(2, 6, 3, generator=data)) for _ in range(8)]
    a, g_a = ConceptBank(4, 3, capacity=2), torch.Generator().manual_seed(5)
    for index, vectors in steps[:5]:  # capacity 2: every concept has wrapped round its ring
        a.update(index, vectors, generator=g_a)
    state = a.state_dict()
    assert state["vectors"].shape == (len(a), 3) and int(state["fill"].sum()) == len(a)
    b, g_b = ConceptBank(4, 3, capacity=2), torch.Generator()
    b.load_state_dict(state)
    g_b.set_state(g_a.get_state())
    for x, y in zip(a.entries(), b.entries()):
        assert torch.equal(x, y)
    for index, vectors in steps[5:]:
        a.update(index, vectors, generator=g_a)
        b.update(index, vectors, generator=g_b)
        for x, y in zip(a.entries(), b.entries()):
            assert torch.equal(x, y)
    young = ConceptBank(8, 16, capacity=100)
    young.update(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, 16))
    assert young.state_dict()["vectors"].numel() == 2 * 16  # not 8 x 100 x 16


def test_segment_images_inputs_in_every_format_with_skipped_and_unreadable_files_listed(tmp_path):
    from stages.inference import list_inputs
    folder = own_folder(tmp_path) / "images"
    with pytest.raises(UserError, match=f"unreadable image {folder / 'bad.png'}"):
        list_inputs(folder, tmp_path / "out")
    logged: list[str] = []
    pairs = list_inputs(folder, tmp_path / "out", skip_bad=True, log=logged.append)
    assert sorted(name for _, name in pairs) == sorted(str(Path(n).with_suffix("")) for n in FORMATS)
    assert logged[0] == f"skipped 1 file(s) under {folder} that are not images Pillow opens: notes.txt"
    assert logged[1].startswith(f"skipped unreadable image {folder / 'bad.png'} (")
    assert list_inputs(folder / "c.webp", tmp_path / "out") == [(folder / "c.webp", "c")]


def test_a_stop_swallowed_by_an_import_still_stops_the_run(toy_root, tmp_path, monkeypatch, capsys):
    """A library that catches everything while it imports (a bare except) cannot lose Ctrl-C: the run stops
    with the one start-up line once the imports are done, before any model loads."""
    (tmp_path / "swallowing.py").write_text(
        "import os, signal\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "except BaseException:\n"
        "    pass\n"
        "def body(run):\n"
        "    raise AssertionError('the stage ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("stages.common.launch_stage", lambda *a: pytest.fail("launched after a stop"))
    with pytest.raises(SystemExit) as e:
        cli("mediator", None, "swallowing:body", toy_flags(toy_root, tmp_path))
    assert e.value.code == 130
    assert capsys.readouterr().err.splitlines() == [
        "interrupted (SIGINT) before a training state was saved; one saved earlier, if any, is kept "
        "(the same command with --resume continues it)"]

