"""Building a randomly initialised backbone from its name or spec."""

from models.dinov3 import DinoV3Backbone
from models.spec import BackboneSpec, parse_backbone_name
from models.vit import PUBLISHED_HEADS, ViTBackbone
from utils.errors import UserError

Backbone = ViTBackbone | DinoV3Backbone


def _num_heads(spec: BackboneSpec, published_12_heads: bool) -> int:
    if not published_12_heads:
        return spec.num_heads
    if (spec.family, spec.size) != ("dino", "small"):
        raise UserError(
            f"{spec.name}: published_12_heads only applies to the DINO ViT-S backbones "
            "(dino_vit_small_8, dino_vit_small_16)"
        )
    return PUBLISHED_HEADS


def build_spec_backbone(spec: BackboneSpec, published_12_heads: bool = False, depth: int | None = None) -> Backbone:
    """Randomly initialised backbone for `spec` (`depth` overrides the block count)."""
    if depth is not None and depth < 1:
        raise UserError(f"{spec.name}: depth must be at least 1, got {depth}")
    heads = _num_heads(spec, published_12_heads)
    blocks = spec.depth if depth is None else depth
    if spec.family == "dinov3":
        return DinoV3Backbone(spec, blocks)
    return ViTBackbone(spec, heads, blocks)


def build_backbone(name: str, published_12_heads: bool = False, depth: int | None = None) -> Backbone:
    """Randomly initialised (trainable) backbone `name`, e.g. `dino_vit_small_8`.

    `published_12_heads=True` builds DINO ViT-S with 12 attention heads instead of the official 6,
    as the published CAUSE code does (same weight shapes, different features). Use it only to
    evaluate the published ViT-S CAUSE heads and clusters, which were trained on those features.
    `depth` overrides the number of blocks (tests and the toy pipeline only).
    """
    return build_spec_backbone(parse_backbone_name(name), published_12_heads, depth)
