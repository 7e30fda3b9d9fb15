"""Weights the user already has (the Hugging Face cache, torch's hub cache) and hubconf.py's entries, against
a fake cache laid out as huggingface_hub lays it out and the loopback mirror of test_download.py."""
from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import huggingface_hub.constants
import torch
from safetensors.torch import save as safetensors_bytes

import download
from downloads import sources
from downloads.checksums import Checksum
from downloads.sources import BACKBONES, BackboneSource, PublishedRow
from models import load_backbone, save_random_checkpoint
from modules.segment import Cluster, SegmentTR
from tests.new_backbones import DEPTH, image, tokens
from tests.test_backbones import official_tensors
from tests.test_backbones_hf import dinov2_config, hf_dinov2
from tests.test_layering import imported_packages
from tests.test_download import TINY_URL, drive_id, folder_page, saved, site, tiny_backbone, tiny_entry  # noqa: F401
from tests.toy_fixtures import R
from utils.config import checkpoint_stem
from utils.errors import UserError
from utils.hf_hub import resolve_hub_id, weights_file

ROOT = Path(__file__).resolve().parents[1]
REVISION = "0123456789abcdef0123456789abcdef01234567"


def cache_snapshot(cache: Path, repo_id: str, revision: str, files: dict[str, bytes]) -> Path:
    """`repo_id` at commit `revision` in a Hugging Face cache, laid out as huggingface_hub lays it out:
    `models--<org>--<name>/blobs/<etag>` (sha256 for LFS files, git's blob sha1 otherwise),
    `snapshots/<revision>/<file>` relative links to those blobs, `refs/main` holding the revision."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    for name, data in files.items():
        lfs = name.endswith((".safetensors", ".bin"))
        etag = hashlib.sha256(data).hexdigest() if lfs else \
            hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        (repo / "blobs" / etag).write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*[".."] * (len(Path(name).parts) + 1), "blobs", etag))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def hf_small_files(**weights: bytes) -> dict[str, bytes]:
    return {"config.json": json.dumps(dinov2_config(384, 6, False)).encode(), **weights}


@pytest.fixture(scope="module")
def small_tensors() -> dict[str, torch.Tensor]:
    """facebook/dinov2-small's keys (random weights, DEPTH blocks)."""
    return {k: v.contiguous() for k, v in hf_dinov2(official_tensors(384, 14, 37, DEPTH, layer_scale=True),
                                                    DEPTH).items()}


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_tensors) -> Path:
    """facebook/dinov2-small in the cache huggingface_hub uses (its HF_HUB_CACHE setting); offline."""
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache_snapshot(cache, "facebook/dinov2-small", REVISION,
                          hf_small_files(**{"model.safetensors": safetensors_bytes(small_tensors)}))


def test_hugging_face_id_loads_from_the_cache_offline(hf_cache, monkeypatch):
    from_id, from_folder = load_backbone("facebook/dinov2-small"), load_backbone(hf_cache)
    img = image(56, 42)
    assert torch.equal(tokens(from_id, img), tokens(from_folder, img))
    assert resolve_hub_id(f"facebook/dinov2-small@{REVISION}").folder == hf_cache
    assert checkpoint_stem("facebook/dinov2-small") == f"facebook--dinov2-small@{REVISION[:12]}"
    with pytest.raises(UserError, match="facebook/dinov2-base: no such file or folder, and not in the Hugging "
                                        "Face cache .*HF_HUB_OFFLINE=1"):
        load_backbone("facebook/dinov2-base")

    def no_network(*args, **kwargs):
        raise AssertionError("a cached model needs no network")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert resolve_hub_id("facebook/dinov2-small").folder == hf_cache


