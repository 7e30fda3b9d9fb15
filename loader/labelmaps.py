"""Raw label pixel value (0..255) -> training class id, as 256-entry lookup tables; -1 = ignore.

Every dataset is one table applied as `table[pixels]`. Values the published code never meets
(ids outside a dataset's label set) map to -1 here.
"""
from __future__ import annotations

import numpy as np

IGNORE = -1
N_VALUES = 256  # 8-bit label images


def id_range(offset: int, n_classes: int) -> np.ndarray:
    """Table mapping raw value v -> v - offset when that lies in [0, n_classes), else -1.

    Cityscapes: id_range(7, 27) (label ids 7..33 -> 0..26, void ids 0..6 -> -1).
    Pascal VOC: id_range(0, 21) (255 border -> -1). Pre-cropped sets store class + 1: id_range(1, 255).
    """
    values = np.arange(N_VALUES) - offset
    return np.where((values >= 0) & (values < n_classes), values, IGNORE).astype(np.int64)


def from_pairs(pairs: dict[int, int]) -> np.ndarray:
    """Table with the given raw -> class entries, -1 elsewhere."""
    table = np.full(N_VALUES, IGNORE, dtype=np.int64)
    for raw, cls in pairs.items():
        table[raw] = cls
    return table


# COCO-Stuff-164k fine ids (0-based, 0..181, 255 = unlabeled). Ids 0..90 are thing slots, 91..181
# stuff; these thing slots have no category in COCO and never occur in the annotations:
COCO_UNUSED_THING_IDS = frozenset({11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90})
COCO_THING_IDS = tuple(i for i in range(91) if i not in COCO_UNUSED_THING_IDS)  # 80 things
COCO_STUFF_IDS = tuple(range(91, 182))                                           # 91 stuff

# COCO-Stuff-27 (STEGO / CAUSE): fine id -> coarse id. Things by supercategory as runs of
# (number of consecutive fine ids, coarse id) starting at fine id 0; then one coarse id per stuff id.
_COCO27_THING_RUNS = ((1, 9), (8, 11), (6, 8), (10, 7), (8, 6), (10, 10), (8, 5), (10, 2), (10, 3),
                      (6, 0), (6, 1), (8, 4))
_COCO27_STUFF = (17, 17, 22, 20, 20, 22, 15, 25, 16, 13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21,
                 15, 25, 13, 13, 13, 13, 13, 22, 26, 14, 14, 15, 22, 21, 21, 24, 20, 22, 15, 17,
                 16, 15, 22, 24, 21, 17, 25, 16, 21, 17, 22, 16, 21, 21, 25, 21, 26, 21, 24, 20,
                 17, 14, 21, 26, 15, 23, 20, 21, 24, 15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18,
                 18, 18, 18, 18, 18, 18, 26, 26, 19, 19, 24)


def _coco27() -> np.ndarray:
    coarse = [c for count, c in _COCO27_THING_RUNS for _ in range(count)] + list(_COCO27_STUFF)
    return from_pairs(dict(enumerate(coarse)))


COCOSTUFF27 = _coco27()
# COCO-81 (CAUSE): the 80 things in id order -> 1..80, every stuff id -> 0 ("stuff").
COCO81 = from_pairs({**{i: k + 1 for k, i in enumerate(COCO_THING_IDS)}, **{i: 0 for i in COCO_STUFF_IDS}})
# COCO-171 (CAUSE): all used fine ids in order, things then stuff -> 0..170.
COCO171 = from_pairs({i: k for k, i in enumerate(COCO_THING_IDS + COCO_STUFF_IDS)})
CITYSCAPES = id_range(7, 27)
PASCALVOC = id_range(0, 21)
CROPPED = id_range(1, N_VALUES - 1)  # crop_dataset.py writes class + 1 (0 = ignore)
# Potsdam-3 (STEGO): ISPRS impervious surfaces 0 + car 4 -> 0, building 1 + clutter 5 -> 1,
# low vegetation 2 + tree 3 -> 2.
POTSDAM = from_pairs({0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2})
