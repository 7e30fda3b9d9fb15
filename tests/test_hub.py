"""Weights the user already has (the Hugging Face cache, torch's hub cache) and hubconf.py's entries, against
a fake cache laid out as huggingface_hub lays it out and the loopback mirror of test_download.py."""
from __future__ import annotations

import hashlib
import io
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

import download
from downloads import sources
from downloads.checksums import Checksum
from downloads.sources import BACKBONES, BackboneSource, PublishedRow
from models import load_backbone, save_random_checkpoint
from modules.segment import Cluster, SegmentTR
from tests.new_backbones import DEPTH, image, tokens
from tests.test_backbones import official_tensors
from tests.test_backbones_hf import dinov2_config, hf_dinov2, write_folder
from tests.test_download import TINY_URL, drive_id, folder_page, saved, site, tiny_backbone, tiny_entry  # noqa: F401
from tests.toy_fixtures import R
from utils.config import checkpoint_stem
from utils.errors import UserError
from utils.hf_hub import resolve_hub_id

ROOT = Path(__file__).resolve().parents[1]
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """facebook/dinov2-small (random weights, DEPTH blocks) in a Hugging Face cache; offline."""
    cache = tmp_path / "hf" / "hub"
    repo = cache / "models--facebook--dinov2-small"
    write_folder(repo / "snapshots" / REVISION, dinov2_config(384, 6, False),
                 hf_dinov2(official_tensors(384, 14, 37, DEPTH, layer_scale=True), DEPTH))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo / "snapshots" / REVISION


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