def test_sharded_and_bin_only_models_load_from_the_cache(hf_cache, small_tensors):
    """Shards named by model.safetensors.index.json, pytorch_model.bin, and .bin shards named by
    pytorch_model.bin.index.json: the same weights as the single safetensors file, the same tokens."""
    cache = hf_cache.parents[2]
    names = sorted(small_tensors)
    halves = {"model-00001-of-00002": names[: len(names) // 2], "model-00002-of-00002": names[len(names) // 2:]}

    def index(suffix: str) -> bytes:
        return json.dumps({"metadata": {"total_size": 0},
                           "weight_map": {k: f"{shard}{suffix}" for shard, keys in halves.items() for k in keys}}).encode()

    def part(keys: list[str]) -> dict[str, torch.Tensor]:
        return {k: small_tensors[k] for k in keys}

    layouts = {
        "facebook/sharded": {"model.safetensors.index.json": index(".safetensors")}
        | {f"{shard}.safetensors": safetensors_bytes(part(keys)) for shard, keys in halves.items()},
        "facebook/bin-only": {"pytorch_model.bin": saved(small_tensors)},
        "facebook/bin-sharded": {"pytorch_model.bin.index.json": index(".bin")}
        | {f"{shard}.bin": saved(part(keys)) for shard, keys in halves.items()},
    }
    img = image(56, 42)
    reference = tokens(load_backbone(hf_cache), img)
    for repo_id, weights in layouts.items():
        folder = cache_snapshot(cache, repo_id, REVISION, hf_small_files(**weights))
        assert resolve_hub_id(repo_id).folder == folder
        assert torch.equal(tokens(load_backbone(repo_id), img), reference), repo_id
        expected = "pytorch_model.bin" if repo_id == "facebook/bin-only" else next(n for n in weights if "index" in n)
        assert weights_file(repo_id) == folder / expected   # what provenance records name
    (cache / "models--facebook--sharded" / "snapshots" / REVISION / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match=r"model\.safetensors\.index\.json: names 2 shards, 1 missing: "
                                        r"model-00002-of-00002\.safetensors"):
        load_backbone(cache / "models--facebook--sharded" / "snapshots" / REVISION)


def test_the_cache_folder_is_huggingface_hubs_own_setting(tmp_path, small_tensors):
    """The legacy HUGGINGFACE_HUB_CACHE, read by huggingface_hub itself, is where the id is found (a fresh
    interpreter: the library reads its settings when imported)."""
    cache = tmp_path / "legacy"
    snapshot = cache_snapshot(cache, "facebook/dinov2-small", REVISION,
                              hf_small_files(**{"model.safetensors": safetensors_bytes(small_tensors)}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env |= {"HUGGINGFACE_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", "from utils.hf_hub import resolve_hub_id; "
                           "print(resolve_hub_id('facebook/dinov2-small').folder)"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == str(snapshot), done.stderr[-2000:]


def test_a_release_in_the_torch_hub_cache_is_not_downloaded_again(site, tiny_entry, tiny_backbone, tmp_path,
                                                                     monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "random_tiny.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(tiny_backbone)
    assert download.main(["backbone", "random_vit_tiny_8", "--dest", str(tmp_path / "ckpt")]) == 0
    assert (tmp_path / "ckpt" / "random_vit_tiny_8.pth").read_bytes() == tiny_backbone
    assert site.requests == []
    assert "from the torch hub cache" in capsys.readouterr().out

    cached.write_bytes(b"not a checkpoint")  # a cached file that does not load: downloaded instead
    site.files["/test/random_tiny.pth"] = tiny_backbone
    assert download.main(["backbone", "random_vit_tiny_8", "--dest", str(tmp_path / "other")]) == 0
    assert (tmp_path / "other" / "random_vit_tiny_8.pth").read_bytes() == tiny_backbone
    assert len(site.requests) >= 1


def test_a_torch_cache_file_with_another_checksum_is_named_left_alone_and_downloaded_fresh(
        site, tiny_backbone, tmp_path, monkeypatch, capsys):
    """A cached release that loads strictly but has another published checksum used to be linked, found wrong
    and unlinked, on every run, so `--url` was never reached. It is named and left alone; a fresh copy comes
    from the URL (every run)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    sha = hashlib.sha256(tiny_backbone).hexdigest()
    monkeypatch.setitem(BACKBONES, "random_vit_tiny_8", BackboneSource(
        "random_tiny.pth", TINY_URL, 1, checksum=Checksum("sha256", sha[:8], "the file name")))
    other = tmp_path / "other.pth"   # another random tiny backbone: it loads strictly, its checksum differs
    save_random_checkpoint("random_vit_tiny_8", other, seed=1)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "random_tiny.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(other.read_bytes())
    before = (cached.stat().st_mtime_ns, cached.read_bytes())
    site.files["/mirror/fresh.pth"] = tiny_backbone
    for dest in ("first", "second"):
        assert download.main(["backbone", "random_vit_tiny_8", "--dest", str(tmp_path / dest),
                              "--url", "https://example.org/mirror/fresh.pth"]) == 0
        out = capsys.readouterr().out
        assert f"{cached}: in the torch hub cache, but its sha256 " in out and f"is not the published {sha[:8]}" in out
        final = tmp_path / dest / "random_vit_tiny_8.pth"
        assert final.read_bytes() == tiny_backbone and final.stat().st_ino != cached.stat().st_ino
    assert [path for path, _ in site.requests] == ["/mirror/fresh.pth"] * 2
    assert (cached.stat().st_mtime_ns, cached.read_bytes()) == before   # the user's cache is untouched


def test_backbone_entries(site, tiny_entry, tiny_backbone, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    site.files["/test/random_tiny.pth"] = tiny_backbone
    model = torch.hub.load(str(ROOT), "random_vit_tiny_8", source="local", ckpt_dir=str(tmp_path / "ckpt"))
    release = tmp_path / "release.pth"
    release.write_bytes(tiny_backbone)
    img = image(32, 40)
    assert torch.equal(tokens(model, img), tokens(load_backbone(release, name="random_vit_tiny_8"), img))
    random = torch.hub.load(str(ROOT), "random_vit_tiny_8", source="local", pretrained=False)
    assert (random.patch_size, random.embed_dim) == (8, 192)
    assert not torch.equal(random.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_pretrained_cause_tr_fetches_the_published_row(site, tiny_entry, tiny_backbone, tmp_path, monkeypatch):
    """A published row of the toy set on the tiny backbone, served by the loopback mirror as Drive folders."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    heads, books, seg, clu, mod = (drive_id(t) for t in ("HEADS", "BOOKS", "SEG", "CLU", "MOD"))
    row = PublishedRow("cocostuff27", "random_vit_tiny_8", "TR", 0.0, 0.0, heads, books)
    monkeypatch.setattr(sources, "PUBLISHED", (*sources.PUBLISHED, row))
    torch.manual_seed(0)
    dim, k, resolution = 192, 2048, 64
    segment, cluster = SegmentTR(dim, (resolution // 8) ** 2, R, 2048, 27), Cluster(dim, R, k, 27)
    codebook = io.BytesIO()
    np.save(codebook, cluster.codebook.detach().numpy())
    site.html[f"/embeddedfolderview?id={heads}"] = folder_page("Seg Head Parameter", [("segment_tr.pth", seg, False),
                                                                                      ("cluster_tr.pth", clu, False)])
    site.html[f"/embeddedfolderview?id={books}"] = folder_page("Concept ClusterBook", [("modular.npy", mod, False)])
    site.files |= {f"/drive/{seg}": saved(segment.state_dict()), f"/drive/{clu}": saved(cluster.state_dict()),
                   f"/drive/{mod}": codebook.getvalue(), "/test/random_tiny.pth": tiny_backbone}
    model = torch.hub.load(str(ROOT), "cause_tr", source="local", dataset="cocostuff27", ckpt="random_vit_tiny_8",
                           pretrained=True, output_dir=str(tmp_path / "CAUSE"), ckpt_dir=str(tmp_path / "ckpt"),
                           train_resolution=resolution, test_resolution=resolution, device="cpu")
    assert (tmp_path / "CAUSE" / "cocostuff27" / "random_vit_tiny_8" / "2048" / "segment_tr.pth").is_file()
    assert torch.equal(model.cluster_probe, cluster.cluster_probe)
    assert torch.equal(model.segment.head_ema.tr.linear1.weight, segment.head_ema.tr.linear1.weight)
    ids = model.predict(torch.rand(1, 3, 40, 50))
    assert ids.shape == (1, 40, 50) and 0 <= ids.min() and ids.max() < 27


def test_unknown_backbone_or_row_is_one_line(tmp_path):
    with pytest.raises(UserError, match="no published CAUSE-TR row for --dataset toy with dino_vit_huge_8"):
        torch.hub.load(str(ROOT), "cause_tr", source="local", dataset="toy", ckpt="dino_vit_huge_8",
                       pretrained=True, output_dir=str(tmp_path / "CAUSE"))
    with pytest.raises(UserError, match="dino_vit_huge_8: no such checkpoint file"):
        torch.hub.load(str(ROOT), "cause_mlp", source="local", dataset="toy", ckpt="dino_vit_huge_8",
                       output_dir=str(tmp_path / "CAUSE"), device="cpu")


WITHOUT_GDOWN = """
import json, sys
sys.modules["gdown"] = None   # import gdown raises ImportError
import torch
from utils.errors import UserError
root, kwargs = sys.argv[1], json.loads(sys.argv[2])
model = torch.hub.load(root, "cause_tr", source="local", pretrained=False, **kwargs)
print(tuple(model.predict(torch.rand(1, 3, 40, 50)).shape))
try:
    torch.hub.load(root, "cause_tr", source="local", dataset="cocostuff27", ckpt="dino_vit_base_8", pretrained=True,
                   output_dir=kwargs["output_dir"] + "_published")
except UserError as e:
    print(e)
print(json.dumps(sorted(m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None))))
"""


@pytest.mark.slow
def test_hub_entries_load_without_gdown_and_list_what_they_import(toy_root, tmp_path):
    """gdown is imported only when Google Drive is asked for the published heads; `dependencies` lists every
    package the modules loaded by the entries import."""
    from tests.test_api import hub_kwargs
    from tests.toy_fixtures import train_toy

    kwargs = hub_kwargs(toy_root, train_toy(toy_root))
    done = subprocess.run([sys.executable, "-c", WITHOUT_GDOWN, str(ROOT), json.dumps(kwargs)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    shape, refusal, modules = done.stdout.strip().split("\n")
    assert shape == "(1, 40, 50)"
    assert refusal == ("the published CAUSE heads come from Google Drive through gdown, which is not installed: "
                       "pip install 'gdown>=6.5.1,<6.6'")
    ours = {Path(f) for f in json.loads(modules) if Path(f).is_relative_to(ROOT) and "tests" not in Path(f).parts
            and not Path(f).is_relative_to(sys.prefix)}  # a virtual environment inside the checkout (CI's) is not ours
    project = {p.stem if p.is_file() else p.name for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    imported = set().union(*(imported_packages(f.read_text(), deferred=False) for f in ours)) - set(sys.stdlib_module_names) - project
    dependencies = next(ast.literal_eval(node.value) for node in ast.parse((ROOT / "hubconf.py").read_text()).body
                        if isinstance(node, ast.Assign) and node.targets[0].id == "dependencies")
    assert len(ours) > 20 and imported and imported <= set(dependencies), imported - set(dependencies)


def test_a_gdown_without_its_confirmation_reader_is_one_line(site, tmp_path, monkeypatch):
    """gdown's confirmation-page reader is an internal helper: where a gdown lacks it, one line names the tested
    versions (only when Drive asks for a confirmation)."""
    import importlib

    from downloads import drive
    monkeypatch.delattr(importlib.import_module("gdown.download"), "get_url_from_gdrive_confirmation")
    file_id = drive_id("CONF")
    site.files[f"/drive/{file_id}"] = b"abc"
    with pytest.raises(UserError, match=r"^gdown \S+ has no gdown\.download\.get_url_from_gdrive_confirmation, the "
                                        r"internal helper .* pip install 'gdown>=6\.5\.1,<6\.6'$"):
        drive.download_file(file_id, tmp_path / "x.pth", "FOLDER")
