"""Resize / crop / normalise, as the published code does it (no random augmentation anywhere).

COCO, Cityscapes, the toy set and user folders: resize the short side to the resolution
(nearest) then center-crop a square. Pascal VOC: resize straight to a square (nearest).
Images and labels go through the same geometry, so pixels stay aligned.
"""
from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from utils.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def fit(im: Image.Image, resolution: int, square_resize: bool) -> Image.Image:
    """PIL image -> (resolution x resolution) PIL image, nearest-neighbour."""
    if square_resize:
        return TF.resize(im, [resolution, resolution], interpolation=InterpolationMode.NEAREST)
    im = TF.resize(im, resolution, interpolation=InterpolationMode.NEAREST)
    return TF.center_crop(im, resolution)


def to_normalized_tensor(im: Image.Image) -> torch.Tensor:
    """RGB PIL image (H, W) -> float tensor (3, H, W), ImageNet-normalised."""
    return TF.normalize(TF.to_tensor(im), IMAGENET_MEAN, IMAGENET_STD)


def denormalize(img: torch.Tensor, rounding: bool = True) -> np.ndarray:
    """Normalised (3, H, W) tensor -> uint8 RGB array (H, W, 3).

    rounding=True recovers the original pixel levels exactly; rounding=False truncates like
    ``to_pil_image``, which is what the published code hands to the CRF.
    """
    img = img.detach().cpu()
    mean = torch.tensor(IMAGENET_MEAN, dtype=img.dtype).view(3, 1, 1)
    inv_std = torch.tensor([1 / s for s in IMAGENET_STD], dtype=img.dtype).view(3, 1, 1)
    rgb = (img / inv_std + mean).clamp(0, 1) * 255  # (3, H, W); division as the published inverse transform
    rgb = rgb.round() if rounding else rgb
    return rgb.to(torch.uint8).permute(1, 2, 0).numpy()


def to_uint8_image(img: torch.Tensor) -> np.ndarray:
    """Normalised image (3, H, W) -> RGB uint8 (H, W, 3), truncated as the published CRF input is."""
    if img.ndim != 3 or img.shape[0] != 3:
        raise UserError(f"to_uint8_image: expected a (3, H, W) image, got {tuple(img.shape)}")
    return denormalize(img, rounding=False)
