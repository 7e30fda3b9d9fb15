"""DINOv3 and DINOv2-with-registers backbones: official release files (official and short names)
give timm's tokens for the same weights; names, RoPE and file errors."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from models import DinoV3Backbone, load_backbone, parse_backbone_name, save_random_checkpoint
from models.pos_embed import resize_pos_embed
from models.rope import rope_sin_cos
from tests.new_backbones import (DEPTH, TOLERANCE, dinov2_reg_official, dinov3_official, image, max_err,
                                 reference_patch_tokens, timm_dinov2_reg, timm_dinov3, tokens)
from utils.errors import UserError

DINOV3_FILES = {
    "small": ["dinov3_vits16_pretrain_lvd1689m-08c60483.pth", "dinov3_vit_small_16.pth"],
    "small_plus": ["dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth", "dinov3_vit_small_plus_16.pth"],
    "base": ["dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth", "dinov3_vit_base_16.pth"],
    "large": ["dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth", "dinov3_vit_large_16.pth"],
}
REG_FILES = {
    "small": ["dinov2_vits14_reg4_pretrain.pth", "dinov2_vit_small_14_reg4.pth"],
    "base": ["dinov2_vitb14_reg4_pretrain.pth", "dinov2_vit_base_14_reg4.pth"],
    "large": ["dinov2_vitl14_reg4_pretrain.pth", "dinov2_vit_large_14_reg4.pth"],
}
DINOV3_IMAGES = [(96, 64), (64, 64)]  # 6x4 and 4x4 patches
REG_IMAGES = [(70, 56), (84, 84)]  # 5x4 and 6x6 patches, neither the 37x37 pretraining grid
# blocks written per size: one block of the wide models keeps the test fast and still checks every part
BLOCKS = {"small": DEPTH, "small_plus": DEPTH, "base": 1, "large": 1}


def write(tmp_path: Path, file_name: str, obj: dict) -> Path:
    path = tmp_path / file_name
    torch.save(obj, path)
    return path


# ---------- equality with the reference ----------

@pytest.mark.parametrize("size", list(DINOV3_FILES))
def test_dinov3_files_match_timm(tmp_path: Path, size: str) -> None:
    official = dinov3_official(size, BLOCKS[size])
    reference = timm_dinov3(size, official, BLOCKS[size])
    for file_name in DINOV3_FILES[size]:
        model = load_backbone(write(tmp_path, file_name, official), depth=BLOCKS[size])
        assert isinstance(model, DinoV3Backbone) and model.name == f"dinov3_vit_{size}_16"
        for height, width in DINOV3_IMAGES:
            img = image(height, width)
            ours = tokens(model, img)
            assert ours.shape == (2, (height // 16) * (width // 16), official["norm.weight"].shape[0])
            assert max_err(ours, reference_patch_tokens(reference, img)) <= TOLERANCE


@pytest.mark.parametrize("size", list(REG_FILES))
def test_dinov2_register_files_match_timm(tmp_path: Path, size: str) -> None:
    official = dinov2_reg_official(size, BLOCKS[size])
    reference = timm_dinov2_reg(size, official, BLOCKS[size])
    for file_name in REG_FILES[size]:
        model = load_backbone(write(tmp_path, file_name, official), depth=BLOCKS[size])
        assert model.name == f"dinov2_vit_{size}_14_reg4" and model.num_prefix_tokens == 5
        for height, width in REG_IMAGES:
            img = image(height, width)
            ours = tokens(model, img)
            assert ours.shape[1] == (height // 14) * (width // 14)
            assert max_err(ours, reference_patch_tokens(reference, img)) <= TOLERANCE


def test_register_rule_is_not_the_offset_rule() -> None:
    """The test grids tell the two resizing rules of DINOv2 apart (so the checks above do too)."""
    table = dinov2_reg_official("small")["pos_embed"]
    for height, width in REG_IMAGES:
        grid = (height // 14, width // 14)
        assert max_err(resize_pos_embed(table, grid, None), resize_pos_embed(table, grid, 0.1)) > 1e-2


def test_dinov3_k_bias_is_masked_by_the_file(tmp_path: Path) -> None:
    official = dinov3_official("small")
    img = image(*DINOV3_IMAGES[0])
    base = tokens(load_backbone(write(tmp_path, "dinov3_vit_small_16.pth", official), depth=DEPTH), img)
    other_k = dict(official)
    other_k["blocks.0.attn.qkv.bias"] = official["blocks.0.attn.qkv.bias"].clone()
    other_k["blocks.0.attn.qkv.bias"][384:768] += 1.0
    assert max_err(tokens(load_backbone(write(tmp_path, "dinov3_vit_small_16.pth", other_k), depth=DEPTH), img),
                   base) <= TOLERANCE
    unmasked = official | {f"blocks.{i}.attn.qkv.bias_mask": torch.ones(3 * 384) for i in range(DEPTH)}
    assert max_err(tokens(load_backbone(write(tmp_path, "dinov3_vit_small_16.pth", unmasked), depth=DEPTH), img),
                   base) > 1e-2


def test_rope_angles_by_hand() -> None:
    """Patch centres on [-1, 1] per axis, each axis by its own count; rows then columns."""
    periods = torch.tensor([1.0, 4.0])  # head dim 8
    sin, cos = rope_sin_cos(periods, rows=2, cols=3)
    assert sin.shape == cos.shape == (6, 8) and sin.dtype == torch.float32
    # patch (row 1, col 2): y = 2 * 1.5 / 2 - 1 = 0.5, x = 2 * 2.5 / 3 - 1 = 2 / 3
    y, x = 0.5, 2 / 3
    angles = [2 * math.pi * y / 1.0, 2 * math.pi * y / 4.0, 2 * math.pi * x / 1.0, 2 * math.pi * x / 4.0] * 2
    torch.testing.assert_close(sin[5], torch.tensor([math.sin(a) for a in angles]), atol=1e-6, rtol=0)
    torch.testing.assert_close(cos[5], torch.tensor([math.cos(a) for a in angles]), atol=1e-6, rtol=0)


# ---------- names ----------

def test_names_and_architectures() -> None:
    for stem, (dim, depth, heads, swiglu) in {
        "dinov3_vits16_pretrain_lvd1689m-08c60483": (384, 12, 6, False),
        "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa": (384, 12, 6, True),
        "dinov3_vitb16_pretrain_lvd1689m-73cec8be": (768, 12, 12, False),
        "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd": (1024, 24, 16, False),
    }.items():
        spec = parse_backbone_name(stem)
        assert (spec.family, spec.patch_size, spec.embed_dim, spec.depth, spec.num_heads, spec.swiglu,
                spec.extra_tokens) == ("dinov3", 16, dim, depth, heads, swiglu, 4)
    reg = parse_backbone_name("dinov2_vitl14_reg4_pretrain")
    assert (reg.name, reg.depth, reg.extra_tokens, reg.pretrain_grid) == ("dinov2_vit_large_14_reg4", 24, 4, 37)
    assert parse_backbone_name("dinov2_vitb14_pretrain").name == "dinov2_vit_base_14"
    toy = parse_backbone_name("random_dinov3_vit_tiny_16")
    assert (toy.family, toy.random, toy.depth, toy.name) == ("dinov3", True, 2, "random_dinov3_vit_tiny_16")


@pytest.mark.parametrize("name", ["dinov3_vit_base_14", "dino_vit_small_plus_16", "dinov3_vit_base_16_reg4",
                                  "dinov2_vit_base_14_reg8", "random_random_vit_tiny_8", "dinov3_vit_huge_16"])
def test_bad_new_names(name: str) -> None:
    with pytest.raises(UserError, match=f"'{name}'.*dinov3_vit_"):
        parse_backbone_name(name)


# ---------- files ----------

def test_wrong_size_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth", dinov3_official("small"))
    with pytest.raises(UserError, match=rf"{path.name}.*dinov3_vit_base_16.*embed dim 384.*embed dim 768"):
        load_backbone(path, depth=DEPTH)
    path = write(tmp_path, "dinov3_vit_small_16.pth", dinov3_official("small"))
    with pytest.raises(UserError, match=rf"{path.name}.*2 blocks, expected 12"):
        load_backbone(path)


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    official = dinov3_official("small")
    del official["blocks.1.attn.qkv.bias_mask"]
    with pytest.raises(UserError, match=r"dinov3_vit_small_16\.pth: missing.*blocks\.1\.attn\.qkv\.bias_mask"):
        load_backbone(write(tmp_path, "dinov3_vit_small_16.pth", official), depth=DEPTH)
    with pytest.raises(UserError, match=r"unexpected.*register_tokens"):
        load_backbone(write(tmp_path, "dinov2_vit_small_14.pth", dinov2_reg_official("small")), depth=DEPTH)
    with pytest.raises(UserError, match=r"missing.*blocks\.0\.mlp\.fc1\.bias"):  # an S+ file under the S name
        load_backbone(write(tmp_path, "dinov3_vit_small_16.pth", dinov3_official("small_plus")), depth=DEPTH)


@pytest.mark.parametrize("make,expected", [(lambda: dinov3_official("small_plus"), "dinov3_vit_small_plus_16"),
                                           (lambda: dinov3_official("base"), "dinov3_vit_base_16"),
                                           (lambda: dinov2_reg_official("small"), "dinov2_vit_small_14_reg4")])
def test_unnamed_file_is_inferred(tmp_path: Path, make, expected: str) -> None:
    """Family, size, registers and the block count all come from the tensors."""
    model = load_backbone(write(tmp_path, "weights.pth", make()))
    assert model.name == expected and len(model.blocks) == DEPTH


def test_dinov3_resolution_checks(tmp_path: Path) -> None:
    model = load_backbone(write(tmp_path, "dinov3_vit_small_16.pth", dinov3_official("small")), depth=DEPTH)
    assert tokens(model, image(320, 320)).shape == (2, 400, 384)
    with pytest.raises(UserError, match="72x64.*16"):
        tokens(model, image(72, 64))


@pytest.mark.parametrize("name,size", [("random_dinov3_vit_tiny_16", "tiny"),
                                       ("random_dinov2_vit_tiny_14_reg4", None)])
def test_random_toy_backbones_are_official_files(tmp_path: Path, name: str, size: str | None) -> None:
    path = tmp_path / f"{name}.pth"
    save_random_checkpoint(name, path, seed=3)
    saved = torch.load(path, weights_only=True)
    assert "mask_token" in saved and len({k.split(".")[1] for k in saved if k.startswith("blocks.")}) == 2
    model = load_backbone(path)  # the block count is read from the file
    assert model.name == name
    if size is None:  # timm has no tiny DINOv2: check the register layout and determinism instead
        assert saved["register_tokens"].shape == (1, 4, 192)
    else:
        assert (saved["blocks.0.attn.qkv.bias_mask"][192:384] == 0).all()
        img = image(64, 48)
        assert max_err(tokens(model, img), reference_patch_tokens(timm_dinov3(size, saved), img)) <= TOLERANCE
    save_random_checkpoint(name, tmp_path / "again.pth", seed=3)
    again = torch.load(tmp_path / "again.pth", weights_only=True)
    assert all(torch.equal(again[k], v) for k, v in saved.items())
