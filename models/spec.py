"""Backbone names (`[random_]{family}_vit_{size}_{patch}[_reg4]`, plus the official release file
names) and the architecture each one stands for."""

import re
from dataclasses import dataclass

from utils.errors import UserError

FAMILIES = ("dino", "dinov2", "dinov3", "ibot", "msn", "mae", "random")
# The `random` family is the toy pipeline's untrained backbone: 2 blocks keep the patch features
# close to a random projection of the pixels (nearly isotropic, class colours stay apart) and fast.
# A `random_` prefix gives the same for another family's architecture (e.g. random_dinov3_vit_tiny_16).
RANDOM_DEPTH = 2
# size -> (embed dim, attention heads)
SIZES = {"tiny": (192, 3), "small": (384, 6), "small_plus": (384, 6), "base": (768, 12), "large": (1024, 16)}
PRETRAIN_IMAGE = 224
DINOV2_PRETRAIN_IMAGE = 518
DINOV2_PATCH = 14
DINOV3_PATCH = 16
# tokens between the class token and the patches: DINOv2 `_reg4` registers, DINOv3 storage tokens
EXTRA_TOKENS = 4

_NAME = re.compile(
    r"^(?P<random>random_)?(?P<family>[a-z0-9]+)_vit_(?P<size>[a-z]+(?:_plus)?)_(?P<patch>\d+)(?P<reg>_reg4)?$"
)
# official release file stems (any hash suffix) -> our names
_DINOV3_FILE = re.compile(r"^dinov3_vit(?P<size>[sbl])16(?P<plus>plus)?_pretrain_lvd1689m(?:-[0-9a-f]+)?$")
_DINOV2_FILE = re.compile(r"^dinov2_vit(?P<size>[sbl])14(?P<reg>_reg4)?_pretrain$")
_LETTER_SIZES = {"s": "small", "b": "base", "l": "large"}
VALID_NAMES = (
    "{dino,ibot,msn,mae,random}_vit_{tiny,small,base,large}_<patch dividing 224, e.g. 8 or 16>, "
    "dinov2_vit_{tiny,small,base,large}_14[_reg4], dinov3_vit_{tiny,small,small_plus,base,large}_16 "
    "(a random_ prefix: random weights of that architecture), or an official DINOv2/DINOv3 release file "
    "name such as dinov3_vitb16_pretrain_lvd1689m-73cec8be"
)


@dataclass(frozen=True)
class BackboneSpec:
    """Architecture of one named backbone. `pretrain_grid` is the side of its square position table
    (unused by DINOv3, whose RoPE has none); `extra_tokens` sit between the class token and the
    patches (DINOv2 registers, DINOv3 storage tokens); `random` marks a random-weight toy backbone,
    whose block count is read from its file."""

    family: str
    size: str
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    pretrain_grid: int
    extra_tokens: int = 0
    random: bool = False

    @property
    def name(self) -> str:
        prefix = "random_" if self.random and self.family != "random" else ""
        suffix = f"_reg{self.extra_tokens}" if self.family == "dinov2" and self.extra_tokens else ""
        return f"{prefix}{self.family}_vit_{self.size}_{self.patch_size}{suffix}"

    @property
    def swiglu(self) -> bool:
        """SwiGLU feed-forward (DINOv3 ViT-S+) instead of the GELU MLP."""
        return self.size == "small_plus"


def official_file_name(stem: str) -> str | None:
    """Our name for an official DINOv2/DINOv3 release file stem, e.g.
    `dinov3_vits16plus_pretrain_lvd1689m-4057cbaa` -> `dinov3_vit_small_plus_16`; None otherwise."""
    if match := _DINOV3_FILE.match(stem):
        return f"dinov3_vit_{_LETTER_SIZES[match['size']]}{'_plus' if match['plus'] else ''}_16"
    if match := _DINOV2_FILE.match(stem):
        return f"dinov2_vit_{_LETTER_SIZES[match['size']]}_14{match['reg'] or ''}"
    return None


def name_from_stem(stem: str) -> str | None:
    """The backbone name a checkpoint file stem stands for: itself when it has the name shape
    (valid or not, so that a wrong name is reported), an official file's name, or None."""
    if _NAME.match(stem):
        return stem
    return official_file_name(stem)


def parse_backbone_name(name: str) -> BackboneSpec:
    """Spec for `name`, e.g. `dino_vit_small_8` or an official file stem; UserError listing the
    valid patterns otherwise."""
    match = _NAME.match(official_file_name(name) or name)
    if (match is None or match["family"] not in FAMILIES or match["size"] not in SIZES
            or (match["random"] and match["family"] == "random")):
        raise UserError(f"unknown backbone name '{name}': expected {VALID_NAMES}")
    family, size = match["family"], match["size"]
    if size == "small_plus" and family != "dinov3":
        raise UserError(f"unknown backbone name '{name}': small_plus is a DINOv3 size ({VALID_NAMES})")
    if match["reg"] and family != "dinov2":
        raise UserError(f"unknown backbone name '{name}': _reg4 is for DINOv2 with registers ({VALID_NAMES})")
    extra = EXTRA_TOKENS if match["reg"] else 0
    return make_spec(family, size, int(match["patch"]), extra, random=bool(match["random"]))


def make_spec(family: str, size: str, patch_size: int, extra_tokens: int = 0, random: bool = False,
              depth: int | None = None) -> BackboneSpec:
    """Spec from its parts (`depth`: the standard one for the size unless given); UserError when
    the patch does not fit the family."""
    name = f"{family}_vit_{size}_{patch_size}"
    if family == "dinov2":
        if patch_size != DINOV2_PATCH:
            raise UserError(f"unknown backbone name '{name}': DINOv2 backbones have patch 14 ({VALID_NAMES})")
        pretrain_grid = DINOV2_PRETRAIN_IMAGE // DINOV2_PATCH
    elif family == "dinov3":
        if patch_size != DINOV3_PATCH:
            raise UserError(f"unknown backbone name '{name}': DINOv3 backbones have patch 16 ({VALID_NAMES})")
        pretrain_grid = PRETRAIN_IMAGE // DINOV3_PATCH
        extra_tokens = EXTRA_TOKENS
    else:
        if patch_size <= 0 or PRETRAIN_IMAGE % patch_size:
            raise UserError(f"unknown backbone name '{name}': the patch must divide 224 ({VALID_NAMES})")
        pretrain_grid = PRETRAIN_IMAGE // patch_size
    embed_dim, num_heads = SIZES[size]
    random = random or family == "random"
    if depth is None:
        depth = RANDOM_DEPTH if random else 24 if size == "large" else 12
    return BackboneSpec(family, size, patch_size, embed_dim, depth, num_heads, pretrain_grid, extra_tokens, random)


def size_for_embed_dim(embed_dim: int) -> str | None:
    """Size name whose width is `embed_dim`, or None (384 is `small`; S+ is told apart by its FFN)."""
    return next((size for size, (dim, _) in SIZES.items() if dim == embed_dim), None)
