"""The backbone ViT: timm's VisionTransformer with the position table resized by the family's own rule."""

from functools import partial

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from models.pos_embed import INTERPOLATE_OFFSET, resize_pos_embed
from models.spec import BackboneSpec, parse_backbone_name
from utils.errors import UserError

PUBLISHED_HEADS = 12


class ViTBackbone(VisionTransformer):
    """ViT with a class token, qkv bias, LayerNorm eps 1e-6, GELU, MLP ratio 4 and fused attention
    (plus layer scale for DINOv2). `forward(img (B, 3, H, W)) -> (B, N, D)`: the last block's tokens
    after the final norm, patch tokens only, row-major over the `(H / patch, W / patch)` grid.
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
        self._offset = INTERPOLATE_OFFSET[spec.family]
        self._grid_cache: dict[tuple[int, int], Tensor] = {}
        self._grid_cache_stamp: tuple = ()

    def forward(self, img: Tensor) -> Tensor:
        if img.ndim != 4 or img.shape[1] != 3:
            raise UserError(f"{self.name}: expected images of shape (B, 3, H, W), got {tuple(img.shape)}")
        height, width = img.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise UserError(
                f"{self.name}: image size {height}x{width} is not divisible by the patch size {self.patch_size}"
            )
        return self.forward_features(img)[:, self.num_prefix_tokens:]  # (B, N, D)

    def _pos_embed(self, x: Tensor) -> Tensor:
        """Prepend the class token and add the position table resized to the patch grid."""
        batch, rows, cols, dim = x.shape  # NHWC from the size-agnostic patch embedding
        cls = self.cls_token.expand(batch, -1, -1)  # (B, 1, D)
        tokens = torch.cat([cls, x.reshape(batch, rows * cols, dim)], dim=1)  # (B, 1 + N, D)
        return tokens + self._grid_pos_embed((rows, cols))

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


def _num_heads(spec: BackboneSpec, published_12_heads: bool) -> int:
    if not published_12_heads:
        return spec.num_heads
    if (spec.family, spec.size) != ("dino", "small"):
        raise UserError(
            f"{spec.name}: published_12_heads only applies to the DINO ViT-S backbones "
            "(dino_vit_small_8, dino_vit_small_16)"
        )
    return PUBLISHED_HEADS


def build_spec_backbone(spec: BackboneSpec, published_12_heads: bool = False, depth: int | None = None) -> ViTBackbone:
    """Randomly initialised backbone for `spec` (`depth` overrides the block count)."""
    if depth is not None and depth < 1:
        raise UserError(f"{spec.name}: depth must be at least 1, got {depth}")
    return ViTBackbone(spec, _num_heads(spec, published_12_heads), spec.depth if depth is None else depth)


def build_backbone(name: str, published_12_heads: bool = False, depth: int | None = None) -> ViTBackbone:
    """Randomly initialised (trainable) backbone `name`, e.g. `dino_vit_small_8`.

    `published_12_heads=True` builds DINO ViT-S with 12 attention heads instead of the official 6,
    as the published CAUSE code does (same weight shapes, different features). Use it only to
    evaluate the published ViT-S CAUSE heads and clusters, which were trained on those features.
    `depth` overrides the number of blocks (tests and the toy pipeline only).
    """
    return build_spec_backbone(parse_backbone_name(name), published_12_heads, depth)
