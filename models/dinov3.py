"""The DINOv3 ViT backbone (patch 16, RoPE, 4 storage tokens, LayerScale, masked k bias), with the
official release's module and weight names, so an official file loads key for key.

Architecture of the released LVD-1689M ViT-S/S+/B/L (the official hub constructors): LayerNorm
eps 1e-5 everywhere, qkv with a bias whose k third is zeroed by the stored `bias_mask`, RoPE base
100 (see models/rope.py), GELU MLP of ratio 4, or for S+ a SwiGLU of ratio 6 (hidden width
`int(6 D * 2 / 3)` rounded up to 8), LayerScale (initialised at 1e-5), one final norm for all tokens
(the released files do not untie the class and patch norms).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.rope import apply_rope, rope_periods, rope_sin_cos
from models.spec import BackboneSpec
from models.vit import check_images

NORM_EPS = 1e-5
ROPE_BASE = 100.0
LAYERSCALE_INIT = 1e-5
MLP_RATIO = 4
SWIGLU_RATIO = 6
SWIGLU_ALIGN = 8


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class MaskedBiasQKV(nn.Linear):
    """`D -> 3 D` projection whose bias is multiplied by the stored `bias_mask` (1 for q and v,
    0 for k in the released files: the keys have no bias)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, 3 * dim)
        mask = torch.ones(3 * dim)
        mask[dim:2 * dim] = 0
        self.register_buffer("bias_mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias * self.bias_mask.to(self.bias.dtype))


class RopeAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = MaskedBiasQKV(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
        """`x (B, T, D)`, `sin, cos (N, D / heads)` for the last N tokens (the patches) -> `(B, T, D)`."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, T, D / heads)
        prefix = tokens - sin.shape[0]  # class and storage tokens keep their features unrotated
        q = torch.cat([q[:, :, :prefix], apply_rope(q[:, :, prefix:], sin, cos)], dim=2)
        k = torch.cat([k[:, :, :prefix], apply_rope(k[:, :, prefix:], sin, cos)], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, D / heads)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """`w3(silu(w1 x) * w2 x)`."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        width = int(hidden * 2 / 3)
        width += -width % SWIGLU_ALIGN
        self.w1 = nn.Linear(dim, width)
        self.w2 = nn.Linear(dim, width)
        self.w3 = nn.Linear(width, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, swiglu: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn = RopeAttention(dim, num_heads)
        self.ls1 = LayerScale(dim, LAYERSCALE_INIT)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = SwiGLU(dim, dim * SWIGLU_RATIO) if swiglu else Mlp(dim, dim * MLP_RATIO)
        self.ls2 = LayerScale(dim, LAYERSCALE_INIT)

    def forward(self, x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), sin, cos))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, img: Tensor) -> Tensor:
        """`(B, 3, H, W) -> (B, D, H / patch, W / patch)`."""
        return self.proj(img)


class RopeEmbed(nn.Module):
    """Holds the `periods` the released files store (`rope_embed.periods`)."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.register_buffer("periods", rope_periods(head_dim, ROPE_BASE))

    def forward(self, rows: int, cols: int) -> tuple[Tensor, Tensor]:
        return rope_sin_cos(self.periods, rows, cols)


class DinoV3Backbone(nn.Module):
    """`forward(img (B, 3, H, W)) -> (B, N, D)`: the official `x_norm_patchtokens`, i.e. the last
    block's patch tokens after the final norm (class and storage tokens dropped), row-major over the
    `(H / 16, W / 16)` grid; any H, W divisible by 16. Attributes as `ViTBackbone`."""

    def __init__(self, spec: BackboneSpec, depth: int) -> None:
        super().__init__()
        dim = spec.embed_dim
        self.name = spec.name
        self.family = spec.family
        self.patch_size = spec.patch_size
        self.embed_dim = dim
        self.num_heads = spec.num_heads
        self.num_prefix_tokens = 1 + spec.extra_tokens
        self.patch_embed = PatchEmbed(spec.patch_size, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.storage_tokens = nn.Parameter(torch.randn(1, spec.extra_tokens, dim) * 0.02)
        self.rope_embed = RopeEmbed(dim // spec.num_heads)
        self.blocks = nn.ModuleList([Block(dim, spec.num_heads, spec.swiglu) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, img: Tensor) -> Tensor:
        check_images(self.name, img, self.patch_size)
        patches = self.patch_embed(img)  # (B, D, rows, cols)
        batch, dim, rows, cols = patches.shape
        x = torch.cat([self.cls_token.expand(batch, -1, -1), self.storage_tokens.expand(batch, -1, -1),
                       patches.flatten(2).transpose(1, 2)], dim=1)  # (B, 1 + 4 + N, D)
        sin, cos = self.rope_embed(rows, cols)  # (N, D / heads) each
        for block in self.blocks:
            x = block(x, sin, cos)
        return self.norm(x)[:, self.num_prefix_tokens:]  # (B, N, D)
