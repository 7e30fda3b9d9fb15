"""Per-dataset class names, thing/stuff flags and colour palettes for pictures and reports.

Class order follows the label ids the loaders produce (see SPEC.md, Datasets):
- cocostuff27: the 12 coarse "thing" then 15 coarse "stuff" super-categories of COCO-Stuff
  (two pairs share a name, ``food`` and ``furniture``: thing and stuff versions).
- coco171: the 80 COCO things (fine ids 0..89 without the 10 unused ids) then the 91
  COCO-Stuff stuff classes (fine ids 91..181), in fine-id order.
- coco81: class 0 gathers every stuff class; 1..80 are the COCO things.
- cityscapes: label id minus 7; "thing" = the Cityscapes classes with instances.
- pascalvoc: background (stuff) and the 20 VOC objects.
- potsdam, potsdamraw: STEGO's three merged ISPRS classes, all stuff.
- toy: the synthetic set (`loader.toy.TOY_CLASSES`; the last, ``object``, is the one thing).
- directory: a user's folder; classes are named ``class i`` and have no thing/stuff split.
Palettes: the Cityscapes colours for cityscapes, the Pascal VOC bit-interleaved colour map
for every other dataset (the published code makes the same choice), with two changes so that
every class has its own colour and none looks like shadow: class 0 is ZERO_COLOR instead of
VOC black, and Cityscapes' polegroup is POLEGROUP_COLOR instead of pole's grey.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from loader.toy import TOY_CLASSES as TOY
from utils.errors import UserError

COCO_THINGS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

COCO_STUFF = (
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter",
    "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other",
    "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves",
    "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf",
    "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)

COCOSTUFF27_THINGS = ("electronic", "appliance", "food", "furniture", "indoor", "kitchen",
                      "accessory", "animal", "outdoor", "person", "sports", "vehicle")
COCOSTUFF27_STUFF = ("ceiling", "floor", "food", "furniture", "rawmaterial", "textile", "wall",
                     "window", "building", "ground", "plant", "sky", "solid", "structural", "water")

CITYSCAPES = ("road", "sidewalk", "parking", "rail track", "building", "wall", "fence",
              "guard rail", "bridge", "tunnel", "pole", "polegroup", "traffic light",
              "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
              "bus", "caravan", "trailer", "train", "motorcycle", "bicycle")
CITYSCAPES_THINGS = frozenset({"person", "rider", "car", "truck", "bus", "caravan", "trailer",
                               "train", "motorcycle", "bicycle"})

# (27, 3): the official Cityscapes colour of each class above, same order.
CITYSCAPES_COLORS = (
    (128, 64, 128), (244, 35, 232), (250, 170, 160), (230, 150, 140), (70, 70, 70),
    (102, 102, 156), (190, 153, 153), (180, 165, 180), (150, 100, 100), (150, 120, 90),
    (153, 153, 153), (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35),
    (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 0, 90), (0, 0, 110), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

ZERO_COLOR = (255, 210, 40)       # class 0 of the VOC colour map (black there); no VOC colour below id 512
POLEGROUP_COLOR = (153, 153, 60)  # official: (153, 153, 153), the colour of pole

POTSDAM = ("roads and cars", "buildings and clutter", "vegetation and trees")

VOC = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
       "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
       "sheep", "sofa", "train", "tvmonitor")


@dataclass(frozen=True)
class ClassInfo:
    names: tuple[str, ...]
    is_thing: tuple[bool, ...]
    palette: np.ndarray         # (K, 3) uint8, K >= len(names); row i colours label i


def voc_palette(n: int = 256) -> np.ndarray:
    """(n, 3) uint8 Pascal VOC colour map: the bits of i are dealt out to R, G, B from the top bit down."""
    ids = np.arange(n)
    palette = np.zeros((n, 3), dtype=np.int64)
    for shift in range(7, -1, -1):
        for channel in range(3):
            palette[:, channel] |= ((ids >> channel) & 1) << shift
        ids = ids >> 3
    return palette.astype(np.uint8)


def cityscapes_palette() -> np.ndarray:
    """(27, 3) uint8 Cityscapes colours in label order (label id minus 7)."""
    return np.array(CITYSCAPES_COLORS, dtype=np.uint8)


def class_palette(dataset: str, n: int = 256) -> np.ndarray:
    """(max(n, 27 or 256), 3) uint8 colours of the classes of `dataset`: the published palette with class 0
    ZERO_COLOR instead of black, and (Cityscapes) polegroup apart from pole."""
    if dataset == "cityscapes":
        palette = cityscapes_palette()
        palette[CITYSCAPES.index("polegroup")] = POLEGROUP_COLOR
        return palette
    palette = voc_palette(max(256, n))
    palette[0] = ZERO_COLOR
    return palette


def class_info(dataset: str, n_classes: int | None = None) -> ClassInfo:
    """Names, thing flags and palette of `dataset`; `n_classes` is required for ``directory``."""
    if dataset == "directory":
        if n_classes is None or n_classes < 1:
            raise UserError(f"dataset 'directory' needs a positive class count, got {n_classes}")
        return ClassInfo(tuple(f"class {i}" for i in range(n_classes)), (False,) * n_classes,
                         class_palette(dataset, n_classes))
    tables: dict[str, tuple[tuple[str, ...], tuple[bool, ...]]] = {
        "cocostuff27": (COCOSTUFF27_THINGS + COCOSTUFF27_STUFF,
                        (True,) * len(COCOSTUFF27_THINGS) + (False,) * len(COCOSTUFF27_STUFF)),
        "coco171": (COCO_THINGS + COCO_STUFF, (True,) * len(COCO_THINGS) + (False,) * len(COCO_STUFF)),
        "coco81": (("stuff",) + COCO_THINGS, (False,) + (True,) * len(COCO_THINGS)),
        "cityscapes": (CITYSCAPES, tuple(n in CITYSCAPES_THINGS for n in CITYSCAPES)),
        "pascalvoc": (VOC, (False,) + (True,) * (len(VOC) - 1)),
        "potsdam": (POTSDAM, (False,) * len(POTSDAM)),
        "potsdamraw": (POTSDAM, (False,) * len(POTSDAM)),
        "toy": (TOY, (False,) * (len(TOY) - 1) + (True,)),
    }
    if dataset not in tables:
        raise UserError(f"unknown dataset {dataset!r}: expected one of {', '.join(sorted(tables))}, directory")
    names, is_thing = tables[dataset]
    if n_classes is not None and n_classes != len(names):
        raise UserError(f"dataset {dataset!r} has {len(names)} classes, but {n_classes} were asked for")
    return ClassInfo(names, is_thing, class_palette(dataset))
