"""--published_recipe: rank 0's shard in torch's DistributedSampler order, the switches it sets and
records, one process = rank 0 of four Gloo processes, and no mixing with non-recipe artifacts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from loader.sampler import EpochSampler, make_loader
from loader.toy import TOY_COUNTS
from tests.conftest import cli
from stages.fine_tuning import fine_tune
from stages.front_door import train_front_door
from stages.mediator import train_mediator
from stages.segments import clip_norm
from stages.trainer import Trainer
from tests.conftest import one_thread, toy_artifact_dir, toy_codebook_path
from tests.toy_fixtures import flags
from utils.config import build_parser
from loader.datasets_table import DATASETS
from utils.errors import UserError
from stages.recipe import recipe_precision, resolve_switches

REPO = Path(__file__).resolve().parent.parent
RECIPE = {"published_recipe": "true"}


@pytest.mark.parametrize("length", [3, 13, 64, 240])
@pytest.mark.parametrize("epoch", [0, 1, 5])
def test_recipe_order_is_distributed_samplers(length: int, epoch: int):
    """Every rank's shard equals torch's DistributedSampler(num_replicas=4, shuffle=True, seed=0) after set_epoch."""
    for rank in range(4):
        torch_sampler = DistributedSampler(range(length), num_replicas=4, rank=rank, shuffle=True, seed=0)
        torch_sampler.set_epoch(epoch)
        ours = EpochSampler(length, seed=0, epoch=epoch, rank=rank, world_size=4, torch_order=True)
        assert ours.indices() == list(torch_sampler)
        assert len(ours) == len(torch_sampler)


def test_recipe_batches_are_the_published_loaders():
    """Batches of 16 with the last one partial (the published DataLoader keeps drop_last=False)."""
    data = list(range(100))
    torch_sampler = DistributedSampler(data, num_replicas=4, rank=0, shuffle=True, seed=0)
    torch_sampler.set_epoch(1)
    published = [b.tolist() for b in DataLoader(data, batch_size=16, sampler=torch_sampler)]
    ours = [b.tolist() for b in make_loader(data, 16, 0, torch.device("cpu"), epoch=1, world_size=4,
                                            torch_order=True)]
    assert ours == published and [len(b) for b in ours] == [16, 9]


def args_of(stage: str, *argv: str) -> SimpleNamespace:
    args = build_parser(stage, DATASETS).parse_args(list(argv))
    resolve_switches(args)
    return args


def test_recipe_sets_the_published_switches():
    small = args_of("fine_tuning_tr", "--ckpt", "checkpoint/dino_vit_small_8.pth", "--published_recipe", "true")
    assert (small.published_12_heads, small.published_label_leak) == (True, True)
    base = args_of("fine_tuning_tr", "--ckpt", "checkpoint/dino_vit_base_8.pth", "--published_recipe", "true")
    assert base.published_12_heads is False  # only DINO ViT-S had 12 heads
    plain = args_of("fine_tuning_tr", "--ckpt", "checkpoint/dino_vit_small_8.pth")
    assert (plain.published_12_heads, plain.published_label_leak, plain.precision) == (False, False, "auto")
    alone = args_of("fine_tuning_tr", "--published_label_leak", "true")  # a single quirk without the recipe
    assert alone.published_label_leak is True and alone.published_recipe is False


def test_recipe_precision_is_fp16_with_a_recorded_cpu_fallback():
    assert recipe_precision("auto", "cuda") == ("fp16", None)
    assert recipe_precision("fp16", "cpu") == ("fp16", None)  # asked for: CPU fp16 autocast, slow
    precision, note = recipe_precision("auto", "cpu")
    assert precision == "fp32" and "fp16" in note


@pytest.mark.parametrize("argv,named", [
    (["--precision", "bf16"], "--precision bf16"),
    (["--published_label_leak", "false"], "--published_label_leak false"),
    (["--ckpt", "checkpoint/dino_vit_small_16.pth", "--published_12_heads", "false"], "--published_12_heads false"),
])
def test_a_switch_against_the_recipe_is_refused(argv: list[str], named: str):
    with pytest.raises(UserError, match=f"{named} contradicts --published_recipe true"):
        args_of("fine_tuning_tr", "--published_recipe", "true", *argv)


@pytest.mark.parametrize("dataset,structure,stage2,stage3", [
    ("cocostuff27", "TR", 2.0, 2.0), ("cocostuff27", "MLP", 0.1, 0.1), ("cityscapes", "TR", 1.0, 1.0),
    ("pascalvoc", "TR", 2.0, None), ("coco81", "MLP", 0.1, None), ("coco171", "TR", 2.0, None),
])
def test_published_clipping(dataset: str, structure: str, stage2: float, stage3: float | None):
    """The published stage 3 clips only COCO-Stuff and Cityscapes; stage 2 uses the COCO values for the
    datasets the published stage 2 refuses (inferred); the default mode clips every dataset in both."""
    def run(recipe: bool) -> SimpleNamespace:
        return SimpleNamespace(structure=structure, recipe=recipe,
                               derived=SimpleNamespace(settings=DATASETS[dataset]))
    assert clip_norm(run(True)) == stage2 and clip_norm(run(True), fine_tuning=True) == stage3
    assert clip_norm(run(False), fine_tuning=True) == stage2


def test_recipe_on_more_than_four_processes_is_refused():
    from stages.recipe import check_processes
    check_processes(True, 4)
    check_processes(False, 8)
    with pytest.raises(UserError, match="at most 4 processes"):
        check_processes(True, 5)


@pytest.mark.slow
def test_recipe_trains_on_exactly_rank0s_shard(toy_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    trained: list[int] = []
    one_step = Trainer._one_step
    monkeypatch.setattr(Trainer, "_one_step", lambda self, batch: (trained.extend(batch["ind"].tolist()),
                                                                   one_step(self, batch))[1])
    cli("mediator", None, train_mediator, flags(toy_root, tmp_path, epoch=2, max_steps=2, **RECIPE))
    expected = []
    for epoch in range(2):
        sampler = DistributedSampler(range(TOY_COUNTS["train"]), num_replicas=4, rank=0, shuffle=True, seed=0)
        sampler.set_epoch(epoch)
        expected += list(sampler)[:2 * 8]  # 2 steps of batch 8
    assert trained == expected


@pytest.fixture(scope="module")
def recipe_run(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three stages under the recipe, one step each."""
    out = tmp_path_factory.mktemp("recipe")
    cli("mediator", None, train_mediator, flags(toy_root, out, max_steps=1, **RECIPE))
    cli("front_door_tr", "TR", train_front_door, flags(toy_root, out, epoch=1, max_steps=1, val_images=4, **RECIPE))
    cli("fine_tuning_tr", "TR", fine_tune, flags(toy_root, out, epoch=1, max_steps=1, val_images=4, **RECIPE))
    return out


