"""From dense features to cluster predictions, as the published test scripts do it.

A `FeatureFn` maps images (B, 3, H, W) to a feature map (B, r, h, w): CAUSE's teacher head, or
the bare backbone for the k-means baseline. Features are upsampled (bilinear) to the label size,
cluster logits are cos(feature, probe row), the prediction is their argmax. The CRF pass averages
the features with the mirrored image's (flipped back) and hands log_softmax(3 x logits) to the CRF.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from modules.functional import cluster_logits

CRF_LOGIT_SCALE = 3.0

FeatureFn = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) -> (B, r, h, w)


@dataclass
class Prediction:
    cluster: torch.Tensor             # (B, H, W) argmax of the plain (unflipped) cluster logits
    crf_input: torch.Tensor | None    # (B, C, H, W) log-probabilities for the CRF (flip-averaged features)
    linear: torch.Tensor | None       # (B, H, W) linear-probe prediction, when there is a probe


def upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size, mode="bilinear", align_corners=False)


def upsampled_logits(feat: torch.Tensor, probe: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """cos(upsample(feat), probe) (B, C, H, W) from feat (B, r, h, w) and probe (C, r).

    One image at a time: a wide backbone map upsampled to label size would not fit at once."""
    return torch.cat([cluster_logits(upsample(f[None], size), probe) for f in feat])


def cluster_ids(feat: torch.Tensor, probe: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """argmax_c cos(upsample(feat), probe_c) (B, H, W), computed as argmax_c upsample(feat . probe_c / |probe_c|).

    Bilinear upsampling is linear and a pixel's 1/|x| scales all its classes alike, so the arg-max is the
    same (up to float rounding at exact ties) while only C low-resolution maps are upsampled and nothing
    is normalised at label size."""
    unit = torch.nn.functional.normalize(probe, dim=1)  # (C, r)
    low = torch.einsum("brhw,cr->bchw", feat, unit.to(feat.dtype))  # (B, C, h, w)
    return torch.cat([upsample(one[None], size).argmax(1) for one in low])


def with_flip(features: FeatureFn, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(plain, flip-averaged) feature maps (B, r, h, w): the second averages in the mirrored image's."""
    plain = features(img)
    mirrored = features(img.flip(dims=[3])).flip(dims=[3])
    return plain, (plain + mirrored) / 2


def linear_prediction(feat: torch.Tensor, linear: torch.nn.Module, size: tuple[int, int]) -> torch.Tensor:
    """Linear-probe classes (B, H, W) of a feature map (B, r, h, w), upsampled to `size`."""
    return upsample(linear(feat).float(), size).argmax(1)


@torch.no_grad()
def predict(features: FeatureFn, probe: torch.Tensor, img: torch.Tensor, size: tuple[int, int], crf: bool,
            linear: torch.nn.Module | None = None) -> Prediction:
    """Predictions at `size` for a batch of images; the CRF input only when `crf`."""
    if crf:
        plain, averaged = with_flip(features, img)
        crf_input = torch.log_softmax(CRF_LOGIT_SCALE * upsampled_logits(averaged, probe, size), dim=1)
    else:
        plain, crf_input = features(img), None
    cluster = cluster_ids(plain, probe, size)
    linear_pred = None if linear is None else linear_prediction(plain, linear, size)
    return Prediction(cluster=cluster, crf_input=crf_input, linear=linear_pred)
