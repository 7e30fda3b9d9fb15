"""torch.hub entries: one per backbone name of download.py (docs/backbones.md), and the CAUSE segmenters.

    backbone = torch.hub.load(repo_dir, "dino_vit_base_8", source="local")       # pretrained=True
    model = torch.hub.load(repo_dir, "cause_tr", source="local", dataset="cocostuff27",
                           ckpt="dino_vit_base_8", pretrained=True)              # the published head
    ids = model.predict(images)
"""
from __future__ import annotations

import os
import typing

from downloads.sources import BACKBONES
from stages import hub

if typing.TYPE_CHECKING:
    from stages.segmenter import Segmenter

# what loading an entry imports (torch.hub checks them first); gdown only when Google Drive is asked for the
# published heads (pretrained=True), and it says so in one line when it is missing
dependencies = ["torch", "torchvision", "timm", "numpy", "scipy", "PIL", "tqdm", "matplotlib", "pydensecrf",
                "safetensors", "huggingface_hub"]


def cause_mlp(dataset: str, ckpt: str | os.PathLike, pretrained: bool = False, output_dir: str | os.PathLike = "CAUSE",
              **stage_flags: typing.Any) -> Segmenter:
    """CAUSE-MLP segmenter; see `stages.hub.cause` (stage_flags: the scripts' flags, e.g. num_codebook=256)."""
    return hub.cause("MLP", dataset, ckpt, pretrained, output_dir, **stage_flags)


def cause_tr(dataset: str, ckpt: str | os.PathLike, pretrained: bool = False, output_dir: str | os.PathLike = "CAUSE",
             **stage_flags: typing.Any) -> Segmenter:
    """CAUSE-TR segmenter; see `stages.hub.cause` (stage_flags: the scripts' flags, e.g. num_codebook=256)."""
    return hub.cause("TR", dataset, ckpt, pretrained, output_dir, **stage_flags)


globals().update({name: hub.backbone_entry(name) for name in BACKBONES})
