"""How each family's official checkpoint file stores the backbone weights.

DINO, DINOv2 (with or without registers) and DINOv3 files are a bare state dict; MAE keeps it under `"model"`, iBOT under
`"state_dict"`, MSN under `"target_encoder"` with a `module.` prefix on every key. Backbone key
names already equal timm's. Parts that are not the backbone are dropped on purpose: heads
(`head.*`, MSN's projection `fc.*`), MAE's decoder (`decoder_*`), mask tokens (DINOv2, DINOv3 and MAE
`mask_token`, iBOT's `masked_embed`). The released MAE encoder file
(`mae_pretrain_vit_base.pth`) holds no decoder, but full MAE training files do.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from utils.errors import UserError


@dataclass(frozen=True)
class Layout:
    container: str | None  # top-level key holding the weights; None for a bare state dict
    prefix: str  # prefix on every weight key inside the container
    dropped: tuple[str, ...]  # key prefixes of non-backbone parts
    description: str


_BARE = "a bare state dict"
LAYOUTS = {
    "dino": Layout(None, "", ("head.",), _BARE),
    "random": Layout(None, "", ("head.",), _BARE),
    "dinov2": Layout(None, "", ("mask_token", "head."), _BARE),
    "dinov3": Layout(None, "", ("mask_token",), _BARE),
    "ibot": Layout("state_dict", "", ("head.", "masked_embed"), "weights under 'state_dict'"),
    "msn": Layout("target_encoder", "module.", ("fc.",), "weights under 'target_encoder' with a 'module.' prefix"),
    "mae": Layout("model", "", ("mask_token", "decoder_"), "weights under 'model'"),
}


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def guess_family(obj: object) -> str | None:
    """Family whose official layout `obj` has, from its keys alone; None if none fits."""
    if not isinstance(obj, dict):
        return None
    encoder = obj.get("target_encoder")
    if _is_state_dict(encoder) and all(k.startswith("module.") for k in encoder):
        return "msn"
    if _is_state_dict(obj.get("model")):
        return "mae"
    if _is_state_dict(obj.get("state_dict")):
        return "ibot"
    if _is_state_dict(obj):
        if "storage_tokens" in obj or "rope_embed.periods" in obj:
            return "dinov3"
        is_dinov2 = "mask_token" in obj or any(k.endswith(".ls1.gamma") for k in obj)
        return "dinov2" if is_dinov2 else "dino"
    return None


def extract_backbone(obj: object, family: str, path: str) -> dict[str, Tensor]:
    """Backbone tensors of a loaded checkpoint, with the family's container, prefix and
    non-backbone parts removed. UserError if the file does not have the family's layout."""
    layout = LAYOUTS[family]
    weights = obj.get(layout.container) if layout.container and isinstance(obj, dict) else obj
    if not _is_state_dict(weights):
        found = [str(k) for k in obj][:8] if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"{path}: expected the {family} checkpoint layout ({layout.description}), found {found}")
    unprefixed = {k[len(layout.prefix):] if k.startswith(layout.prefix) else k: v for k, v in weights.items()}
    return {k: v for k, v in unprefixed.items() if not k.startswith(layout.dropped)}


def wrap_backbone(state_dict: dict[str, Tensor], family: str) -> dict:
    """The object an official file of `family` holds for these backbone weights, including the
    non-backbone parts such files always carry (DINOv2's and DINOv3's `mask_token`, MSN's projection head)."""
    layout = LAYOUTS[family]
    weights = dict(state_dict)
    dim = state_dict["cls_token"].shape[-1]
    if family in ("dinov2", "dinov3"):
        weights["mask_token"] = torch.zeros(1, dim)
    if family == "msn":
        for i in (1, 2, 3):
            weights[f"fc.fc{i}.weight"] = torch.randn(dim, dim) * 0.02
            weights[f"fc.fc{i}.bias"] = torch.zeros(dim)
    weights = {layout.prefix + k: v for k, v in weights.items()}
    return {layout.container: weights} if layout.container else weights
