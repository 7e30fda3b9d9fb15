"""Random weights under the official DINOv3 / DINOv2-with-registers key names, and timm's
implementations of those models as the independent reference (timm reads the official files
with its own converters: `eva.checkpoint_filter_fn`, `vision_transformer.checkpoint_filter_fn`).

LayerScale is drawn around 1, not at DINOv3's 1e-5 init: a damped block would hide a wrong
k bias, RoPE or LayerNorm eps under 1e-4. The patch embedding is small so that the first norm's
input variance is near its eps (a wrong eps is then seen, not swamped).
"""
from __future__ import annotations

import timm
import torch
from timm.models import eva, vision_transformer
from torch import Tensor, nn

# size -> (embed dim, heads)
DIMS = {"tiny": (192, 3), "small": (384, 6), "small_plus": (384, 6), "base": (768, 12), "large": (1024, 16)}
DEPTH = 2
TOLERANCE = 3e-5
# small patch embeddings: the first norm then sees a variance near its eps, so a wrong eps shows
PATCH_SCALE = 5e-4


def _rnd(gen: torch.Generator, *shape: int, scale: float = 0.05) -> Tensor:
    return torch.randn(*shape, generator=gen) * scale


def _block_common(gen: torch.Generator, p: str, dim: int) -> dict[str, Tensor]:
    return {
        p + "norm1.weight": 1 + _rnd(gen, dim, scale=0.1), p + "norm1.bias": _rnd(gen, dim),
        p + "attn.proj.weight": _rnd(gen, dim, dim), p + "attn.proj.bias": _rnd(gen, dim),
        p + "ls1.gamma": 1 + _rnd(gen, dim, scale=0.1),
        p + "norm2.weight": 1 + _rnd(gen, dim, scale=0.1), p + "norm2.bias": _rnd(gen, dim),
        p + "ls2.gamma": 1 + _rnd(gen, dim, scale=0.1),
    }


def dinov3_official(size: str, depth: int = DEPTH, seed: int = 0) -> dict[str, Tensor]:
    """The object an official DINOv3 release file holds (keys of the official hub model's state
    dict), random: the k third of the qkv bias is non-zero in the file and masked by `bias_mask`."""
    gen = torch.Generator().manual_seed(seed)
    dim, heads = DIMS[size]
    head_dim = dim // heads
    periods = 100.0 ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))
    sd = {
        "cls_token": _rnd(gen, 1, 1, dim, scale=1.0), "storage_tokens": _rnd(gen, 1, 4, dim, scale=1.0),
        "mask_token": torch.zeros(1, dim), "rope_embed.periods": periods,
        "patch_embed.proj.weight": _rnd(gen, dim, 3, 16, 16, scale=PATCH_SCALE),
        "patch_embed.proj.bias": _rnd(gen, dim, scale=PATCH_SCALE),
        "norm.weight": 1 + _rnd(gen, dim, scale=0.1), "norm.bias": _rnd(gen, dim),
    }
    mask = torch.ones(3 * dim)
    mask[dim:2 * dim] = 0
    for i in range(depth):
        p = f"blocks.{i}."
        sd |= _block_common(gen, p, dim)
        sd |= {p + "attn.qkv.weight": _rnd(gen, 3 * dim, dim), p + "attn.qkv.bias": _rnd(gen, 3 * dim, scale=0.5),
               p + "attn.qkv.bias_mask": mask.clone()}
        if size == "small_plus":
            hidden = 1536  # int(384 * 6 * 2 / 3), already a multiple of 8
            sd |= {p + "mlp.w1.weight": _rnd(gen, hidden, dim), p + "mlp.w1.bias": _rnd(gen, hidden),
                   p + "mlp.w2.weight": _rnd(gen, hidden, dim), p + "mlp.w2.bias": _rnd(gen, hidden),
                   p + "mlp.w3.weight": _rnd(gen, dim, hidden), p + "mlp.w3.bias": _rnd(gen, dim)}
        else:
            sd |= {p + "mlp.fc1.weight": _rnd(gen, 4 * dim, dim), p + "mlp.fc1.bias": _rnd(gen, 4 * dim),
                   p + "mlp.fc2.weight": _rnd(gen, dim, 4 * dim), p + "mlp.fc2.bias": _rnd(gen, dim)}
    return sd


def dinov2_reg_official(size: str, depth: int = DEPTH, seed: int = 0) -> dict[str, Tensor]:
    """The object an official `dinov2_vit*14_reg4_pretrain.pth` holds, random (37x37 table)."""
    gen = torch.Generator().manual_seed(seed)
    dim, _ = DIMS[size]
    sd = {
        "cls_token": _rnd(gen, 1, 1, dim, scale=1.0), "register_tokens": _rnd(gen, 1, 4, dim, scale=1.0),
        "mask_token": torch.zeros(1, dim), "pos_embed": _rnd(gen, 1, 1 + 37 * 37, dim, scale=1.0),
        "patch_embed.proj.weight": _rnd(gen, dim, 3, 14, 14, scale=PATCH_SCALE),
        "patch_embed.proj.bias": _rnd(gen, dim, scale=PATCH_SCALE),
        "norm.weight": 1 + _rnd(gen, dim, scale=0.1), "norm.bias": _rnd(gen, dim),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        sd |= _block_common(gen, p, dim)
        sd |= {p + "attn.qkv.weight": _rnd(gen, 3 * dim, dim), p + "attn.qkv.bias": _rnd(gen, 3 * dim, scale=0.5),
               p + "mlp.fc1.weight": _rnd(gen, 4 * dim, dim), p + "mlp.fc1.bias": _rnd(gen, 4 * dim),
               p + "mlp.fc2.weight": _rnd(gen, dim, 4 * dim), p + "mlp.fc2.bias": _rnd(gen, dim)}
    return sd


def timm_dinov3(size: str, official: dict[str, Tensor], depth: int = DEPTH) -> nn.Module:
    """timm's `vit_*_patch16_dinov3_qkvb` with the official weights. (The plain `_dinov3` variants
    have no q/v bias, and their checkpoint filter drops it with only a printed message.)"""
    variant = f"vit_{size}_patch16_dinov3_qkvb"
    model = timm.create_model(variant, pretrained=False, num_classes=0, depth=depth, dynamic_img_size=True)
    model.load_state_dict(eva.checkpoint_filter_fn(dict(official), model), strict=True)
    return model.eval()


def timm_dinov2_reg(size: str, official: dict[str, Tensor], depth: int = DEPTH) -> nn.Module:
    """timm's `vit_*_patch14_reg4_dinov2` with the official weights: timm resizes the table to the
    output size with antialiased bicubic, which is the official rule for these releases."""
    model = timm.create_model(f"vit_{size}_patch14_reg4_dinov2", pretrained=False, num_classes=0, depth=depth,
                              dynamic_img_size=True)
    model.load_state_dict(vision_transformer.checkpoint_filter_fn(dict(official), model), strict=True)
    return model.eval()


def reference_patch_tokens(model: nn.Module, img: Tensor) -> Tensor:
    """The reference's patch tokens, computed in float64 (so the comparison measures our float32
    error, about 3e-6 to 7e-6 here, not agreement of two float32 kernels)."""
    with torch.inference_mode():
        return model.double().forward_features(img.double())[:, model.num_prefix_tokens:].float()


def image(height: int, width: int, seed: int = 1) -> Tensor:
    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(seed))


def tokens(model: nn.Module, img: Tensor) -> Tensor:
    with torch.inference_mode():
        return model(img)


def max_err(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()
