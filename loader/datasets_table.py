"""Per-dataset settings of the published method, in one table.

Every stage reads its dataset-dependent values (classes, crop layout, weight decay,
gradient clipping, resolutions) from here, never from a string in a path.
"""
from dataclasses import dataclass

# The classes of the generated toy set (loader/toy.py draws them). Here, not there, so that the flag
# parser, which needs this table's names, loads without torch (--help answers in about a second).
TOY_CLASSES = ("sky", "grass", "water", "object")

# The names crop_dataset.py offers in --help, here for the same reason: the crop geometries of
# loader/cropping.py, and the datasets whose layout (loader/layouts.py) has a pre-cropped set.
CROP_TYPE_NAMES = ("double", "five", "super")
CROPPABLE = ("cocostuff27", "coco81", "coco171", "cityscapes", "pascalvoc", "potsdam", "toy")


@dataclass(frozen=True)
class DatasetSettings:
    n_classes: int
    crop_type: str | None       # pre-cropped training set written by crop_dataset.py
    weight_decay: float         # stage 2 Adam weight decay
    clip_tr: float              # grad-norm clip, TR head (stages 2 and 3)
    clip_mlp: float             # grad-norm clip, MLP head (stages 2 and 3)
    train_resolution_tr: int
    train_resolution_mlp: int
    test_resolution: int
    published_stage3_clip: bool = True  # False: the published stage 3 has no clip value and clips nothing
    # defaults of `bash run` and reproduce.py (the published K, p and batch; the toy set uses smaller ones)
    num_codebook: int = 2048
    projection_dim: int = 2048
    batch_size: int = 16


_COCO = dict(weight_decay=1e-4, clip_tr=2.0, clip_mlp=0.1,
             train_resolution_tr=320, train_resolution_mlp=224, test_resolution=320)

DATASETS: dict[str, DatasetSettings] = {
    "cocostuff27": DatasetSettings(n_classes=27, crop_type="five", **_COCO),
    "coco81": DatasetSettings(n_classes=81, crop_type="double", published_stage3_clip=False, **_COCO),
    "coco171": DatasetSettings(n_classes=171, crop_type="double", published_stage3_clip=False, **_COCO),
    "pascalvoc": DatasetSettings(n_classes=21, crop_type="super", published_stage3_clip=False, **_COCO),
    "cityscapes": DatasetSettings(n_classes=27, crop_type="five", weight_decay=0.0, clip_tr=1.0,
                                  clip_mlp=1.0, train_resolution_tr=320, train_resolution_mlp=224,
                                  test_resolution=320),
    # Potsdam-3 (STEGO's 200x200 tiles, upsampled to the resolution): no published CAUSE setting,
    # so the COCO values; STEGO and HP train it uncropped at 224 (HP clips at 10).
    "potsdam": DatasetSettings(n_classes=3, crop_type=None, **_COCO),
    "potsdamraw": DatasetSettings(n_classes=3, crop_type=None, **_COCO),
    "toy": DatasetSettings(n_classes=len(TOY_CLASSES), crop_type=None, weight_decay=1e-4, clip_tr=2.0,
                           clip_mlp=0.1, train_resolution_tr=128, train_resolution_mlp=128, test_resolution=128,
                           num_codebook=256, projection_dim=256, batch_size=8),
    # A user's own folder; its class count comes from --n_classes.
    "directory": DatasetSettings(n_classes=27, crop_type=None, **_COCO),
}


def round_to_patch(resolution: int, patch_size: int) -> int:
    """Smallest multiple of the patch size >= resolution (320 -> 322 for patch 14)."""
    return -(-resolution // patch_size) * patch_size


def run_defaults(dataset: str) -> dict[str, int]:
    """--num_codebook, --projection_dim and --batch_size of `bash run` and reproduce.py for `dataset` (an
    unknown name gets the published values; the scripts then refuse the name)."""
    s = DATASETS.get(dataset, DATASETS["cocostuff27"])
    return {"num_codebook": s.num_codebook, "projection_dim": s.projection_dim, "batch_size": s.batch_size}


if __name__ == "__main__":  # `python -m loader.datasets_table DATASET`: the defaults as shell words, for `run`
    import sys
    print(" ".join(str(v) for v in run_defaults(sys.argv[1]).values()))
