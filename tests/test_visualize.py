"""Colour maps, palettes, class tables and the pictures written by utils.visualize."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loader.class_names import CITYSCAPES, class_info, class_palette, cityscapes_palette, voc_palette
from loader.datasets_table import DATASETS
from loader.transforms import to_uint8_image
from utils.errors import UserError
from utils.visualize import (GAP, IGNORE_COLOR, IGNORE_NAME, LEGEND_COLUMN_WIDTH, LEGEND_ROW, TITLE_HEIGHT, Column,
                             cluster_palette, colorize, legend_entries, panel_columns, plot_class_iou, plot_confusion,
                             save_image, save_panel)

PALETTE = np.array([[10, 20, 30], [40, 50, 60], [70, 80, 90]], dtype=np.uint8)


def test_colorize_hand_made_map() -> None:
    out = colorize(np.array([[0, 1], [-1, 2]]), PALETTE)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out, [[[10, 20, 30], [40, 50, 60]], [list(IGNORE_COLOR), [70, 80, 90]]])
    np.testing.assert_array_equal(colorize(torch.tensor([[2]]), PALETTE), [[[70, 80, 90]]])


@pytest.mark.parametrize("labels, match", [
    (np.array([[3]]), r"\[-1, 3\)"),
    (np.array([[-2]]), r"\[-1, 3\)"),
    (np.array([[0.5]]), "integer"),
    (np.array([0, 1]), r"\(H, W\)"),
])
def test_colorize_rejects_bad_maps(labels: np.ndarray, match: str) -> None:
    with pytest.raises(UserError, match=match):
        colorize(labels, PALETTE)


def test_known_palette_entries() -> None:
    voc = voc_palette()
    assert voc.shape == (256, 3) and voc.dtype == np.uint8
    assert voc[0].tolist() == [0, 0, 0]
    assert voc[1].tolist() == [128, 0, 0]          # aeroplane
    assert voc[2].tolist() == [0, 128, 0]          # bicycle
    assert voc[15].tolist() == [192, 128, 128]     # person
    assert voc[255].tolist() == [224, 224, 192]    # the VOC "void" colour
    city = cityscapes_palette()
    assert city.shape == (27, 3)
    assert city[0].tolist() == [128, 64, 128]      # road
    assert city[16].tolist() == [70, 130, 180]     # sky
    assert city[26].tolist() == [119, 11, 32]      # bicycle


def test_class_tables_agree_with_the_dataset_table() -> None:
    for name, settings in DATASETS.items():
        if name == "directory":
            continue
        info = class_info(name)
        assert len(info.names) == len(info.is_thing) == settings.n_classes, name
        assert len(info.palette) >= settings.n_classes
    assert sum(class_info("cocostuff27").is_thing) == 12
    assert class_info("coco171").names[79:81] == ("toothbrush", "banner")
    assert class_info("coco81").names[0] == "stuff" and not class_info("coco81").is_thing[0]
    city = class_info("cityscapes")
    assert [n for n, t in zip(city.names, city.is_thing) if t][:2] == ["person", "rider"]
    official = cityscapes_palette()
    polegroup = CITYSCAPES.index("polegroup")
    assert np.array_equal(np.delete(city.palette, polegroup, 0), np.delete(official, polegroup, 0))
    assert class_info("toy").names == ("sky", "grass", "water", "object")
    assert class_info("directory", 3).names == ("class 0", "class 1", "class 2")


@pytest.mark.parametrize("args, match", [
    (("directory",), "class count"),
    (("mars",), "unknown dataset 'mars'"),
    (("pascalvoc", 27), "has 21 classes"),
])
def test_class_info_errors(args: tuple, match: str) -> None:
    with pytest.raises(UserError, match=match):
        class_info(*args)


def test_to_uint8_image_undoes_the_normalisation() -> None:
    rgb = torch.randint(0, 256, (3, 5, 7), generator=torch.Generator().manual_seed(0))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    out = to_uint8_image((rgb / 255.0 - mean) / std)
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    diff = out.astype(int) - rgb.permute(1, 2, 0).numpy()
    assert diff.max() <= 0 and diff.min() >= -1      # floor(255 x): exact or one level below


def test_to_uint8_image_is_the_published_crf_input() -> None:
    # The published code: two inverse Normalize steps, to_pil_image, numpy.
    from torchvision import transforms
    from torchvision.transforms.functional import to_pil_image
    inverse = transforms.Compose([
        transforms.Normalize(mean=[0.0, 0.0, 0.0], std=[1 / 0.229, 1 / 0.224, 1 / 0.225]),
        transforms.Normalize(mean=[-0.485, -0.456, -0.406], std=[1.0, 1.0, 1.0])])
    normalise = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    img = normalise(torch.randint(0, 256, (3, 40, 30), generator=torch.Generator().manual_seed(2)) / 255.0)
    np.testing.assert_array_equal(to_uint8_image(img), np.array(to_pil_image(inverse(img))))


def png(path: Path) -> Image.Image:
    image = Image.open(path)
    image.load()
    return image


def test_save_panel_lays_out_titled_tiles_and_a_legend(tmp_path: Path) -> None:
    height, width = 12, 10
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    label = np.zeros((height, width), dtype=np.int64)
    label[0, 0] = -1
    names = ["sky", "grass", "water"]
    columns = [Column("label", label, PALETTE, names), Column("cluster", np.ones_like(label), PALETTE, names),
               Column("crf", torch.full((height, width), 2).numpy(), PALETTE, names),
               Column("hungarian", label, PALETTE, names)]
    path = tmp_path / "sub" / "panel.png"
    save_panel(path, image, columns)
    panel = np.asarray(png(path).convert("RGB"))
    full_width = 5 * width + 4 * GAP
    per_row = max(1, full_width // LEGEND_COLUMN_WIDTH)
    entries = [((10, 20, 30), "0: sky"), ((40, 50, 60), "1: grass"), ((70, 80, 90), "2: water"),
               (IGNORE_COLOR, IGNORE_NAME)]
    assert legend_entries(columns) == entries
    legend_top = TITLE_HEIGHT + height + GAP
    assert panel.shape == (legend_top + math.ceil(4 / per_row) * LEGEND_ROW, full_width, 3)

    def tile(k: int) -> np.ndarray:
        left = k * (width + GAP)
        return panel[TITLE_HEIGHT:TITLE_HEIGHT + height, left:left + width]

    assert (tile(0) == 255).all()
    assert tile(1)[0, 0].tolist() == list(IGNORE_COLOR) and tile(1)[5, 5].tolist() == [10, 20, 30]
    assert (tile(2) == [40, 50, 60]).all() and (tile(3) == [70, 80, 90]).all()
    swatches = [panel[legend_top + (k // per_row) * LEGEND_ROW + 5, (k % per_row) * LEGEND_COLUMN_WIDTH + 5].tolist()
                for k in range(4)]
    assert swatches == [list(colour) for colour, _ in entries]            # the legend is inside the panel
    assert sorted(p.name for p in path.parent.iterdir()) == ["panel.png"]     # no temp file left
    with pytest.raises(UserError, match="every map must be 12x10"):
        save_panel(path, image, [Column("label", label[:3], PALETTE, names)])


@pytest.mark.parametrize("dataset", sorted(n for n in DATASETS if n != "directory") + ["directory"])
def test_class_palettes_have_no_black_no_ignore_colour_and_distinct_colours(dataset: str) -> None:
    n = class_info(dataset, 300 if dataset == "directory" else None)
    k = len(n.names)
    colours = {tuple(c) for c in n.palette[:k].tolist()}
    assert len(colours) == k, dataset                     # one colour per class
    assert (0, 0, 0) not in colours and IGNORE_COLOR not in colours, dataset


def test_class_zero_and_cluster_zero_are_not_black() -> None:
    assert class_palette("toy")[0].tolist() != [0, 0, 0]
    assert cluster_palette(4, class_palette("toy"))[0].tolist() != [0, 0, 0]


@pytest.mark.parametrize("dataset", ["toy", "cocostuff27", "cityscapes", "coco171"])
def test_cluster_palette_is_apart_from_the_class_palette(dataset: str) -> None:
    classes = class_info(dataset).palette
    k = len(class_info(dataset).names)
    clusters = cluster_palette(k, classes)
    assert clusters.shape == (k, 3) and clusters.dtype == np.uint8
    cluster_set, class_set = {tuple(c) for c in clusters.tolist()}, {tuple(c) for c in classes.tolist()}
    assert len(cluster_set) == k                          # distinct
    assert not cluster_set & class_set                    # no cluster shows a class colour
    assert (0, 0, 0) not in cluster_set and IGNORE_COLOR not in cluster_set


def test_cluster_palette_steps_around_an_exact_collision() -> None:
    first = cluster_palette(3, np.zeros((0, 3), np.uint8))
    moved = cluster_palette(3, first[1:2])               # the second cluster colour is now a class colour
    assert moved[1].tolist() != first[1].tolist() and len({tuple(c) for c in moved.tolist()}) == 3
    assert np.abs(moved[1].astype(int) - first[1].astype(int)).sum() == 1


def test_panel_columns_leave_out_the_label_of_an_unlabelled_image() -> None:
    ids = np.array([[0, 1], [2, 3]])
    classes, clusters = class_palette("toy"), cluster_palette(4, class_palette("toy"))
    names = class_info("toy").names
    labelled = panel_columns(ids, ids, ids, ids, names, classes, clusters)
    unlabelled = panel_columns(np.full((2, 2), -1), ids, ids, ids, names, classes, clusters)
    assert [c.title for c in labelled] == ["label", "cluster (raw ids)", "crf (raw ids)", "hungarian"]
    assert [c.title for c in unlabelled] == ["cluster (raw ids)", "crf (raw ids)", "hungarian"]
    assert [c.title for c in panel_columns(None, ids, ids, None, names, classes, clusters)] == \
        ["cluster (raw ids)", "crf (raw ids)"]
    # raw columns in cluster colours, label and matched columns in class colours
    assert [c.palette is clusters for c in labelled] == [False, True, True, False]
    assert legend_entries(labelled[1:2])[0][1] == "0: cluster 0"


def test_panel_of_an_unlabelled_image_is_one_column_narrower(tmp_path: Path) -> None:
    height, width = 8, 6
    image = np.zeros((height, width, 3), np.uint8)
    ids = np.zeros((height, width), np.int64)
    classes, clusters = class_palette("toy"), cluster_palette(4, class_palette("toy"))
    names = class_info("toy").names
    for name, label in (("with.png", ids), ("without.png", np.full_like(ids, -1))):
        save_panel(tmp_path / name, image, panel_columns(label, ids, ids, ids, names, classes, clusters))
    assert png(tmp_path / "with.png").width == 5 * width + 4 * GAP
    assert png(tmp_path / "without.png").width == 4 * width + 3 * GAP
    without = np.asarray(png(tmp_path / "without.png").convert("RGB"))
    assert not (without == IGNORE_COLOR).all(axis=-1).any()   # no all-magenta label column


def test_save_image_round_trips(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (6, 4, 3), dtype=np.uint8)
    save_image(tmp_path / "x.png", rgb)
    np.testing.assert_array_equal(np.asarray(png(tmp_path / "x.png")), rgb)


def test_plots_are_written_and_readable(tmp_path: Path) -> None:
    info = class_info("cocostuff27")
    iou = [float(i * 3 + 1) for i in range(27)]
    iou[3], iou[5] = math.nan, 0.0
    figure = plot_class_iou(tmp_path / "iou.png", info.names, iou, info.is_thing)
    axis = figure.axes[0]
    assert axis.get_yscale() == "linear" and axis.get_xscale() == "linear"
    assert axis.get_ylim() == (0.0, 100.0)
    heights = [bar.get_height() for bar in axis.patches]
    assert heights[5] == 0.0 and math.isnan(heights[3]) and heights[26] == pytest.approx(79.0)
    confusion = np.random.default_rng(0).integers(0, 50, (27, 27))
    confusion[4] = 0                                         # a class with no pixels: row of zeros
    plot_confusion(tmp_path / "confusion.png", confusion, info.names)
    for name in ("iou.png", "confusion.png"):
        image = png(tmp_path / name)
        assert image.format == "PNG" and image.width > 200 and image.height > 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion.png", "iou.png"]
    with pytest.raises(UserError, match="equal lengths"):
        plot_class_iou(tmp_path / "bad.png", info.names, iou[:3], info.is_thing)
    with pytest.raises(UserError, match=r"\(27, 27\)"):
        plot_confusion(tmp_path / "bad.png", confusion[:3], info.names)
