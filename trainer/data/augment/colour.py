"""Colour ops: per-pixel value changes (brightness, channel shuffle, PIL-style enhancements, ...).

Ops here change pixel values only (never positions); the engine runs the
`pointwise` ones before a pending warp when that gives the same result (see
`Batch.commutes`). They clip to [0, 1], except `brightness(clip=False)`.
"""

import numpy as np
import tensorflow as tf

from trainer.data.augment.engine import (
    PixelOp,
    both,
    draw,
    mix_channels,
    scale_images,
    select,
    split,
    uniform,
)
from trainer.data.augment.policy import flag, number, number_range, register

GREY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision and PIL.


@register("brightness")
class Brightness(PixelOp):
    """imgaug Multiply((lo, hi), per_channel): multiplies pixel values, clipped to [0, 1] by default.

    Per image, with probability `per_channel` each channel gets its own factor,
    else one factor for all three. With `clip=False` values above 1 survive
    (0.9 x 1.5 = 1.35), as in the reference recipe, where Keras handed imgaug
    float images in [0, 255] and the multiply was never clipped; the ops after
    it then see (and the batch keeps) values above 1.

    Args:
      lo, hi: range of the factor.
      per_channel: probability (or True/False) of per-channel factors.
      random_sign: mirror the factor about 1 for half the images (1 + v or
        1 - v: RandAugment's Brightness).
      clip: clip the result to 1 (True/False).
    """

    pointwise = keeps_black = True

    def __init__(self, lo=0.5, hi=1.5, per_channel=0.0, random_sign=False, clip=True):
        self.lo, self.hi = number_range("brightness", ("lo", "hi"), lo, hi, minimum=0.0)
        self.per_channel = number("brightness", "per_channel", float(per_channel)
                                  if isinstance(per_channel, bool) else per_channel, 0.0, 1.0)
        self.random_sign = bool(random_sign)
        self.clip = flag("brightness", "clip", clip)
        self.linear = not self.clip  # Unclipped, a multiply commutes with bilinear resampling.
        self.bounded = self.clip

    def transform(self, images, labels, seed, active):
        seeds = split(seed, 3)
        size = tf.shape(images)[0]
        per_channel = uniform(seeds[0], [size, 1]) < self.per_channel
        factors = tf.where(per_channel,
                           draw(seeds[1], [size, 3], self.lo, self.hi, self.random_sign, 1.0),
                           draw(seeds[2], [size, 1], self.lo, self.hi, self.random_sign, 1.0))
        if active is not None:
            factors = tf.where(active[:, None], factors, 1.0)
        factors = tf.broadcast_to(factors, [size, 3])
        images = mix_channels(images, tf.linalg.diag(factors))
        return (tf.minimum(images, 1.0) if self.clip else images), labels


@register("channel_shuffle")
class ChannelShuffle(PixelOp):
    """imgaug ChannelShuffle(p): with probability p, a random permutation of R, G, B.

    The permutation is uniform over all six (the identity included, as imgaug).

    Args:
      p: probability per image.
    """

    pointwise = keeps_black = linear = True
    _PERMUTATIONS = np.stack([np.eye(3, dtype=np.float32)[:, list(p)]
                              for p in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))])

    def __init__(self, p=1.0):
        self.p = number("channel_shuffle", "p", p, 0.0, 1.0)

    def transform(self, images, labels, seed, active):
        chosen_seed, which_seed = split(seed, 2)
        size = tf.shape(images)[0]
        which = tf.random.stateless_uniform([size], which_seed, minval=0, maxval=6, dtype=tf.int32)
        matrices = tf.gather(tf.constant(self._PERMUTATIONS), which)
        chosen = both(active, uniform(chosen_seed, [size]) < self.p)
        matrices = tf.where(chosen[:, None, None], matrices, tf.eye(3))
        return mix_channels(images, matrices), labels


class _Enhance(PixelOp):
    """Shared by colour/contrast/sharpness: blend with a degenerate image by a factor."""

    name = None

    def __init__(self, lo, hi, random_sign):
        self.lo, self.hi = number_range(self.name, ("lo", "hi"), lo, hi, minimum=0.0)
        self.random_sign = bool(random_sign)

    def degenerate(self, images):
        raise NotImplementedError

    def transform(self, images, labels, seed, active):
        factor = draw(seed, [tf.shape(images)[0]], self.lo, self.hi, self.random_sign, 1.0)
        if active is not None:
            factor = tf.where(active, factor, 1.0)
        # images + (f - 1) * (images - base) is exactly `images` where f is 1.
        blended = images + scale_images(images - self.degenerate(images), factor - 1.0)
        return tf.clip_by_value(blended, 0.0, 1.0), labels


def _grey(images):
    return tf.tensordot(images, tf.constant(GREY), axes=[[3], [0]])[..., None]


@register("color")
class Color(_Enhance):
    """Saturation (PIL ImageEnhance.Color): blend with the grey image; factor 0 is grey, 1 unchanged.

    Args:
      lo, hi: range of the factor.
      random_sign: mirror the factor about 1 for half the images.
    """

    name = "color"
    pointwise = keeps_black = True

    def __init__(self, lo=0.5, hi=1.5, random_sign=False):
        super().__init__(lo, hi, random_sign)

    def degenerate(self, images):
        return _grey(images)


