"""Self-supervised ViT backbones (DINO, DINOv2, iBOT, MSN, MAE, and our random toy one) and their checkpoint files."""

from models.checkpoint import load_backbone, save_random_checkpoint
from models.spec import BackboneSpec, parse_backbone_name
from models.vit import ViTBackbone, build_backbone

__all__ = [
    "BackboneSpec",
    "ViTBackbone",
    "build_backbone",
    "load_backbone",
    "parse_backbone_name",
    "save_random_checkpoint",
]
