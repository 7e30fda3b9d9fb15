"""Backbones: official file layouts load strictly and give the tokens of an independent ViT forward."""

import argparse
import math
import os
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from models import build_backbone, load_backbone, parse_backbone_name, save_random_checkpoint
from utils.errors import UserError

TINY = {"dim": 192, "heads": 3}
DEPTH = 2
# family -> (patch, pretraining grid side, test image (H, W) giving a non-square, non-pretraining grid)
FAMILIES = {
    "dino": (16, 14, (64, 48)),
    "ibot": (16, 14, (64, 48)),
    "msn": (16, 14, (64, 48)),
    "mae": (16, 14, (64, 48)),
    "random": (8, 28, (40, 56)),
    "dinov2": (14, 37, (70, 56)),
}


# ---------- independent reference: plain ViT math read straight from a state dict ----------

def reference_pos_embed(pos: Tensor, rows: int, cols: int, family: str, msn_official_square: bool = False) -> Tensor:
    """Each family's published rule, written out: bicubic, scale (grid + 0.1) / sqrt(N), MSN grid / sqrt(N)."""
    n = pos.shape[1] - 1
    side = int(math.sqrt(n))
    if (rows, cols) == (side, side):
        return pos
    table = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    if msn_official_square:
        scale = math.sqrt(rows * cols / n)
    elif family == "msn":
        scale = (rows / math.sqrt(n), cols / math.sqrt(n))
    else:
        scale = ((rows + 0.1) / math.sqrt(n), (cols + 0.1) / math.sqrt(n))
    table = F.interpolate(table, scale_factor=scale, mode="bicubic", align_corners=False)
    assert table.shape[-2:] == (rows, cols)
    return torch.cat([pos[:, :1], table.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)


def reference_tokens(sd: dict[str, Tensor], img: Tensor, heads: int, family: str, **pos_kwargs) -> Tensor:
    """Patch tokens after the final norm, computed in float64."""
    sd = {k: v.double() for k, v in sd.items()}
    weight = sd["patch_embed.proj.weight"]
    dim, patch = weight.shape[0], weight.shape[-1]
    x = F.conv2d(img.double(), weight, sd["patch_embed.proj.bias"], stride=patch)
    batch, _, rows, cols = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(batch, -1, -1), x], dim=1)
    x = x + reference_pos_embed(sd["pos_embed"], rows, cols, family, **pos_kwargs)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    head_dim = dim // heads
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        qkv = h @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]
        q, k, v = qkv.reshape(batch, -1, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(batch, -1, dim)
        y = y @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        x = x + y * sd.get(p + "ls1.gamma", 1.0)
        h = F.layer_norm(x, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        h = F.gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        h = h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
        x = x + h * sd.get(p + "ls2.gamma", 1.0)
    x = F.layer_norm(x, (dim,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return x[:, 1:].float()


# ---------- official checkpoint files, built by hand ----------

def official_tensors(dim: int, patch: int, grid: int, depth: int, layer_scale: bool, seed: int = 0) -> dict[str, Tensor]:
    """Backbone weights under the official key names, random and far from any init."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.1) -> Tensor:
        return torch.randn(*shape, generator=gen) * scale

    sd = {
        "cls_token": rnd(1, 1, dim, scale=1.0),
        "pos_embed": rnd(1, 1 + grid * grid, dim, scale=1.0),
        "patch_embed.proj.weight": rnd(dim, 3, patch, patch, scale=0.05),
        "patch_embed.proj.bias": rnd(dim),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        sd |= {
            p + "norm1.weight": 1 + rnd(dim), p + "norm1.bias": rnd(dim),
            p + "attn.qkv.weight": rnd(3 * dim, dim), p + "attn.qkv.bias": rnd(3 * dim),
            p + "attn.proj.weight": rnd(dim, dim), p + "attn.proj.bias": rnd(dim),
            p + "norm2.weight": 1 + rnd(dim), p + "norm2.bias": rnd(dim),
            p + "mlp.fc1.weight": rnd(4 * dim, dim), p + "mlp.fc1.bias": rnd(4 * dim),
            p + "mlp.fc2.weight": rnd(dim, 4 * dim), p + "mlp.fc2.bias": rnd(dim),
        }
        if layer_scale:
            sd |= {p + "ls1.gamma": 0.5 + rnd(dim), p + "ls2.gamma": 0.5 + rnd(dim)}
    return sd | {"norm.weight": 1 + rnd(dim), "norm.bias": rnd(dim)}


def official_file(family: str, sd: dict[str, Tensor]) -> object:
    """The object each family's released file holds, with the non-backbone parts it may carry."""
    dim = sd["cls_token"].shape[-1]
    if family in ("dino", "random"):
        return dict(sd)
    if family == "dinov2":
        return sd | {"mask_token": torch.zeros(1, dim)}
    if family == "ibot":
        head = {"head.mlp.0.weight": torch.ones(8, dim), "head.last_layer.weight_g": torch.ones(8, 1)}
        return {"state_dict": sd | head}
    if family == "msn":
        fc = {"fc.fc1.weight": torch.ones(16, dim), "fc.bn1.running_mean": torch.zeros(16),
              "fc.bn1.num_batches_tracked": torch.tensor(3), "fc.fc3.bias": torch.zeros(8)}
        return {"target_encoder": {"module." + k: v for k, v in (sd | fc).items()},
                "prototypes": torch.ones(4, 8), "epoch": 300}
    decoder = {"mask_token": torch.zeros(1, 1, dim), "decoder_embed.weight": torch.ones(8, dim),
               "decoder_blocks.0.norm1.weight": torch.ones(8), "decoder_pred.weight": torch.ones(16, 8)}
    return {"model": sd | decoder}


def write_official(tmp_path: Path, family: str, size_name: str | None = None, depth: int = DEPTH,
                   dim: int = TINY["dim"], file_name: str | None = None) -> tuple[Path, dict[str, Tensor]]:
    patch, grid, _ = FAMILIES[family]
    sd = official_tensors(dim, patch, grid, depth, layer_scale=family == "dinov2")
    path = tmp_path / (file_name or f"{family}_vit_{size_name or 'tiny'}_{patch}.pth")
    torch.save(official_file(family, sd), path)
    return path, sd


def image(height: int, width: int, seed: int = 1) -> Tensor:
    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(seed))


def run(model: nn.Module, img: Tensor) -> Tensor:
    with torch.inference_mode():
        return model(img)


# ---------- names ----------

def test_parse_published_names() -> None:
    spec = parse_backbone_name("dino_vit_small_8")
    assert (spec.family, spec.size, spec.patch_size, spec.embed_dim, spec.depth, spec.num_heads,
            spec.pretrain_grid) == ("dino", "small", 8, 384, 12, 6, 28)
    v2 = parse_backbone_name("dinov2_vit_large_14")
    assert (v2.embed_dim, v2.depth, v2.num_heads, v2.pretrain_grid) == (1024, 24, 16, 37)
    assert parse_backbone_name("mae_vit_base_16").pretrain_grid == 14
    for name in ("dino_vit_small_16", "dino_vit_base_8", "dino_vit_base_16", "dinov2_vit_small_14",
                 "dinov2_vit_base_14", "ibot_vit_base_16", "msn_vit_small_16", "random_vit_tiny_8"):
        assert parse_backbone_name(name).name == name


@pytest.mark.parametrize("name", ["vit_small_8", "dino_vit_huge_16", "clip_vit_base_16", "dinov2_vit_base_16",
                                  "dino_vit_small_15", "dino_vit_small"])
def test_unknown_name_lists_valid_patterns(name: str) -> None:
    with pytest.raises(UserError, match=name) as err:
        parse_backbone_name(name)
    assert "dino" in str(err.value) and "small" in str(err.value)


# ---------- tokens against the reference ----------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_official_file_matches_reference_at_new_resolution(tmp_path: Path, family: str) -> None:
    path, sd = write_official(tmp_path, family)
    model = load_backbone(path, depth=DEPTH)
    height, width = FAMILIES[family][2]
    patch = FAMILIES[family][0]
    img = image(height, width)
    tokens = run(model, img)
    assert tokens.shape == (2, (height // patch) * (width // patch), TINY["dim"])
    expected = reference_tokens(sd, img, TINY["heads"], family)
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=0)
    # the two resizing rules really differ on this grid, so the check above tells them apart
    other = "msn" if family != "msn" else "dino"
    assert (reference_tokens(sd, img, TINY["heads"], other) - expected).abs().max() > 1e-3


def test_msn_square_grid_matches_its_official_formula(tmp_path: Path) -> None:
    path, sd = write_official(tmp_path, "msn")
    img = image(96, 96)
    expected = reference_tokens(sd, img, TINY["heads"], "msn", msn_official_square=True)
    torch.testing.assert_close(run(load_backbone(path, depth=DEPTH), img), expected, atol=1e-5, rtol=0)


def test_pretraining_grid_uses_the_table_as_is(tmp_path: Path) -> None:
    path, sd = write_official(tmp_path, "dino")
    img = image(224, 224)
    torch.testing.assert_close(run(load_backbone(path, depth=DEPTH), img),
                               reference_tokens(sd, img, TINY["heads"], "dino"), atol=1e-5, rtol=0)


def test_timm_dynamic_resizing_differs(tmp_path: Path) -> None:
    """timm's own size-based, antialiased resize matches at the pretraining grid only."""
    path, _ = write_official(tmp_path, "dino")
    ours = load_backbone(path, depth=DEPTH)
    plain = VisionTransformer(img_size=224, patch_size=16, num_classes=0, global_pool="", embed_dim=TINY["dim"],
                              depth=DEPTH, num_heads=TINY["heads"], norm_layer=partial(nn.LayerNorm, eps=1e-6),
                              dynamic_img_size=True).eval()
    plain.load_state_dict(ours.state_dict())
    same, moved = image(224, 224), image(64, 48)
    torch.testing.assert_close(run(ours, same), run(plain.forward_features, same)[:, 1:], atol=1e-5, rtol=0)
    assert (run(ours, moved) - run(plain.forward_features, moved)[:, 1:]).abs().max() > 1e-3


def test_resized_table_follows_weight_changes(tmp_path: Path) -> None:
    path, _ = write_official(tmp_path, "dino")
    model = load_backbone(path, depth=DEPTH)
    img = image(64, 48)
    run(model, img)
    new = official_tensors(TINY["dim"], 16, 14, DEPTH, layer_scale=False, seed=5)
    model.load_state_dict(new)
    torch.testing.assert_close(run(model, img), reference_tokens(new, img, TINY["heads"], "dino"), atol=1e-5, rtol=0)


def test_published_12_heads(tmp_path: Path) -> None:
    path, sd = write_official(tmp_path, "dino", size_name="small", dim=384)
    img = image(64, 48)
    six = run(load_backbone(path, depth=DEPTH), img)
    twelve_model = load_backbone(path, published_12_heads=True, depth=DEPTH)
    twelve = run(twelve_model, img)
    assert twelve_model.num_heads == 12
    torch.testing.assert_close(six, reference_tokens(sd, img, 6, "dino"), atol=1e-5, rtol=0)
    torch.testing.assert_close(twelve, reference_tokens(sd, img, 12, "dino"), atol=1e-5, rtol=0)
    assert (six - twelve).abs().max() > 1e-3
    with pytest.raises(UserError, match="published_12_heads"):
        build_backbone("dino_vit_base_16", published_12_heads=True)


def test_loaded_backbone_is_frozen_and_in_eval(tmp_path: Path) -> None:
    path, _ = write_official(tmp_path, "mae")
    model = load_backbone(path, depth=DEPTH)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert (model.name, model.family, model.patch_size, model.embed_dim, model.num_heads) == \
        ("mae_vit_tiny_16", "mae", 16, TINY["dim"], TINY["heads"])
    with torch.inference_mode():
        inside = load_backbone(path, depth=DEPTH)
    img = image(64, 48)
    torch.testing.assert_close(inside(img), run(model, img))  # usable outside inference mode too


# ---------- file checks ----------

@pytest.mark.parametrize("family", ["dino", "dinov2", "ibot", "msn", "mae"])
def test_name_inferred_from_tensors(tmp_path: Path, family: str) -> None:
    path, _ = write_official(tmp_path, family, file_name="weights.pth")
    model = load_backbone(path, depth=DEPTH)
    patch = FAMILIES[family][0]
    assert (model.family, model.embed_dim, model.patch_size, model.name) == \
        (family, TINY["dim"], patch, f"{family}_vit_tiny_{patch}")


def test_uninferable_file_says_what(tmp_path: Path) -> None:
    path = tmp_path / "weights.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(100, 3, 16, 16)}, path)
    with pytest.raises(UserError, match="size.*embed dim 100"):
        load_backbone(path)
    torch.save({"optimizer": {"lr": torch.tensor(1.0)}}, path)
    with pytest.raises(UserError, match="family"):
        load_backbone(path)


def test_file_with_python_objects_loads(tmp_path: Path) -> None:
    """Training states may pickle plain Python objects beside the tensors; they still load."""
    path, sd = write_official(tmp_path, "msn")
    torch.save(official_file("msn", sd) | {"args": argparse.Namespace(epochs=300)}, path)
    img = image(64, 48)
    torch.testing.assert_close(run(load_backbone(path, depth=DEPTH), img),
                               reference_tokens(sd, img, TINY["heads"], "msn"), atol=1e-5, rtol=0)


def test_missing_key_is_named(tmp_path: Path) -> None:
    path, sd = write_official(tmp_path, "dino")
    del sd["blocks.1.mlp.fc2.bias"]
    torch.save(sd, path)
    with pytest.raises(UserError, match=r"missing.*blocks\.1\.mlp\.fc2\.bias"):
        load_backbone(path, depth=DEPTH)


def test_unexpected_key_is_named(tmp_path: Path) -> None:
    path, sd = write_official(tmp_path, "mae")
    torch.save({"model": sd | {"blocks.0.attn.rel_pos": torch.zeros(3)}}, path)
    with pytest.raises(UserError, match=r"unexpected.*blocks\.0\.attn\.rel_pos"):
        load_backbone(path, depth=DEPTH)


def test_truncated_file_is_named(tmp_path: Path) -> None:
    path, _ = write_official(tmp_path, "dino")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match=str(path)):
        load_backbone(path, depth=DEPTH)


def test_wrong_size_is_named(tmp_path: Path) -> None:
    path, _ = write_official(tmp_path, "dino", size_name="small")  # tiny tensors in a small-named file
    with pytest.raises(UserError, match=r"dino_vit_small_16.*embed dim 192.*embed dim 384"):
        load_backbone(path, depth=DEPTH)
    with pytest.raises(UserError, match="blocks"):
        load_backbone(write_official(tmp_path, "dino")[0])  # 2 blocks where 12 are expected


def test_layout_mismatch_is_named(tmp_path: Path) -> None:
    _, sd = write_official(tmp_path, "mae")
    path = tmp_path / "msn_vit_tiny_16.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(UserError, match="target_encoder"):
        load_backbone(path, depth=DEPTH)


def test_resolution_not_divisible_by_patch(tmp_path: Path) -> None:
    model = build_backbone("dino_vit_tiny_16", depth=1)
    with pytest.raises(UserError, match="65x48.*16"):
        run(model, image(65, 48))


# ---------- random checkpoints ----------

def saved_backbone(obj: dict, family: str) -> dict[str, Tensor]:
    """Backbone part of a saved file, checking the family's container, prefix and extra parts."""
    container = {"ibot": "state_dict", "msn": "target_encoder", "mae": "model"}.get(family)
    weights = obj[container] if container else obj
    if family == "msn":
        assert all(k.startswith("module.") for k in weights) and "module.fc.fc1.weight" in weights
        return {k[len("module."):]: v for k, v in weights.items() if not k.startswith("module.fc.")}
    if family == "dinov2":
        assert "mask_token" in weights and "blocks.0.ls1.gamma" in weights
        return {k: v for k, v in weights.items() if k != "mask_token"}
    return weights


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_random_checkpoint_writes_official_layout(tmp_path: Path, family: str) -> None:
    patch = FAMILIES[family][0]
    name = f"{family}_vit_tiny_{patch}"
    path = tmp_path / f"{name}.pth"
    save_random_checkpoint(name, path, depth=DEPTH, seed=3)
    assert os.listdir(tmp_path) == [path.name]  # the temporary file was renamed, not left behind
    weights = saved_backbone(torch.load(path, weights_only=True), family)
    model = load_backbone(path, depth=None if family == "random" else DEPTH)
    img = image(*FAMILIES[family][2])
    torch.testing.assert_close(run(model, img), reference_tokens(weights, img, TINY["heads"], family), atol=1e-5, rtol=0)
    save_random_checkpoint(name, tmp_path / "again.pth", depth=DEPTH, seed=3)
    again = saved_backbone(torch.load(tmp_path / "again.pth", weights_only=True), family)
    assert all(torch.equal(again[k], v) for k, v in weights.items())
