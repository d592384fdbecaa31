"""Erasing ops: parts of images set to black or noise (coarse dropout, random erasing)."""

import math

import tensorflow as tf

from trainer.data.augment.engine import PixelOp, both, draw, split, uniform
from trainer.data.augment.policy import number, pair, register


@register("coarse_dropout")
class CoarseDropout(PixelOp):
    """imgaug CoarseDropout(p, size_percent): zero cells of a coarse grid, all channels.

    The grid has max(int(size * size_percent), min_grid) cells a side; each
    cell is zeroed with probability p. imgaug up to 0.3.0 (0.2.9 ran the
    reference recipe) has a minimum of 4, so at 32 and 64 px with
    size_percent 0.02 the grid is 4x4 (cells of 8 and 16 px; 0.8^16, about
    3% of images, lose nothing at p 0.2); imgaug 0.4.0 changed it to 3
    (min_grid=3). Cells map to pixels as a nearest-neighbour upscale (row i ->
    cell floor(i * cells / size)).

    Args:
      p: probability per cell.
      size_percent: grid size as a fraction of the image size.
      min_grid: minimum cells a side (an integer >= 1).
    """

    def __init__(self, p=0.2, size_percent=0.02, min_grid=4):
        self.p = number("coarse_dropout", "p", p, 0.0, 1.0)
        self.size_percent = number("coarse_dropout", "size_percent", size_percent, 0.0, 1.0)
        self.min_grid = number("coarse_dropout", "min_grid", min_grid, 1, 4096, integer=True)

    def _cells(self, size):
        return tf.maximum(tf.cast(tf.cast(size, tf.float32) * self.size_percent, tf.int32), self.min_grid)

    def transform(self, images, labels, seed, active):
        shape = tf.shape(images)
        rows, cols = self._cells(shape[1]), self._cells(shape[2])
        keep = uniform(seed, tf.stack([shape[0], rows, cols])) >= self.p
        if active is not None:
            keep = tf.logical_or(keep, tf.logical_not(active)[:, None, None])
        # Nearest upscale as a product with one-hot cell maps, straight to [B, H, W * 3]
        # (channels included): far cheaper on CPU than gathers and a broadcast multiply.
        row_cells = tf.one_hot(tf.range(shape[1]) * rows // shape[1], rows)
        col_cells = tf.one_hot(tf.repeat(tf.range(shape[2]) * cols // shape[2], shape[3]), cols)
        mask = tf.einsum("hi,bij,wj->bhw", row_cells, tf.cast(keep, tf.float32), col_cells)
        return tf.reshape(tf.reshape(images, [shape[0], shape[1], -1]) * mask, shape), labels


def _boxes(seeds, batch_shape, area, aspect):
    """Masks [B, H, W] of boxes of the given pixel area and aspect (w / h), placed at random."""
    size, height, width = batch_shape[0], batch_shape[1], batch_shape[2]
    h = tf.minimum(tf.round(tf.sqrt(area / aspect)), tf.cast(height, tf.float32))
    w = tf.minimum(tf.round(tf.sqrt(area * aspect)), tf.cast(width, tf.float32))
    top = tf.floor(uniform(seeds[0], [size]) * (tf.cast(height, tf.float32) - h + 1.0))
    left = tf.floor(uniform(seeds[1], [size]) * (tf.cast(width, tf.float32) - w + 1.0))
    rows = tf.cast(tf.range(height), tf.float32)[None, :]
    cols = tf.cast(tf.range(width), tf.float32)[None, :]
    in_rows = tf.logical_and(rows >= top[:, None], rows < (top + h)[:, None])
    in_cols = tf.logical_and(cols >= left[:, None], cols < (left + w)[:, None])
    return tf.logical_and(in_rows[:, :, None], in_cols[:, None, :])


@register("random_erasing")
class RandomErasing(PixelOp):
    """Random Erasing (Zhong et al. 2017, torchvision semantics): erase one box per image.

    With probability p, up to 10 tries for a box of area fraction in `scale`
    and aspect ratio (log-uniform) in `ratio` that fits inside the image; it is
    filled with `value` (a number in [0, 1], or 'random' for uniform noise).

    Args:
      p: probability per image.
      scale: (lo, hi) fraction of the image area.
      ratio: (lo, hi) aspect ratio range.
      value: fill value, or 'random'.
    """

    _TRIES = 10

    def __init__(self, p=0.5, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0.0):
        self.p = number("random_erasing", "p", p, 0.0, 1.0)
        self.scale = pair("random_erasing", "scale", scale, minimum=0.0)
        self.ratio = pair("random_erasing", "ratio", ratio, minimum=1e-3)
        if value != "random":
            value = number("random_erasing", "value ('random' or a number)", value, 0.0, 1.0)
        self.value = value

    def transform(self, images, labels, seed, active):
        seeds = split(seed, 6)
        shape = tf.shape(images)
        tries = [shape[0], self._TRIES]
        total = tf.cast(shape[1] * shape[2], tf.float32)
        area = draw(seeds[0], tries, *self.scale) * total
        aspect = tf.exp(draw(seeds[1], tries, math.log(self.ratio[0]), math.log(self.ratio[1])))
        fits = tf.logical_and(tf.round(tf.sqrt(area / aspect)) < tf.cast(shape[1], tf.float32),
                              tf.round(tf.sqrt(area * aspect)) < tf.cast(shape[2], tf.float32))
        first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
        erase = both(active, tf.logical_and(tf.reduce_any(fits, axis=1),
                                             uniform(seeds[2], [shape[0]]) < self.p))
        boxes = _boxes(seeds[3:5], shape, tf.gather(area, first, batch_dims=1),
                          tf.gather(aspect, first, batch_dims=1))
        boxes = tf.logical_and(boxes, erase[:, None, None])[..., None]
        fill = uniform(seeds[5], shape) if self.value == "random" else self.value
        return tf.where(boxes, fill, images), labels
