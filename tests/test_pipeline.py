"""The three training stages on the toy set: artifacts, order, seeds, what trains and what must not."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from loader.dataloader import get_dataset
from loader.toy import TOY_CLASSES
from models import load_backbone
from modules.functional import modularity_loss, stochastic_sampling
from tests.conftest import cli
from stages.fine_tuning import fine_tune
from stages.front_door import train_front_door
from stages.mediator import train_mediator
from tests.conftest import TOY_K as K
from tests.conftest import toy_artifact_dir as artifact_dir
from tests.conftest import toy_codebook_path as codebook_path
from tests.conftest import toy_flags

pytestmark = pytest.mark.slow
R = 90


def run_stage(stage: str, structure: str | None, body, root: Path, out: Path, **flags: object) -> None:
    cli(stage, structure, body, argv=toy_flags(root, out, **flags))


@pytest.fixture(scope="module")
def trained(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mediator, TR front-door and TR fine-tuning, a few steps each."""
    out = tmp_path_factory.mktemp("pipeline")
    run_stage("mediator", None, train_mediator, toy_root, out)
    run_stage("front_door_tr", "TR", train_front_door, toy_root, out)
    run_stage("fine_tuning_tr", "TR", fine_tune, toy_root, out, epoch=1)
    return out


def test_each_stage_writes_its_artifact_and_provenance(trained: Path) -> None:
    codebook = np.load(codebook_path(trained))
    assert codebook.shape == (K, 192) and codebook.dtype == np.float32
    # initialised uniform in [-1/K, 1/K]; trained values leave that box
    assert np.abs(codebook).max() > 1 / K
    for name in ("segment_tr", "cluster_tr"):
        assert (artifact_dir(trained) / f"{name}.pth").is_file()
        meta = json.loads((artifact_dir(trained) / f"{name}.json").read_text())
        assert meta["settings"]["backbone"] == "random_vit_tiny_8"
        assert meta["settings"]["num_codebook"] == K and meta["settings"]["structure"] == "TR"
    meta = json.loads(codebook_path(trained).with_suffix(".json").read_text())
    assert meta["stage"] == "mediator" and meta["flags"]["seed"] == 0
    assert not list(artifact_dir(trained).glob("state_*.pth")), "resume state is removed once the artifact exists"


def copy_inputs_of_fine_tuning(trained: Path, out: Path) -> None:
    """Codebook and stage-2 head (with their JSON) of `trained`, copied under `out`."""
    for src, dst in ((codebook_path(trained), codebook_path(out)),
                     (artifact_dir(trained) / "segment_tr.front_door.pth", artifact_dir(out) / "segment_tr.pth")):
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
        dst.with_suffix(".json").write_bytes(src.with_suffix(".json").read_bytes())


def test_cluster_probe_trains_and_codebook_is_copied(trained: Path, toy_root: Path, tmp_path: Path) -> None:
    # The same seed with zero steps gives the initial probe: training must have moved it.
    copy_inputs_of_fine_tuning(trained, tmp_path)
    run_stage("fine_tuning_tr", "TR", fine_tune, toy_root, tmp_path, epoch=1, max_steps=0)
    initial = torch.load(artifact_dir(tmp_path) / "cluster_tr.pth")["cluster_probe"]
    cluster = torch.load(artifact_dir(trained) / "cluster_tr.pth")
    n_classes = len(TOY_CLASSES)
    assert cluster["cluster_probe"].shape == initial.shape == (n_classes, R)
    assert initial.abs().max() <= 1 / n_classes
    assert not torch.equal(cluster["cluster_probe"], initial)
    np.testing.assert_array_equal(cluster["codebook"].numpy(), np.load(codebook_path(trained)))


@pytest.mark.parametrize("stage,structure,body,needs", [
    ("front_door_tr", "TR", train_front_door, "train_mediator.py"),
    ("front_door_mlp", "MLP", train_front_door, "train_mediator.py"),
])
def test_stage_refuses_to_start_without_the_stage_before(stage, structure, body, needs, toy_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_stage(stage, structure, body, toy_root, tmp_path)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "modular.npy" in err and needs in err


def test_fine_tuning_refuses_without_front_door(trained, toy_root, tmp_path, capsys):
    # a codebook but no MLP head: fine_tuning_mlp must name the missing segment file and the script to run
    out = tmp_path
    target = codebook_path(out)
    target.parent.mkdir(parents=True)
    target.write_bytes(codebook_path(trained).read_bytes())
    target.with_suffix(".json").write_bytes(codebook_path(trained).with_suffix(".json").read_bytes())
    with pytest.raises(SystemExit):
        run_stage("fine_tuning_mlp", "MLP", fine_tune, toy_root, out)
    err = capsys.readouterr().err
    assert "segment_mlp.pth" in err and "train_front_door_mlp.py" in err


def test_same_seed_same_codebook_other_seed_other_codebook(toy_root, tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        run_stage("mediator", None, train_mediator, toy_root, tmp_path / name, seed=seed)
    # a seed other than 0 has a folder of its own, <K>_seed<N> (utils/config.py setting_folder)
    a, b, c = (np.load(codebook_path(tmp_path / n).parent.with_name(f"{K}_seed{s}") / "modular.npy")
               for n, s in (("a", 3), ("b", 3), ("c", 4)))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_mediator_epoch_lowers_modularity_loss_on_toy(toy_root, tmp_path):
    run_stage("mediator", None, train_mediator, toy_root, tmp_path, max_steps=None, batch_size=16)
    backbone = load_backbone(toy_root / "random_vit_tiny_8.pth")
    val = get_dataset("toy", toy_root / "data", "val", 128)
    img = torch.stack([val[i]["img"] for i in range(16)])
    with torch.no_grad():
        feat, _ = stochastic_sampling(backbone(img), generator=torch.Generator().manual_seed(0))
    initial = torch.empty(K, 192).uniform_(-1 / K, 1 / K, generator=torch.Generator().manual_seed(0))
    trained = torch.from_numpy(np.load(codebook_path(tmp_path)))
    assert modularity_loss(trained, feat).item() < modularity_loss(initial, feat).item() - 0.05


def test_labels_never_train_the_teacher_unless_asked(trained, toy_root, tmp_path):
    """Default fine-tuning leaves head_ema untouched; --published_label_leak lets labels train it."""
    for name, leak in (("clean", False), ("leak", True)):
        out = tmp_path / name
        copy_inputs_of_fine_tuning(trained, out)
        before = torch.load(artifact_dir(out) / "segment_tr.pth")
        run_stage("fine_tuning_tr", "TR", fine_tune, toy_root, out, epoch=1, published_label_leak=leak)
        after = torch.load(artifact_dir(out) / "segment_tr.pth")
        teacher = [k for k in before if k.startswith("head_ema.") and before[k].is_floating_point()]
        changed = any(not torch.equal(before[k], after[k]) for k in teacher)
        assert changed == leak
        assert not torch.equal(before["linear.f.weight"], after["linear.f.weight"])  # the probe itself trains
