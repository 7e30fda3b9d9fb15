"""What the `torch.hub` entries of hubconf.py do: backbones by name, CAUSE segmenters by dataset and backbone."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from models import Backbone, build_backbone, load_backbone
from downloads.sources import BACKBONES
from downloads.fetch import K_PUBLISHED, fetch_backbone, fetch_published
from stages.segmenter import Segmenter, load_segmenter
from utils.config import checkpoint_stem


def backbone(name: str, pretrained: bool = True, ckpt_dir: str | os.PathLike = "checkpoint",
             published_12_heads: bool = False) -> Backbone:
    """Backbone `name`: frozen official weights (`ckpt_dir/<name>.pth`, else the torch hub cache's release
    file, else downloaded and verified as `download.py backbone` does), or random weights (pretrained=False)."""
    if not pretrained:
        return build_backbone(name, published_12_heads=published_12_heads)
    return load_backbone(fetch_backbone(name, Path(ckpt_dir)), name=name, published_12_heads=published_12_heads)


def cause(structure: str, dataset: str, ckpt: str | os.PathLike, pretrained: bool = False,
          output_dir: str | os.PathLike = "CAUSE", ckpt_dir: str | os.PathLike = "checkpoint",
          **stage_flags: Any) -> Segmenter:
    """The CAUSE segmenter of `dataset` on backbone `ckpt` (a file, a backbone name of download.py, a Hugging
    Face model folder or id). pretrained=False: the artifacts the stages wrote under `output_dir`;
    pretrained=True: the published head, cluster probe and codebook of that row, fetched there first
    (K = 2048, and the published 12-head DINO ViT-S where the row needs it)."""
    if pretrained:
        name = checkpoint_stem(str(ckpt))
        fetch_published(dataset, name, structure, Path(output_dir), ckpt_dir=Path(ckpt_dir))
        stage_flags.setdefault("num_codebook", K_PUBLISHED)
        stage_flags.setdefault("published_12_heads", name.startswith("dino_vit_small"))
    if str(ckpt) in BACKBONES and not Path(ckpt).exists():
        ckpt = fetch_backbone(str(ckpt), Path(ckpt_dir))
    return load_segmenter(ckpt, dataset, structure=structure, output_dir=output_dir, **stage_flags)


def backbone_entry(name: str) -> Callable[..., Backbone]:
    def entry(pretrained: bool = True, ckpt_dir: str | os.PathLike = "checkpoint",
              published_12_heads: bool = False) -> Backbone:
        return backbone(name, pretrained, ckpt_dir, published_12_heads)
    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (f"{name}: {backbone.__doc__.split(':', 1)[1].strip()}\n\n"
                     f"Official release file: {BACKBONES[name].release}.")
    return entry
