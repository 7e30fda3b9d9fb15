"""--feature_cache: exact by default, shared across stages and rows, keyed, bounded by the disk."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from loader.datasets_table import DATASETS
from models import save_random_checkpoint
from stages import common, feature_cache
from stages.common import setup_run
from stages.feature_cache import FeatureStore, cache_key, head_cache_record, key_hex
from stages.fine_tuning import fine_tune
from stages.front_door import train_front_door
from stages.mediator import train_mediator
from tests.conftest import TOY_CKPT, cli, toy_artifact_dir, toy_codebook_path, toy_flags
from utils.config import build_parser
from utils.distributed import DistInfo

RES = 32  # every stage of these rows trains at 32 px (4 x 4 tokens): MLP and TR rows share one cache


def key_of(tmp: Path, n: int = 3, **k: object) -> dict:
    """A key of `n` images of 4 tokens x 3 dims."""
    return {"format": 1, "dtype": "fp32", "tokens": 4, "dim": 3, "images": n, **k}


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_shards_round_trip_through_memory_maps_and_other_processes_see_them(tmp_path, dtype):
    writer = FeatureStore(tmp_path, key_of(tmp_path, dtype=dtype), rank=1)
    writer.prepare()
    feat = torch.randn(2, 4, 3)  # (B, N, D)
    writer.write([5, 2], feat)
    reader = FeatureStore(tmp_path, key_of(tmp_path, dtype=dtype))  # another process: knows nothing yet
    reader.prepare()
    assert set(reader.where) == {2, 5}
    got = reader.read([2, 5, 2])  # (3, N, D), any order, repeats allowed
    expected = feat.to(feature_cache.DTYPES[dtype][1])
    assert got.dtype == expected.dtype and torch.equal(got, expected[[1, 0, 1]])
    assert all(isinstance(m, np.memmap) for m in reader.maps.values())


def test_an_interrupted_shard_is_not_read_and_another_key_is_rebuilt(tmp_path):
    store = FeatureStore(tmp_path, key_of(tmp_path))
    store.prepare()
    store.write([0], torch.ones(1, 4, 3))
    # killed between the features and the index file, or inside a write: neither counts
    np.save(tmp_path / "shard-0-dead.npy", np.zeros((1, 4, 3), np.float32))
    (tmp_path / ".shard-0-beef.npy.0123.tmp").write_bytes(b"half")
    again = FeatureStore(tmp_path, key_of(tmp_path))
    assert again.prepare() is None and set(again.where) == {0}
    other = FeatureStore(tmp_path, key_of(tmp_path, n=4))  # same folder, another key (a copied folder)
    assert "another key: rebuilt" in other.prepare()
    assert other.where == {} and not list(tmp_path.glob("shard-*.npy"))
    assert json.loads((tmp_path / "meta.json").read_text())["key"] == key_of(tmp_path, n=4)


def test_the_test_record_names_the_cache_of_any_stage_that_made_the_head(tmp_path):
    used = {"key": "ab", "dtype": "fp32", "dir": "/c"}
    kept = tmp_path / "segment_tr.front_door.pth"
    kept.write_bytes(b"head")
    (tmp_path / "segment_tr.front_door.json").write_text(json.dumps({"feature_cache": used}))
    fine_tuned = {"upstream": {"front_door_segment": {"path": str(kept)}}}
    assert head_cache_record({}, fine_tuned) == used  # only stage 2 read the cache
    assert head_cache_record({"feature_cache": {**used, "key": "cd"}}, fine_tuned)["key"] == "cd"
    assert head_cache_record(None, {"upstream": {}}) is None


def toy_run(root: Path, out: Path, stage: str = "mediator", structure: str | None = None, **flags: object):
    args = build_parser(stage, DATASETS).parse_args(toy_flags(root, out, stage, **{"train_resolution": RES, **flags}))
    args.stage = stage
    run = setup_run(args, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), structure)
    return run, run.dataset("train", run.derived.train_resolution)


def test_the_key_follows_what_the_features_depend_on_and_nothing_else(toy_root, tmp_path):
    def key(stage="mediator", structure=None, **flags):
        return key_hex(cache_key(*toy_run(toy_root, tmp_path, stage, structure, **flags)))

    base = key()
    assert key("front_door_tr", "TR", seed=3) == key("fine_tuning_mlp", "MLP", epoch=4) == base
    other_weights = tmp_path / f"{TOY_CKPT}.pth"  # same architecture and name, other weights
    save_random_checkpoint(TOY_CKPT, other_weights, seed=1)
    changed = [key(train_resolution=48), key(ckpt=other_weights), key(feature_cache_dtype="fp16"),
               key(precision="bf16")]
    assert len({base, *changed}) == 5


def test_a_disk_too_small_is_refused_in_one_line_naming_both_sizes(toy_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(feature_cache, "free_bytes", lambda path: 1000)
    needed = 240 * 16 * 192 * 4  # toy train images x tokens at 32 px x ViT-Tiny width x fp32
    with pytest.raises(SystemExit) as e:
        cli("mediator", None, train_mediator,
            toy_flags(toy_root, tmp_path, train_resolution=RES, feature_cache=tmp_path / "cache"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"({needed} > 1000 bytes)" in err[0] and "--feature_cache" in err[0]
    assert not toy_codebook_path(tmp_path).exists()


def test_a_cache_dtype_without_a_cache_is_refused(toy_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli("mediator", None, train_mediator, toy_flags(toy_root, tmp_path, feature_cache_dtype="bf16"))
    assert e.value.code == 2
    assert "--feature_cache_dtype bf16 needs --feature_cache DIR" in capsys.readouterr().err


def train_rows(root: Path, out: Path, counter: list[int], **flags: object) -> None:
    """Mediator, then the MLP and TR rows (front-door 2 epochs, fine-tuning 2), 1 step an epoch, at RES px;
    `counter` adds up the images the backbone ran on."""
    real = common.Run.features

    def counted(self, img):
        counter.append(img.shape[0])
        return real(self, img)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common.Run, "features", counted)
        go = dict(train_resolution=RES, validate="false", max_steps=1, **flags)
        cli("mediator", None, train_mediator, toy_flags(root, out, **go))
        for structure in ("TR", "MLP"):
            tag = structure.lower()
            cli(f"front_door_{tag}", structure, train_front_door, toy_flags(root, out, epoch=2, **go))
            cli(f"fine_tuning_{tag}", structure, fine_tune, toy_flags(root, out, epoch=2, **go))


ARTIFACTS = ("segment_tr.pth", "cluster_tr.pth", "segment_mlp.pth", "cluster_mlp.pth")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["false", "true"])
def test_rows_trained_from_the_cache_equal_rows_trained_without_it_bit_for_bit(toy_root, tmp_path, recipe):
    cache = tmp_path / "cache"
    computed: list[int] = []
    train_rows(toy_root, tmp_path / "plain", computed, published_recipe=recipe)
    cached: list[int] = []
    train_rows(toy_root, tmp_path / "cached", cached, published_recipe=recipe, feature_cache=cache)
    codebooks = [np.load(toy_codebook_path(tmp_path / o)) for o in ("plain", "cached")]
    assert np.array_equal(*codebooks)
    for name in ARTIFACTS:
        plain, from_cache = (torch.load(toy_artifact_dir(tmp_path / o) / name) for o in ("plain", "cached"))
        assert plain.keys() == from_cache.keys()
        assert all(torch.equal(plain[k], from_cache[k]) for k in plain), name
    # one cache for the five stages of both rows; every image computed once, the rest read back
    (folder,) = [p for p in cache.iterdir()]
    written = np.concatenate([np.load(f) for f in folder.glob("shard-*.idx.npy")])
    assert len(written) == len(set(written.tolist())) == sum(cached)
    assert sum(computed) == 8 * (1 + 2 * (2 + 2))  # batch 8, 1 step x 9 epochs in all
    assert sum(cached) < sum(computed) / 2
    record = json.loads((toy_artifact_dir(tmp_path / "cached") / "cluster_tr.json").read_text())["feature_cache"]
    assert record == {"key": key_hex(json.loads((folder / "meta.json").read_text())["key"]), "dtype": "fp32",
                      "dir": str(folder.resolve())}
    assert "feature_cache" not in json.loads((toy_artifact_dir(tmp_path / "plain") / "cluster_tr.json").read_text())


@pytest.mark.slow
def test_a_rounded_cache_is_a_setting_of_the_artifact(toy_root, tmp_path, capsys):
    flags = dict(train_resolution=RES, validate="false", epoch=1)
    cli("mediator", None, train_mediator, toy_flags(toy_root, tmp_path, **flags))
    cli("front_door_tr", "TR", train_front_door,
        toy_flags(toy_root, tmp_path, feature_cache=tmp_path / "c", feature_cache_dtype="fp16", **flags))
    record = json.loads((toy_artifact_dir(tmp_path) / "segment_tr.json").read_text())
    assert record["settings"]["front_door_tr.feature_cache_dtype"] == "fp16"
    assert record["feature_cache"]["dtype"] == "fp16"
    (folder,) = [p for p in (tmp_path / "c").iterdir()]
    shard = next(f for f in folder.glob("shard-*.npy") if not f.name.endswith(".idx.npy"))
    assert np.load(shard).dtype == np.float16
    with pytest.raises(SystemExit) as e:  # the same stage without the cache would train on exact features
        cli("front_door_tr", "TR", train_front_door, toy_flags(toy_root, tmp_path, **flags))
    assert e.value.code == 2
    assert "front_door_tr.feature_cache_dtype: artifact has 'fp16', this run has fp32" in capsys.readouterr().err


def test_reproduce_and_bash_run_give_one_cache_to_the_training_stages_only(tmp_path, capsys):
    from launch.cli import main
    from launch.rows import Row, row_stages
    from tests.test_reproduce import _run_script_flags, settings

    shared = str(tmp_path / "cache")
    for row in (Row("toy", "c/random_vit_tiny_8.pth", "MLP"), Row("toy", "c/random_vit_tiny_8.pth", "TR")):
        for st in row_stages(row, settings(tmp_path, feature_cache=shared)):
            training = not st.script.startswith("test_")
            assert (list(st.argv[st.argv.index("--feature_cache"):][:2]) == ["--feature_cache", shared]) \
                if training else "--feature_cache" not in st.argv, st.script
    assert main(["run", "--dataset", "toy", "--log_dir", str(tmp_path / "l"), "--", "--feature_cache", "x"]) == 2
    assert "--feature_cache after --: give it to reproduce.py itself" in capsys.readouterr().err
    flags = _run_script_flags(tmp_path, "toy", "fine_tuning_tr.py", feature_cache=shared, feature_cache_dtype="bf16")
    assert flags[flags.index("--feature_cache"):][:4] == ["--feature_cache", shared, "--feature_cache_dtype", "bf16"]
    assert "--feature_cache" not in _run_script_flags(tmp_path, "toy", "test_tr.py", feature_cache=shared)
