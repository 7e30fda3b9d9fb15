"""Hugging Face model folders (config.json + model.safetensors) load onto the same backbones as the
official files and give the reference tokens. The folders are written here from official-layout
weights with transformers' key names (read from its Dinov2Model, Dinov2WithRegistersModel and
DINOv3ViTModel), so a wrong mapping on either side shows against the reference."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from models import load_backbone, save_random_checkpoint
from models.hf import hf_spec
from tests.new_backbones import (DEPTH, TOLERANCE, dinov2_reg_official, dinov3_official, image, max_err,
                                 reference_patch_tokens, timm_dinov2_reg, timm_dinov3, tokens)
from tests.test_backbones import official_tensors, reference_tokens
from utils.errors import UserError


def hf_dinov2(official: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """transformers' Dinov2(WithRegisters)Model keys for official DINOv2 weights."""
    dim = official["cls_token"].shape[-1]
    hf = {"embeddings.cls_token": official["cls_token"], "embeddings.mask_token": torch.zeros(1, dim),
          "embeddings.position_embeddings": official["pos_embed"],
          "embeddings.patch_embeddings.projection.weight": official["patch_embed.proj.weight"],
          "embeddings.patch_embeddings.projection.bias": official["patch_embed.proj.bias"],
          "layernorm.weight": official["norm.weight"], "layernorm.bias": official["norm.bias"]}
    if "register_tokens" in official:
        hf["embeddings.register_tokens"] = official["register_tokens"]
    for i in range(depth):
        o, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = official[o + f"attn.qkv.{kind}"].chunk(3)
            hf |= {h + f"attention.attention.query.{kind}": q, h + f"attention.attention.key.{kind}": k,
                   h + f"attention.attention.value.{kind}": v,
                   h + f"attention.output.dense.{kind}": official[o + f"attn.proj.{kind}"],
                   h + f"norm1.{kind}": official[o + f"norm1.{kind}"], h + f"norm2.{kind}": official[o + f"norm2.{kind}"],
                   h + f"mlp.fc1.{kind}": official[o + f"mlp.fc1.{kind}"], h + f"mlp.fc2.{kind}": official[o + f"mlp.fc2.{kind}"]}
        hf |= {h + "layer_scale1.lambda1": official[o + "ls1.gamma"], h + "layer_scale2.lambda1": official[o + "ls2.gamma"]}
    return hf


