"""Network loading for the stage scripts: the frozen backbone (heads and probes join later)."""

from models import load_backbone

__all__ = ["load_backbone"]