@pytest.mark.slow
def test_recipe_settings_are_recorded(recipe_run: Path):
    codebook = json.loads(toy_codebook_path(recipe_run).with_suffix(".json").read_text())["settings"]
    assert codebook["mediator.lr"] == 0.004 and codebook["mediator.precision"] == "fp32"  # CPU fallback
    assert "fp16" in codebook["mediator.precision_fallback"]
    assert codebook["published_recipe"] is True and codebook["mediator.published_loss_precision"] is True
    cluster = json.loads((toy_artifact_dir(recipe_run) / "cluster_tr.json").read_text())["settings"]
    assert cluster["fine_tuning_tr.lr"] == 0.004 and cluster["fine_tuning_tr.published_loss_precision"] is True
    assert cluster["published_label_leak"] is True and cluster["published_recipe"] is True
    assert cluster["published_12_heads"] is False  # the toy backbone is no DINO ViT-S
    assert cluster["fine_tuning_tr.clip"] == DATASETS["toy"].clip_tr
    segment = json.loads((toy_artifact_dir(recipe_run) / "segment_tr.json").read_text())["settings"]
    assert segment["front_door_tr.lr"] == 0.004 and segment["front_door_tr.clip"] == DATASETS["toy"].clip_tr
    assert "world_size" not in " ".join(segment)  # a replica's result does not depend on the process count


