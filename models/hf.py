"""Hugging Face model folders (`config.json` + `model.safetensors`, as `facebook/dinov2-base`,
`facebook/dinov2-with-registers-base` and `facebook/dinov3-vitb16-pretrain-lvd1689m` are
distributed; or shards named by `model.safetensors.index.json`; or `pytorch_model.bin`, one file or
shards) read into the official key layout, so they load onto the same backbones as the official
files. `safetensors` (and torch's weights-only loader for `.bin`) is all they need; `transformers` is
never imported.

Key names follow transformers' `Dinov2Model`, `Dinov2WithRegistersModel` and `DINOv3ViTModel`:
separate q/k/v linears (fused here into the official `qkv`), `layer_scale{1,2}.lambda1` for the
official `ls{1,2}.gamma`, `embeddings.register_tokens` for DINOv3's `storage_tokens`. HF's DINOv3
has no k bias at all (`key_bias: false`) where the official file stores one and masks it out; the
mask is rebuilt here. HF's DINOv3 keeps no RoPE periods; they follow from `rope_theta`.

The features are the official code's, not transformers': for DINOv2 without registers
transformers resizes the position table to the output size, where the official code (and ours)
uses the 0.1-offset scale factor, so at grids other than 37x37 transformers' tokens differ slightly.
For DINOv2 with registers both use the same antialiased output-size rule.
"""

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from models.dinov3 import ROPE_BASE
from models.rope import rope_periods
from models.spec import BackboneSpec, make_spec, size_for_embed_dim
from utils.errors import UserError
from utils.hf_hub import CONFIG, WEIGHTS, weight_files, weights_source

# model_type -> (our family, extra tokens, transformers' base-model prefix)
MODEL_TYPES = {
    "dinov2": ("dinov2", 0, "dinov2."),
    "dinov2_with_registers": ("dinov2", 4, "dinov2_with_registers."),
    "dinov3_vit": ("dinov3", 4, "dinov3_vit."),
}
# transformers' config defaults: `save_pretrained` leaves out values equal to them (Dinov2Config's patch
# size is 14, Dinov2WithRegistersConfig's 16)
_DINOV2_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "layer_norm_eps": 1e-6,
                    "patch_size": 14, "use_swiglu_ffn": False, "num_register_tokens": 0, "hidden_act": "gelu"}
HF_DEFAULTS = {
    "dinov2": _DINOV2_DEFAULTS,
    "dinov2_with_registers": _DINOV2_DEFAULTS | {"num_register_tokens": 4, "patch_size": 16},
    "dinov3_vit": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "layer_norm_eps": 1e-5,
                   "patch_size": 16, "use_gated_mlp": False, "num_register_tokens": 0, "rope_theta": 100.0,
                   "hidden_act": "gelu"},
}
# the `hidden_act` names (transformers' ACT2FN) of what our blocks run: the plain MLP's exact GELU, the
# gated (SwiGLU) MLP's SiLU
ACTIVATIONS = {False: ("gelu",), True: ("silu", "swish")}
# the official code's layer-norm eps per family
NORM_EPS = {"dinov2": 1e-6, "dinov3": 1e-5}
_LAYER = re.compile(r"^(?:encoder\.)?layer\.(\d+)\.")


def _config(folder: Path) -> dict:
    path = folder / CONFIG
    if not path.is_file():
        raise UserError(f"{folder}: a Hugging Face model folder needs {CONFIG} and {WEIGHTS[0]}; {CONFIG} is missing")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read the model config: {err}") from err
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object")
    return config


def _weights_source(folder: Path) -> Path:
    source = weights_source(folder)
    if source is None:
        raise UserError(f"{folder}: a Hugging Face model folder needs {CONFIG} and {WEIGHTS[0]} (or "
                        f"{WEIGHTS[0]}.index.json and its shards, or {WEIGHTS[1]}); none of them is there")
    return source


def _tensors(source: Path) -> dict[str, Tensor]:
    """Every tensor of the weight file `source`, or of the shards its index names."""
    tensors: dict[str, Tensor] = {}
    for path in weight_files(source):
        tensors.update(_read_weights(path))
    return tensors


