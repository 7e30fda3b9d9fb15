"""The learned-position backbone ViT (DINO, DINOv2 with and without registers, iBOT, MSN, MAE):
timm's VisionTransformer with the position table resized by the family's own rule."""

from functools import partial

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from models.pos_embed import INTERPOLATE_OFFSET, resize_pos_embed
from models.spec import BackboneSpec
from utils.errors import UserError

PUBLISHED_HEADS = 12


def check_images(name: str, img: Tensor, patch_size: int) -> None:
    """UserError unless `img` is `(B, 3, H, W)` with H and W divisible by the patch."""
    if img.ndim != 4 or img.shape[1] != 3:
        raise UserError(f"{name}: expected images of shape (B, 3, H, W), got {tuple(img.shape)}")
    height, width = img.shape[-2:]
    if height % patch_size or width % patch_size:
        raise UserError(f"{name}: image size {height}x{width} is not divisible by the patch size {patch_size}")


class ViTBackbone(VisionTransformer):
    """ViT with a class token, qkv bias, LayerNorm eps 1e-6, GELU, MLP ratio 4 and fused attention
    (plus layer scale for DINOv2, and for `_reg4` four register tokens after the class token, with no
    position of their own, as the official code inserts them). `forward(img (B, 3, H, W)) -> (B, N, D)`:
    the last block's tokens after the final norm, patch tokens only (registers dropped), row-major
    over the `(H / patch, W / patch)` grid.
    Any H, W divisible by the patch. Attributes: `name`, `family`, `patch_size`, `embed_dim`, `num_heads`.
    """

    def __init__(self, spec: BackboneSpec, num_heads: int, depth: int) -> None:
        super().__init__(
            img_size=spec.pretrain_grid * spec.patch_size,
            patch_size=spec.patch_size,
            num_classes=0,
            global_pool="",
            embed_dim=spec.embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            init_values=1.0 if spec.family == "dinov2" else None,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            act_layer=nn.GELU,
            dynamic_img_size=True,
        )
        self.name = spec.name
        self.family = spec.family
        self.patch_size = spec.patch_size
        self.num_heads = num_heads
        if spec.extra_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, spec.extra_tokens, spec.embed_dim))
            self.num_prefix_tokens = 1 + spec.extra_tokens
        # None: the output-size rule of DINOv2 with registers (see models/pos_embed.py)
        self._offset = None if spec.extra_tokens else INTERPOLATE_OFFSET[spec.family]
        self._grid_cache: dict[tuple[int, int], Tensor] = {}
        self._grid_cache_stamp: tuple = ()

    def forward(self, img: Tensor) -> Tensor:
        check_images(self.name, img, self.patch_size)
        return self.forward_features(img)[:, self.num_prefix_tokens:]  # (B, N, D)

    def _pos_embed(self, x: Tensor) -> Tensor:
        """Prepend the class token, add the position table resized to the patch grid, then insert
        the register tokens (if any) after the class token."""
        batch, rows, cols, dim = x.shape  # NHWC from the size-agnostic patch embedding
        cls = self.cls_token.expand(batch, -1, -1)  # (B, 1, D)
        tokens = torch.cat([cls, x.reshape(batch, rows * cols, dim)], dim=1)  # (B, 1 + N, D)
        tokens = tokens + self._grid_pos_embed((rows, cols))
        if self.num_prefix_tokens == 1:
            return tokens
        registers = self.register_tokens.expand(batch, -1, -1)  # (B, R, D)
        return torch.cat([tokens[:, :1], registers, tokens[:, 1:]], dim=1)  # (B, 1 + R + N, D)

    def _grid_pos_embed(self, grid: tuple[int, int]) -> Tensor:
        """`(1, 1 + N, D)` table for `grid`; cached per grid while the table is frozen (and not an
        inference tensor, which has no version counter). The cache is dropped whenever the table
        is written in place, moved or cast."""
        if self.pos_embed.requires_grad or self.pos_embed.is_inference():
            return resize_pos_embed(self.pos_embed, grid, self._offset)
        stamp = (self.pos_embed.data_ptr(), self.pos_embed.device, self.pos_embed._version)
        if stamp != self._grid_cache_stamp:
            self._grid_cache = {}
            self._grid_cache_stamp = stamp
        if grid not in self._grid_cache:
            # a plain tensor, so the cache also serves calls made outside inference_mode
            with torch.inference_mode(False), torch.no_grad():
                self._grid_cache[grid] = resize_pos_embed(self.pos_embed, grid, self._offset)
        return self._grid_cache[grid]
