"""Mixing ops: each image blended with, or pasted from, a random partner in the batch; labels follow."""

import tensorflow as tf

from trainer.data.augment.engine import (
    PixelOp,
    beta,
    permutation,
    scale_images,
    split,
    uniform,
)
from trainer.data.augment.policy import number, register


@register("mixup")
class MixUp(PixelOp):
    """MixUp (Zhang et al. 2018): blend each image and label with a random partner.

    x = lam * x + (1 - lam) * x[perm], y likewise, lam ~ Beta(alpha, alpha)
    per image, perm a random permutation of the batch. Rows of y keep their sum.

    Args:
      alpha: Beta distribution parameter.
    """

    def __init__(self, alpha=0.2):
        self.alpha = number("mixup", "alpha", alpha, 1e-3, 1e3)

    def transform(self, images, labels, seed, active):
        lam_seed, perm_seed = split(seed, 2)
        size = tf.shape(images)[0]
        lam = beta(lam_seed, [size], self.alpha)
        if active is not None:
            lam = tf.where(active, lam, 1.0)
        perm = permutation(perm_seed, size)
        images = scale_images(images, lam) + scale_images(tf.gather(images, perm), 1.0 - lam)
        labels = lam[:, None] * labels + (1.0 - lam[:, None]) * tf.gather(labels, perm)
        return images, labels


@register("cutmix")
class CutMix(PixelOp):
    """CutMix (Yun et al. 2019): paste a box from a random partner; labels by pasted area.

    lam ~ Beta(alpha, alpha) per image; the box is sqrt(1 - lam) of each side,
    centred uniformly and clipped to the image; labels mix by the actual
    pasted area, so rows keep their sum.

    Args:
      alpha: Beta distribution parameter.
    """

    def __init__(self, alpha=1.0):
        self.alpha = number("cutmix", "alpha", alpha, 1e-3, 1e3)

    def transform(self, images, labels, seed, active):
        seeds = split(seed, 4)
        shape = tf.shape(images)
        height, width = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
        cut = tf.sqrt(1.0 - beta(seeds[0], [shape[0]], self.alpha))
        if active is not None:
            cut = tf.where(active, cut, 0.0)
        centre_y = uniform(seeds[1], [shape[0]]) * height
        centre_x = uniform(seeds[2], [shape[0]]) * width
        y0 = tf.clip_by_value(tf.round(centre_y - cut * height / 2), 0.0, height)
        y1 = tf.clip_by_value(tf.round(centre_y + cut * height / 2), 0.0, height)
        x0 = tf.clip_by_value(tf.round(centre_x - cut * width / 2), 0.0, width)
        x1 = tf.clip_by_value(tf.round(centre_x + cut * width / 2), 0.0, width)
        rows = tf.cast(tf.range(shape[1]), tf.float32)[None, :]
        cols = tf.cast(tf.range(shape[2]), tf.float32)[None, :]
        in_rows = tf.logical_and(rows >= y0[:, None], rows < y1[:, None])
        in_cols = tf.logical_and(cols >= x0[:, None], cols < x1[:, None])
        boxes = tf.logical_and(in_rows[:, :, None], in_cols[:, None, :])[..., None]
        perm = permutation(seeds[3], shape[0])
        images = tf.where(boxes, tf.gather(images, perm), images)
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
        labels = lam[:, None] * labels + (1.0 - lam[:, None]) * tf.gather(labels, perm)
        return images, labels