def _read_weights(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        if path.suffix == ".bin":
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise ValueError(f"holds a {type(state).__name__}, not a state dict")
            return state
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors and torch raise their own error types for damaged files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: cannot read the weights (truncated or corrupt?): {reason}") from err


def _model_type(folder: Path, config: dict) -> str:
    model_type = str(config.get("model_type", "")).lower()
    model_type = "dinov3_vit" if model_type == "dinov3vit" else model_type  # early spelling "DINOv3ViT"
    if model_type not in MODEL_TYPES:
        raise UserError(f"{folder / CONFIG}: model_type '{config.get('model_type')}' is not one of "
                        f"{', '.join(MODEL_TYPES)}")
    return model_type


def hf_spec(folder: Path, config: dict) -> BackboneSpec:
    """Family, size, patch and depth from the config; UserError naming the first setting our
    backbones do not have."""
    model_type = _model_type(folder, config)
    family, extra, _ = MODEL_TYPES[model_type]
    settings = HF_DEFAULTS[model_type] | {k: v for k, v in config.items() if k in HF_DEFAULTS[model_type]}
    where = folder / CONFIG
    size = size_for_embed_dim(settings["hidden_size"])
    if size is None:
        raise UserError(f"{where}: hidden_size {settings['hidden_size']} is not 192/384/768/1024")
    if settings.get("use_gated_mlp") or settings.get("use_swiglu_ffn"):
        if (family, size) != ("dinov3", "small"):
            raise UserError(f"{where}: a gated (SwiGLU) MLP is only supported for DINOv3 ViT-S+ (hidden_size 384)")
        size = "small_plus"
    patch = 14 if family == "dinov2" else 16
    expected = {"patch_size": patch, "layer_norm_eps": NORM_EPS[family], "num_register_tokens": extra,
                "num_attention_heads": make_spec(family, size, patch).num_heads}
    if family == "dinov3":
        expected["rope_theta"] = ROPE_BASE
    for key, value in expected.items():
        if settings[key] != value:
            raise UserError(f"{where}: {key} is {settings[key]}, expected {value} for {model_type}")
    gated = make_spec(family, size, patch).swiglu
    if settings["hidden_act"] not in ACTIVATIONS[gated]:
        raise UserError(f"{where}: hidden_act {settings['hidden_act']!r} is not implemented for the "
                        f"{'gated (SwiGLU)' if gated else 'plain'} MLP of {model_type}: expected "
                        f"{' or '.join(map(repr, ACTIVATIONS[gated]))}")
    depth = settings["num_hidden_layers"]
    if not isinstance(depth, int) or depth < 1:
        raise UserError(f"{where}: num_hidden_layers {depth} is not a positive integer")
    return make_spec(family, size, patch, extra, depth=depth)


class _Keys:
    """Takes HF tensors by name, reporting the first missing one."""

    def __init__(self, tensors: dict[str, Tensor], source: Path, model_type: str) -> None:
        self.tensors = dict(tensors)
        self.source = source   # the weight file, or the shards' index
        self.model_type = model_type

    def take(self, key: str) -> Tensor:
        if key not in self.tensors:
            raise UserError(f"{self.source}: missing '{key}', expected in a {self.model_type} model")
        return self.tensors.pop(key)

    def take_optional(self, key: str) -> Tensor | None:
        return self.tensors.pop(key, None)

    def check_all_used(self) -> None:
        if self.tensors:
            extra = ", ".join(sorted(self.tensors)[:5])
            raise UserError(f"{self.source}: unexpected weights for a {self.model_type} model: {extra}")


def _dinov2_weights(keys: _Keys, depth: int, registers: bool) -> dict[str, Tensor]:
    out = {"cls_token": keys.take("embeddings.cls_token"), "pos_embed": keys.take("embeddings.position_embeddings"),
           "patch_embed.proj.weight": keys.take("embeddings.patch_embeddings.projection.weight"),
           "patch_embed.proj.bias": keys.take("embeddings.patch_embeddings.projection.bias"),
           "norm.weight": keys.take("layernorm.weight"), "norm.bias": keys.take("layernorm.bias")}
    keys.take_optional("embeddings.mask_token")
    if registers:
        out["register_tokens"] = keys.take("embeddings.register_tokens")
    for i in range(depth):
        hf, ours = f"encoder.layer.{i}.", f"blocks.{i}."
        attn = hf + "attention.attention."
        for kind in ("weight", "bias"):
            out[ours + f"attn.qkv.{kind}"] = torch.cat([keys.take(attn + f"{p}.{kind}") for p in ("query", "key", "value")])
            out[ours + f"attn.proj.{kind}"] = keys.take(hf + f"attention.output.dense.{kind}")
            for part in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[ours + f"{part}.{kind}"] = keys.take(hf + f"{part}.{kind}")
        out[ours + "ls1.gamma"] = keys.take(hf + "layer_scale1.lambda1")
        out[ours + "ls2.gamma"] = keys.take(hf + "layer_scale2.lambda1")
    return out


def _dinov3_weights(keys: _Keys, spec: BackboneSpec, depth: int) -> dict[str, Tensor]:
    dim = spec.embed_dim
    out = {"cls_token": keys.take("embeddings.cls_token"), "storage_tokens": keys.take("embeddings.register_tokens"),
           "patch_embed.proj.weight": keys.take("embeddings.patch_embeddings.weight"),
           "patch_embed.proj.bias": keys.take("embeddings.patch_embeddings.bias"),
           "rope_embed.periods": rope_periods(dim // spec.num_heads, ROPE_BASE),
           "norm.weight": keys.take("norm.weight"), "norm.bias": keys.take("norm.bias")}
    keys.take_optional("embeddings.mask_token")
    ffn = {"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"} if spec.swiglu else {"fc1": "up_proj", "fc2": "down_proj"}
    for i in range(depth):
        hf, ours = f"layer.{i}.", f"blocks.{i}."
        attn = hf + "attention."
        key_bias = keys.take_optional(attn + "k_proj.bias")
        out[ours + "attn.qkv.weight"] = torch.cat([keys.take(attn + f"{p}_proj.weight") for p in "qkv"])
        q_bias, v_bias = keys.take(attn + "q_proj.bias"), keys.take(attn + "v_proj.bias")
        mask = torch.ones(3 * dim)
        if key_bias is None:  # HF DINOv3 has no k bias: a zero bias, masked out as in the official file
            key_bias = torch.zeros_like(q_bias)
            mask[dim:2 * dim] = 0
        out[ours + "attn.qkv.bias"] = torch.cat([q_bias, key_bias, v_bias])
        out[ours + "attn.qkv.bias_mask"] = mask
        for kind in ("weight", "bias"):
            out[ours + f"attn.proj.{kind}"] = keys.take(attn + f"o_proj.{kind}")
            for part in ("norm1", "norm2"):
                out[ours + f"{part}.{kind}"] = keys.take(hf + f"{part}.{kind}")
            for official, name in ffn.items():
                out[ours + f"mlp.{official}.{kind}"] = keys.take(hf + f"mlp.{name}.{kind}")
        out[ours + "ls1.gamma"] = keys.take(hf + "layer_scale1.lambda1")
        out[ours + "ls2.gamma"] = keys.take(hf + "layer_scale2.lambda1")
    return out


def read_hf_folder(folder: Path) -> tuple[BackboneSpec, dict[str, Tensor]]:
    """Spec and backbone weights (official key names) of a Hugging Face model folder."""
    config = _config(folder)
    spec = hf_spec(folder, config)
    model_type = _model_type(folder, config)
    prefix = MODEL_TYPES[model_type][2]
    source = _weights_source(folder)
    tensors = _tensors(source)
    if any(k.startswith(prefix) for k in tensors):  # saved from a task model: keep the backbone part
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    layers = {int(m[1]) for k in tensors if (m := _LAYER.match(k))}
    if layers and max(layers) + 1 != spec.depth:
        raise UserError(f"{source}: the file has {max(layers) + 1} layers, "
                        f"{folder / CONFIG} says num_hidden_layers {spec.depth}")
    keys = _Keys(tensors, source, model_type)
    if spec.family == "dinov3":
        weights = _dinov3_weights(keys, spec, spec.depth)
    else:
        weights = _dinov2_weights(keys, spec.depth, registers=bool(spec.extra_tokens))
    keys.check_all_used()
    return spec, weights
