"""The evaluation's pictures, drawn with matplotlib (Agg, no pyplot state) and returned as PNG bytes.

Every function builds its own `matplotlib.figure.Figure` on an Agg canvas, so
nothing depends on (or changes) the process's pyplot backend.
"""

import io
import math

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MAX_NAMED_CLASSES = 30  # Above this many classes the confusion matrix's axes carry no names.
TILE_PIXELS, GAP_PIXELS, LINE_PIXELS = 176, 12, 11  # An image grid's tiles (about), the space between them, a line.


def to_png(fig):
    """Renders a figure to PNG bytes."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi)
    return buffer.getvalue()


def _short(name, width=18):
    return name if len(name) <= width else name[:width - 1] + "…"


def confusion_matrix(confusion, names, order, title, max_named=MAX_NAMED_CLASSES):
    """The confusion matrix as row-normalised rates, classes in `order` on both axes.

    Args:
      confusion: [K, K] counts (row = true class).
      names: K class names.
      order: a permutation of range(K) (e.g. `metrics.cluster_order`).
      title: the figure's title.
      max_named: classes are named on the axes up to this many classes.

    Returns:
      PNG bytes.
    """
    confusion = np.asarray(confusion, np.float64)[np.ix_(order, order)]
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1.0)
    k = len(order)
    side = 6.0 if k > max_named else max(4.0, 2.5 + 0.25 * k)
    fig = Figure(figsize=(side + 1.5, side), dpi=100)
    ax = fig.add_subplot()
    image = ax.imshow(rates, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if k <= max_named:
        labels = [_short(names[i]) for i in order]
        ax.set_xticks(range(k), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(k), labels, fontsize=7)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return to_png(fig)


def image_grid(images, titles, suptitle, overlays=None, cols=6):
    """A grid of images with a title each; with `overlays`, each image is followed by its heat-map overlay.

    The tiles are laid out in pixels and drawn as one picture (`figimage`, each image pixel an integer block of
    screen pixels), not one matplotlib axes per tile: this is drawn at every run's start, and axes with their
    ticks and `tight_layout` took half a second of it.

    Args:
      images: [N, H, W, 3] float in [0, 1].
      titles: N strings (may hold line breaks).
      suptitle: the figure's title.
      overlays: optional [N, H, W] maps in [0, 1], drawn in the "jet" colours at half opacity over a copy of each
        image.
      cols: tiles per row.

    Returns:
      PNG bytes.
    """
    images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
    if not len(images):
        return message(suptitle, "Nothing to show.")
    tiles, captions = [], []
    for i, (image, title) in enumerate(zip(images, titles)):
        tiles.append(image)
        captions.append(title)
        if overlays is not None:
            heat = colormaps["jet"](np.clip(overlays[i], 0.0, 1.0))[..., :3]
            tiles.append(0.5 * image + 0.5 * heat)
            captions.append("Grad-CAM")
    cols = min(cols, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    side = max(images.shape[1:3])  # Small images are enlarged by whole pixels, large ones keep every stride-th.
    scale, stride = max(1, round(TILE_PIXELS / side)), max(1, side // TILE_PIXELS)
    tiles = [np.repeat(np.repeat(tile[::stride, ::stride], scale, axis=0), scale, axis=1) for tile in tiles]
    tile_h, tile_w = tiles[0].shape[:2]
    caption_h = LINE_PIXELS * max(c.count("\n") + 1 for c in captions) + 4
    cell_h, cell_w = caption_h + tile_h + GAP_PIXELS, tile_w + GAP_PIXELS
    top = 2 * LINE_PIXELS + 8  # The suptitle's band.
    canvas = np.ones((top + rows * cell_h, cols * cell_w + GAP_PIXELS, 3), np.float32)
    fig = Figure(figsize=(canvas.shape[1] / 100, canvas.shape[0] / 100), dpi=100)
    for n, (tile, caption) in enumerate(zip(tiles, captions)):
        row, col = divmod(n, cols)
        y, x = top + row * cell_h + caption_h, GAP_PIXELS + col * cell_w
        canvas[y:y + tile_h, x:x + tile_w] = tile
        fig.text((x + tile_w / 2) / canvas.shape[1], 1 - (y - 2) / canvas.shape[0], caption, fontsize=7,
                 ha="center", va="bottom", linespacing=1.1)
    fig.figimage(canvas, origin="upper")
    fig.suptitle(suptitle, fontsize=10, y=1 - 6 / canvas.shape[0], va="top")
    return to_png(fig)


def reliability_diagram(rows, ece, title):
    """Accuracy against confidence per bin (bars), the diagonal, and the share of images per bin.

    Args:
      rows: `metrics.reliability` bins.
      ece: the expected calibration error.
      title: the figure's title.

    Returns:
      PNG bytes.
    """
    lower = np.array([r["lower"] for r in rows])
    width = np.array([r["upper"] - r["lower"] for r in rows])
    accuracy = np.array([r["accuracy"] if r["count"] else 0.0 for r in rows])
    confidence = np.array([r["confidence"] if r["count"] else 0.0 for r in rows])
    counts = np.array([r["count"] for r in rows], np.float64)
    from matplotlib.patches import Patch  # pylint: disable=import-outside-toplevel

    fig = Figure(figsize=(5.0, 6.0), dpi=100)
    top, bottom = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    # A bin is drawn as strongly as it is full (a bin of a few images says little): opacity 0.15 to 1.
    weight = 0.15 + 0.85 * counts / max(counts.max(), 1.0)
    colours = {"accuracy": "tab:blue", "over": "tab:red", "under": "tab:green"}

    def rgba(name, alpha):
        from matplotlib.colors import to_rgba  # pylint: disable=import-outside-toplevel

        return [to_rgba(colours[name], a) for a in alpha]

    top.bar(lower, accuracy, width=width, align="edge", edgecolor="black", color=rgba("accuracy", weight))
    gap = confidence - accuracy  # > 0: over-confident (red, above the bar); < 0: under-confident (green, inside it).
    top.bar(lower, np.abs(gap), bottom=np.minimum(accuracy, confidence), width=width, align="edge",
            color=[c_over if g > 0 else c_under for g, c_over, c_under in
                   zip(gap, rgba("over", 0.6 * weight), rgba("under", 0.6 * weight))],
            edgecolor=[c_over if g > 0 else c_under for g, c_over, c_under in
                       zip(gap, rgba("over", weight), rgba("under", weight))], hatch="//", linewidth=0.5)
    [diagonal] = top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(handles=[Patch(facecolor=colours["accuracy"], edgecolor="black", label="accuracy"),
                        Patch(facecolor=colours["over"], alpha=0.6, hatch="//", label="over-confident (gap)"),
                        Patch(facecolor=colours["under"], alpha=0.6, hatch="//", label="under-confident (gap)"),
                        diagonal], loc="upper left", fontsize=8)
    top.text(0.99, 0.02, "fainter bars: fewer images", ha="right", va="bottom", fontsize=7,
             transform=top.transAxes)
    top.set_title(f"{title}\nECE {ece:.4f} ({len(rows)} bins)", fontsize=10)
    bottom.bar(lower, counts / max(counts.sum(), 1.0), width=width, align="edge", edgecolor="black", color="grey")
    bottom.set_xlabel("confidence (probability of the predicted class)")
    bottom.set_ylabel("share of images")
    fig.tight_layout()
    return to_png(fig)


def message(title, text):
    """A small figure holding one line of text (e.g. 'no misclassified images')."""
    fig = Figure(figsize=(4.0, 1.5), dpi=100)
    fig.text(0.5, 0.6, title, ha="center", fontsize=10)
    fig.text(0.5, 0.3, text, ha="center", fontsize=9)
    return to_png(fig)
