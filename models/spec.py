"""Backbone names (`{family}_vit_{size}_{patch}`) and the architecture each one stands for."""

import re
from dataclasses import dataclass

from utils.errors import UserError

FAMILIES = ("dino", "dinov2", "ibot", "msn", "mae", "random")
# The `random` family is the toy pipeline's untrained backbone: 2 blocks keep the patch features
# close to a random projection of the pixels (nearly isotropic, class colours stay apart) and fast.
RANDOM_DEPTH = 2
# size -> (embed dim, attention heads)
SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12), "large": (1024, 16)}
PRETRAIN_IMAGE = 224
DINOV2_PRETRAIN_IMAGE = 518
DINOV2_PATCH = 14

_NAME = re.compile(r"^(?P<family>[a-z0-9]+)_vit_(?P<size>[a-z]+)_(?P<patch>\d+)$")
VALID_NAMES = (
    "{dino,ibot,msn,mae,random}_vit_{tiny,small,base,large}_<patch dividing 224, e.g. 8 or 16>"
    " or dinov2_vit_{tiny,small,base,large}_14"
)


@dataclass(frozen=True)
class BackboneSpec:
    """Architecture of one named backbone; `pretrain_grid` is the side of its square position table."""

    family: str
    size: str
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    pretrain_grid: int

    @property
    def name(self) -> str:
        return f"{self.family}_vit_{self.size}_{self.patch_size}"


def looks_like_backbone_name(text: str) -> bool:
    """True when `text` has the `{family}_vit_{size}_{patch}` shape (valid or not)."""
    return _NAME.match(text) is not None


def parse_backbone_name(name: str) -> BackboneSpec:
    """Spec for `name`, e.g. `dino_vit_small_8`; UserError listing the valid patterns otherwise."""
    match = _NAME.match(name)
    if match is None or match["family"] not in FAMILIES or match["size"] not in SIZES:
        raise UserError(f"unknown backbone name '{name}': expected {VALID_NAMES}")
    return make_spec(match["family"], match["size"], int(match["patch"]))


def make_spec(family: str, size: str, patch_size: int) -> BackboneSpec:
    """Spec from its parts; UserError when the patch does not tile the family's pretraining image."""
    name = f"{family}_vit_{size}_{patch_size}"
    if family == "dinov2":
        if patch_size != DINOV2_PATCH:
            raise UserError(f"unknown backbone name '{name}': DINOv2 backbones have patch 14 ({VALID_NAMES})")
        pretrain_grid = DINOV2_PRETRAIN_IMAGE // DINOV2_PATCH
    else:
        if patch_size <= 0 or PRETRAIN_IMAGE % patch_size:
            raise UserError(f"unknown backbone name '{name}': the patch must divide 224 ({VALID_NAMES})")
        pretrain_grid = PRETRAIN_IMAGE // patch_size
    embed_dim, num_heads = SIZES[size]
    depth = RANDOM_DEPTH if family == "random" else 24 if size == "large" else 12
    return BackboneSpec(family, size, patch_size, embed_dim, depth, num_heads, pretrain_grid)


def size_for_embed_dim(embed_dim: int) -> str | None:
    """Size name whose width is `embed_dim`, or None."""
    return next((size for size, (dim, _) in SIZES.items() if dim == embed_dim), None)
