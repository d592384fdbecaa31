"""The evaluation's figures line up between evaluations: one confusion-matrix class order per run, said in the title."""

import io

import numpy as np
import pytest
from PIL import Image

from trainer.evaluation import evaluator, figures, metrics


def _report(confusion):
    return {"confusion_matrix": confusion.tolist(), "confusion_order": metrics.cluster_order(confusion)}


def test_confusion_matrix_order_is_the_same_in_two_evaluations_and_the_titles_say_which():
    rng = np.random.default_rng(0)
    first = np.diag(rng.integers(20, 30, 6))
    first[0, 5] = first[5, 0] = 15  # Classes 0 and 5 confused: the clustering puts them side by side...
    second = np.diag(rng.integers(20, 30, 6))
    second[1, 3] = second[3, 1] = 15  # ... and in another evaluation, 1 and 3.
    a, b = evaluator.confusion_figures(_report(first)), evaluator.confusion_figures(_report(second))
    assert [tag for tag, _, _ in a] == ["eval/confusion_matrix", "eval/confusion_matrix_clustered"]
    assert a[0][1] == b[0][1] == list(range(6))  # The main figure: the dataset's order, in every evaluation.
    assert "dataset's order" in a[0][2] and "as in every evaluation" in a[0][2]
    assert a[1][1] != b[1][1] and "this evaluation's own order" in a[1][2]  # The clustered one says it is its own.
    assert evaluator.CONFUSION_ORDER == "dataset"
    png = figures.confusion_matrix(first, [f"class {i}" for i in range(6)], a[0][1], f"Confusion matrix\n{a[0][2]}")
    assert Image.open(io.BytesIO(png)).size[0] > 100


def test_reliability_diagram_draws_empty_and_under_confident_bins():
    rows = [{"lower": i / 4, "upper": (i + 1) / 4, "count": c, "accuracy": acc, "confidence": (i + 0.5) / 4}
            for i, (c, acc) in enumerate([(0, 0.0), (2, 1.0), (30, 0.4), (200, 0.95)])]
    png = figures.reliability_diagram(rows, 0.1, "Reliability")
    assert Image.open(io.BytesIO(png)).size == (500, 600)


def test_image_grid_draws_every_pixel_enlarged_by_whole_pixels_and_the_overlay_at_half_opacity():
    red = np.zeros((2, 8, 8, 3), np.float32)
    red[..., 0] = 1.0
    red[1] = 0.0
    red[1, ..., 2] = 1.0  # The second image is blue.
    red[0, 0, 0] = (0.0, 1.0, 0.0)  # One green pixel in the first image's top-left corner.
    overlay = np.zeros((2, 8, 8), np.float32)  # 0 is dark blue in "jet".
    grid = np.asarray(Image.open(io.BytesIO(figures.image_grid(red, ["a", "b"], "title", overlays=overlay))))[..., :3]
    scale = round(figures.TILE_PIXELS / 8)
    green = np.argwhere((grid == (0, 255, 0)).all(-1))
    assert len(green) == scale * scale  # One image pixel, drawn as one whole block.
    assert np.ptp(green, axis=0).tolist() == [scale - 1, scale - 1]
    for colour in [(255, 0, 0), (0, 0, 255)]:
        assert (grid == colour).all(-1).sum() >= 63 * scale * scale  # The images themselves...
    from matplotlib import colormaps
    blended = np.round(255 * (0.5 * np.array([1.0, 0, 0]) + 0.5 * np.array(colormaps["jet"](0.0)[:3])))
    assert (np.abs(grid.astype(int) - blended).max(-1) <= 1).sum() == 63 * scale * scale  # ... and red under "jet".


@pytest.mark.parametrize("side, tile", [(7, 175), (32, 192), (224, 224), (512, 256)])
def test_image_grid_tiles_stay_near_the_same_size_for_any_image_size(side, tile):
    red = np.zeros((3, side, side, 3), np.float32)
    red[..., 0] = 1.0
    png = figures.image_grid(red, ["a", "b", "c"], "title")
    grid = np.asarray(Image.open(io.BytesIO(png)))[..., :3]
    columns = np.flatnonzero((grid == (255, 0, 0)).all(-1).any(0))  # The images' columns of pixels.
    assert len(columns) == 3 * tile and Image.open(io.BytesIO(png)).size[0] == 3 * tile + 4 * figures.GAP_PIXELS