@register("contrast")
class Contrast(_Enhance):
    """Contrast (PIL ImageEnhance.Contrast): blend with the image's mean grey level.

    Args:
      lo, hi: range of the factor (0: flat grey, 1: unchanged).
      random_sign: mirror the factor about 1 for half the images.
    """

    name = "contrast"

    def __init__(self, lo=0.5, hi=1.5, random_sign=False):
        super().__init__(lo, hi, random_sign)

    def degenerate(self, images):
        return tf.reduce_mean(_grey(images), axis=[1, 2, 3], keepdims=True)


@register("sharpness")
class Sharpness(_Enhance):
    """Sharpness (PIL ImageEnhance.Sharpness): blend with a 3x3 smoothed image, borders kept.

    Args:
      lo, hi: range of the factor (0: smoothed, 1: unchanged, 2: sharpened).
      random_sign: mirror the factor about 1 for half the images.
    """

    name = "sharpness"
    heavy = True
    _KERNEL = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0

    def __init__(self, lo=0.5, hi=1.5, random_sign=False):
        super().__init__(lo, hi, random_sign)

    def degenerate(self, images):
        kernel = tf.tile(tf.constant(self._KERNEL)[:, :, None, None], [1, 1, 3, 1])
        smooth = tf.nn.depthwise_conv2d(images, kernel, [1, 1, 1, 1], "SAME")
        shape = tf.shape(images)
        rows = tf.logical_and(tf.range(shape[1]) > 0, tf.range(shape[1]) < shape[1] - 1)
        cols = tf.logical_and(tf.range(shape[2]) > 0, tf.range(shape[2]) < shape[2] - 1)
        inside = tf.logical_and(rows[:, None], cols[None, :])[None, :, :, None]
        return tf.where(inside, smooth, images)


@register("solarize")
class Solarize(PixelOp):
    """Inverts pixel values at or above a threshold drawn in [lo, hi] (in [0, 1] units).

    Values above 1 (after an unclipped op) count as 1, so the result stays in [0, 1].

    Args:
      lo, hi: range of the threshold.
    """

    pointwise = True

    def __init__(self, lo=0.5, hi=0.5):
        self.lo, self.hi = number_range("solarize", ("lo", "hi"), lo, hi, 0.0, 1.0)

    def transform(self, images, labels, seed, active):
        threshold = draw(seed, [tf.shape(images)[0]], self.lo, self.hi)
        if active is not None:
            threshold = tf.where(active, threshold, 2.0)
        inverted = 1.0 - tf.minimum(images, 1.0)
        return tf.where(images >= threshold[:, None, None, None], inverted, images), labels


@register("posterize")
class Posterize(PixelOp):
    """Keeps the top `bits` bits of each 8-bit value; bits drawn in {lo, ..., hi}.

    Args:
      lo, hi: range of the number of bits kept (1 to 8; 8 is unchanged).
    """

    pointwise = keeps_black = True

    def __init__(self, lo=4, hi=4):
        self.lo = number("posterize", "lo", lo, 1, 8, integer=True)
        self.hi = number("posterize", "hi", hi, self.lo, 8, integer=True)

    def transform(self, images, labels, seed, active):
        size = tf.shape(images)[0]
        bits = tf.random.stateless_uniform([size], seed, minval=self.lo, maxval=self.hi + 1,
                                           dtype=tf.int32)
        step = tf.cast(tf.bitwise.left_shift(1, 8 - bits), tf.float32)[:, None, None, None]
        return select(active, tf.floor(tf.round(images * 255.0) / step) * step / 255.0, images), labels


@register("auto_contrast")
class AutoContrast(PixelOp):
    """Stretches each channel of each image to the full [0, 1] range (PIL autocontrast)."""

    def transform(self, images, labels, seed, active):
        low = tf.reduce_min(images, axis=[1, 2], keepdims=True)
        high = tf.reduce_max(images, axis=[1, 2], keepdims=True)
        spread = high - low
        scale = tf.where(spread > 0, 1.0 / tf.maximum(spread, 1e-6), 1.0)
        offset = tf.where(spread > 0, low, 0.0)
        return select(active, tf.clip_by_value((images - offset) * scale, 0.0, 1.0), images), labels


@register("equalize")
class Equalize(PixelOp):
    """Histogram equalisation of each channel of each image (PIL/torchvision `equalize`).

    Values above 1 (after an unclipped op) count as 1.
    """

    heavy = True

    def transform(self, images, labels, seed, active):
        shape = tf.shape(images)
        values = tf.cast(tf.round(tf.minimum(images, 1.0) * 255.0), tf.int32)
        flat = tf.reshape(tf.transpose(values, [0, 3, 1, 2]), [shape[0] * 3, -1])
        hist = tf.math.bincount(flat, minlength=256, maxlength=256, axis=-1)
        last = tf.gather(hist, tf.reduce_max(flat, axis=1), batch_dims=1)
        step = (shape[1] * shape[2] - last) // 255
        lut = (tf.cumsum(hist, axis=1, exclusive=True) + step[:, None] // 2) // tf.maximum(step, 1)[:, None]
        lut = tf.where(step[:, None] > 0, tf.minimum(lut, 255), tf.range(256)[None, :])
        equalised = tf.cast(tf.gather(lut, flat, batch_dims=1), tf.float32) / 255.0
        equalised = tf.transpose(tf.reshape(equalised, [shape[0], 3, shape[1], shape[2]]), [0, 2, 3, 1])
        return select(active, equalised, images), labels
