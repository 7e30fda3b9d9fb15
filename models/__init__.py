"""Self-supervised ViT backbones (DINO, DINOv2 with and without registers, DINOv3, iBOT, MSN, MAE, and our
random toy ones) and their checkpoint files or Hugging Face model folders."""

from models.build import Backbone, build_backbone
from models.checkpoint import load_backbone, save_random_checkpoint
from models.dinov3 import DinoV3Backbone
from models.spec import BackboneSpec, parse_backbone_name
from models.vit import ViTBackbone

__all__ = [
    "Backbone",
    "BackboneSpec",
    "DinoV3Backbone",
    "ViTBackbone",
    "build_backbone",
    "load_backbone",
    "parse_backbone_name",
    "save_random_checkpoint",
]