def hf_dinov3(official: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """transformers' DINOv3ViTModel keys for official DINOv3 weights (no k bias: key_bias false)."""
    dim = official["cls_token"].shape[-1]
    hf = {"embeddings.cls_token": official["cls_token"], "embeddings.mask_token": torch.zeros(1, 1, dim),
          "embeddings.register_tokens": official["storage_tokens"],
          "embeddings.patch_embeddings.weight": official["patch_embed.proj.weight"],
          "embeddings.patch_embeddings.bias": official["patch_embed.proj.bias"],
          "norm.weight": official["norm.weight"], "norm.bias": official["norm.bias"]}
    gated = "blocks.0.mlp.w1.weight" in official
    ffn = {"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"} if gated else {"fc1": "up_proj", "fc2": "down_proj"}
    for i in range(depth):
        o, h = f"blocks.{i}.", f"layer.{i}."
        q, k, v = official[o + "attn.qkv.weight"].chunk(3)
        qb, _, vb = official[o + "attn.qkv.bias"].chunk(3)
        hf |= {h + "attention.q_proj.weight": q, h + "attention.k_proj.weight": k, h + "attention.v_proj.weight": v,
               h + "attention.q_proj.bias": qb, h + "attention.v_proj.bias": vb,
               h + "layer_scale1.lambda1": official[o + "ls1.gamma"], h + "layer_scale2.lambda1": official[o + "ls2.gamma"]}
        for kind in ("weight", "bias"):
            hf |= {h + f"attention.o_proj.{kind}": official[o + f"attn.proj.{kind}"],
                   h + f"norm1.{kind}": official[o + f"norm1.{kind}"], h + f"norm2.{kind}": official[o + f"norm2.{kind}"]}
            hf |= {h + f"mlp.{name}.{kind}": official[o + f"mlp.{ours}.{kind}"] for ours, name in ffn.items()}
    return hf


def write_folder(folder: Path, config: dict, tensors: dict[str, Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return folder


def dinov2_config(dim: int, heads: int, registers: bool) -> dict:
    config = {"model_type": "dinov2_with_registers" if registers else "dinov2", "hidden_size": dim,
              "num_attention_heads": heads, "num_hidden_layers": DEPTH, "patch_size": 14, "image_size": 518,
              "layer_norm_eps": 1e-6, "mlp_ratio": 4, "use_swiglu_ffn": False}
    return config | ({"num_register_tokens": 4} if registers else {})


def dinov3_config(gated: bool) -> dict:
    return {"model_type": "dinov3_vit", "hidden_size": 384, "num_attention_heads": 6, "num_hidden_layers": DEPTH,
            "patch_size": 16, "layer_norm_eps": 1e-5, "rope_theta": 100.0, "num_register_tokens": 4,
            "intermediate_size": 1536, "use_gated_mlp": gated, "hidden_act": "silu" if gated else "gelu",
            "key_bias": False, "query_bias": True, "value_bias": True}


# ---------- equality ----------

def test_hf_dinov2_folder_matches_the_official_forward(tmp_path: Path) -> None:
    official = official_tensors(384, 14, 37, DEPTH, layer_scale=True)
    folder = write_folder(tmp_path / "dinov2-small", dinov2_config(384, 6, False), hf_dinov2(official, DEPTH))
    model = load_backbone(folder)
    assert model.name == "dinov2_vit_small_14"
    for height, width in ((70, 56), (84, 84)):
        img = image(height, width)
        assert max_err(tokens(model, img), reference_tokens(official, img, 6, "dinov2")) <= TOLERANCE


def test_hf_dinov2_registers_folder_matches_timm(tmp_path: Path) -> None:
    official = dinov2_reg_official("small")
    folder = write_folder(tmp_path / "dinov2-with-registers-small", dinov2_config(384, 6, True),
                          hf_dinov2(official, DEPTH))
    model = load_backbone(folder)
    assert model.name == "dinov2_vit_small_14_reg4"
    reference = timm_dinov2_reg("small", official)
    for height, width in ((70, 56), (84, 84)):
        img = image(height, width)
        assert max_err(tokens(model, img), reference_patch_tokens(reference, img)) <= TOLERANCE


@pytest.mark.parametrize("size", ["small", "small_plus"])
def test_hf_dinov3_folder_matches_timm(tmp_path: Path, size: str) -> None:
    official = dinov3_official(size)
    folder = write_folder(tmp_path / "dinov3", dinov3_config(size == "small_plus"), hf_dinov3(official, DEPTH))
    model = load_backbone(folder)
    assert model.name == f"dinov3_vit_{size}_16"
    reference = timm_dinov3(size, official)
    for height, width in ((96, 64), (64, 64)):
        img = image(height, width)
        assert max_err(tokens(model, img), reference_patch_tokens(reference, img)) <= TOLERANCE


def test_config_defaults_and_task_model_prefix(tmp_path: Path) -> None:
    """`save_pretrained` leaves out values equal to transformers' defaults, and a task model
    prefixes the backbone (`dinov2.`) beside its head: both load."""
    official = dinov2_reg_official("small")
    config = {k: v for k, v in dinov2_config(384, 6, True).items() if k not in ("layer_norm_eps", "num_register_tokens")}
    tensors = {"dinov2_with_registers." + k: v for k, v in hf_dinov2(official, DEPTH).items()}
    folder = write_folder(tmp_path / "task", config, tensors | {"classifier.weight": torch.zeros(10, 768)})
    img = image(70, 56)
    reference = timm_dinov2_reg("small", official)
    assert max_err(tokens(load_backbone(folder), img), reference_patch_tokens(reference, img)) <= TOLERANCE


# ---------- errors ----------

def test_folder_errors_are_one_line(tmp_path: Path) -> None:
    official = dinov3_official("small")
    hf = hf_dinov3(official, DEPTH)
    folder = write_folder(tmp_path / "m", dinov3_config(False), hf)
    (folder / "config.json").unlink()
    with pytest.raises(UserError, match=r"m: a Hugging Face model folder needs config\.json.*missing"):
        load_backbone(folder)
    write_folder(folder, dinov3_config(False) | {"model_type": "vit"}, hf)
    with pytest.raises(UserError, match=r"config\.json: model_type 'vit' is not one of dinov2"):
        load_backbone(folder)
    write_folder(folder, dinov3_config(False) | {"layer_norm_eps": 1e-6}, hf)
    with pytest.raises(UserError, match=r"config\.json: layer_norm_eps is 1e-06, expected 1e-05"):
        load_backbone(folder)
    write_folder(folder, dinov3_config(False) | {"num_hidden_layers": 3}, hf)
    with pytest.raises(UserError, match=r"model\.safetensors: the file has 2 layers.*num_hidden_layers 3"):
        load_backbone(folder)
    write_folder(folder, dinov3_config(False), {k: v for k, v in hf.items() if k != "layer.1.attention.v_proj.bias"})
    with pytest.raises(UserError, match=r"model\.safetensors: missing 'layer\.1\.attention\.v_proj\.bias'"):
        load_backbone(folder)
    write_folder(folder, dinov3_config(False), hf | {"layer.0.attention.extra": torch.zeros(3)})
    with pytest.raises(UserError, match=r"unexpected weights for a dinov3_vit model: layer\.0\.attention\.extra"):
        load_backbone(folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match=r"model\.safetensors: cannot read the weights"):
        load_backbone(folder)
    with pytest.raises(UserError, match=r"describes dinov3_vit_small_16, not dinov3_vit_base_16"):
        write_folder(folder, dinov3_config(False), hf)
        load_backbone(folder, name="dinov3_vit_base_16")


def test_random_backbone_under_any_name_keeps_its_depth(tmp_path: Path) -> None:
    """Issue 14: a 2-block toy backbone saved as my_backbone.pth was inferred as 12 blocks and refused."""
    named, renamed = tmp_path / "random_vit_tiny_8.pth", tmp_path / "my_backbone.pth"
    save_random_checkpoint("random_vit_tiny_8", named)
    renamed.write_bytes(named.read_bytes())
    model = load_backbone(renamed)
    assert (len(model.blocks), model.embed_dim, model.patch_size) == (2, 192, 8)
    img = image(40, 56)
    assert max_err(tokens(model, img), tokens(load_backbone(named), img)) == 0


def test_hidden_act_is_checked_against_what_the_blocks_run(tmp_path: Path) -> None:
    """A gated DINOv3 MLP runs SiLU and a plain one exact GELU: another `hidden_act` is refused, not ignored."""
    for gated, act in ((True, "gelu"), (False, "silu"), (False, "gelu_new")):
        mlp = r"gated \(SwiGLU\)" if gated else "plain"
        with pytest.raises(UserError, match=rf"config\.json: hidden_act '{act}' is not implemented for the {mlp} "
                                            rf"MLP of dinov3_vit"):
            hf_spec(tmp_path, dinov3_config(gated) | {"hidden_act": act})
    with pytest.raises(UserError, match=r"hidden_act 'gelu_new' is not implemented for the plain MLP of dinov2"):
        hf_spec(tmp_path, dinov2_config(384, 6, False) | {"hidden_act": "gelu_new"})
    assert hf_spec(tmp_path, dinov3_config(True) | {"hidden_act": "swish"}).swiglu   # transformers' alias of silu
    # transformers' default (gelu) where the config leaves it out
    assert hf_spec(tmp_path, {k: v for k, v in dinov2_config(384, 6, False).items() if k != "hidden_act"}).size == "small"


def test_dinov2_config_without_patch_size_takes_transformers_default_14(tmp_path: Path) -> None:
    config = {k: v for k, v in dinov2_config(384, 6, False).items() if k != "patch_size"}
    assert hf_spec(tmp_path, config).name == "dinov2_vit_small_14"
    registers = {k: v for k, v in dinov2_config(384, 6, True).items() if k != "patch_size"}
    with pytest.raises(UserError, match=r"patch_size is 16, expected 14 for dinov2_with_registers"):
        hf_spec(tmp_path, registers)   # Dinov2WithRegistersConfig's default is 16
