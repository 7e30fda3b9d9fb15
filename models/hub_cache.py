"""Backbone releases the user already has in torch's hub cache (`$TORCH_HOME/hub/checkpoints`, where
`torch.hub.load` of DINO and DINOv2 saves them), reused instead of downloaded again."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from models.checkpoint import load_backbone
from utils.errors import UserError


def cached_release(release: str) -> Path | None:
    """The official release file `release` in torch's hub cache (TORCH_HOME, else torch's default), if there."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / release
    return path if path.is_file() else None


def link_cached_release(name: str, cached: Path, final: Path) -> bool:
    """Make `final` the hub cache's file `cached` when it loads strictly as backbone `name` (a hard link, else a
    symbolic one; nothing is copied); False when it does not load (the cache is left as it is)."""
    try:
        load_backbone(cached, name=name)
    except UserError as e:
        print(f"{cached}: in the torch hub cache but does not load as {name} ({e}); left as it is, downloading "
              f"a fresh copy instead")
        return False
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(cached, final)
    except OSError:  # another file system, or no hard links there
        os.symlink(cached.resolve(), final)
    print(f"{final}: linked to {cached} from the torch hub cache (loads strictly as {name}); not downloaded")
    return True