@pytest.mark.slow
def test_a_later_stage_refuses_to_mix_recipe_and_default(recipe_run: Path, toy_root: Path, capsys):
    with pytest.raises(SystemExit) as e:
        cli("front_door_tr", "TR", train_front_door, flags(toy_root, recipe_run, epoch=1, max_steps=1,
                                                            validate="false"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "published_recipe: artifact has True, this run has False" in err[0]


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_one_process_equals_rank0_of_four_gloo_processes(recipe_run: Path, toy_root: Path, tmp_path: Path):
    """Each Gloo process trains its own replica on its own shard; rank 0 saves the one-process result."""
    outs = {}
    for name in ("one", "four"):
        out = outs[name] = tmp_path / name
        target = toy_codebook_path(out)
        target.parent.mkdir(parents=True)
        for suffix in (".npy", ".json"):
            target.with_suffix(suffix).write_bytes(toy_codebook_path(recipe_run).with_suffix(suffix).read_bytes())
    stage_flags = {n: flags(toy_root, outs[n], stage="front_door_tr", epoch=1, max_steps=2, validate="false", **RECIPE)
                   for n in outs}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
            "train_front_door_tr.py", *stage_flags["four"]]
    done = subprocess.run(argv, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with one_thread():  # the one process is this one, on one thread as each of the four (OMP_NUM_THREADS=1)
        cli("front_door_tr", "TR", train_front_door, stage_flags["one"])
    one, four = (torch.load(toy_artifact_dir(outs[n]) / "segment_tr.pth") for n in ("one", "four"))
    assert one.keys() == four.keys()
    for key, value in one.items():
        assert torch.equal(value, four[key]), key
    settings = [json.loads((toy_artifact_dir(outs[n]) / "segment_tr.json").read_text())["settings"]
                for n in ("one", "four")]
    assert settings[0] == settings[1]


def test_recipe_teacher_shares_the_students_storage_until_the_first_ema_update():
    """Published stage 2 starts the teacher as `param_ema.data = param.data`: the optimizer step moves the
    teacher with the student, and the first EMA update (a new tensor) leaves it at the stepped student."""
    from modules.segment import SegmentMLP
    from stages.front_door import separate_teacher_storage, share_teacher_storage
    torch.manual_seed(0)
    segment = SegmentMLP(8, reduced_dim=4, projection_dim=6, n_classes=3)
    with torch.no_grad():   # a teacher that differs from the student, as after --load_segment
        for p in segment.head_ema.parameters():
            p.add_(1.0)
    share_teacher_storage(segment)
    student = [p.detach().clone() for p in segment.head.parameters()]
    assert all(torch.equal(t, s) for t, s in zip(segment.head_ema.parameters(), student))   # the student's values
    with torch.no_grad():   # an optimizer step on the student
        for p in [*segment.head.parameters(), *segment.projection_head.parameters()]:
            p.add_(0.5)
    stepped = [p.detach().clone() for p in segment.head.parameters()]
    separate_teacher_storage(segment)
    segment.ema_update(0.99)
    for s, t, before in zip(segment.head.parameters(), segment.head_ema.parameters(), stepped):
        assert torch.equal(s, before)                                 # the EMA left the student as stepped
        torch.testing.assert_close(t, before, rtol=1e-6, atol=1e-6)   # 0.99 stepped + 0.01 stepped
        assert t.data_ptr() != s.data_ptr()
    with torch.no_grad():   # from now on the teacher is its own tensor
        next(segment.head.parameters()).add_(1.0)
    assert not torch.equal(next(segment.head.parameters()), next(segment.head_ema.parameters()))


@pytest.mark.slow
def test_recipe_run_teacher_is_the_stepped_student_after_one_step(recipe_run: Path, toy_root: Path, tmp_path: Path):
    """One stage-2 step under the recipe (on the recipe run's codebook): teacher = stepped student."""
    target = toy_codebook_path(tmp_path)
    target.parent.mkdir(parents=True)
    for suffix in (".npy", ".json"):
        target.with_suffix(suffix).write_bytes(toy_codebook_path(recipe_run).with_suffix(suffix).read_bytes())
    cli("front_door_tr", "TR", train_front_door, flags(toy_root, tmp_path, epoch=1, max_steps=1, validate="false",
                                                        **RECIPE))
    state = torch.load(toy_artifact_dir(tmp_path) / "segment_tr.pth", weights_only=True)
    student = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    assert student
    for k, v in student.items():   # 0.99 x + 0.01 x rounds to within an ulp of x; the copy start is lr away
        torch.testing.assert_close(state[f"head_ema.{k}"], v, rtol=1e-6, atol=1e-7)


def test_readme_differences_table_lists_every_remaining_difference():
    """Issue 20's list: each remaining difference of the published recipe has its row."""
    text = (REPO / "docs" / "differences.md").read_text().split("## Where this implementation differs from the published code", 1)[1]
    rows = [line for line in text.split("\n## ", 1)[0].splitlines() if line.startswith("| ")]
    wanted = {"teacher start": "param_ema.data = param.data", "positive-pair numerator": "positive pairs' numerator",
              "fp32 /temp and shift": "`/ temp` and the max shift", "bank normalised": "bank vectors normalised before",
              "modularity backward": "modularity backward", "non-finite steps": "a non-finite step",
              "Cityscapes crop numbering": "unsorted `os.listdir` order",
              "stage 2 on VOC/COCO-81/COCO-171": "no published code can produce the stage 2"}
    assert {item: any(words in row for row in rows) for item, words in wanted.items()} == \
        {item: True for item in wanted}
