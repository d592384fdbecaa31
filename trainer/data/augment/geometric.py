"""Geometric ops: each contributes a 3x3 matrix per image (output -> input pixel) to the fused warp.

Flip, zoom, affine scale, rotation, shear, translation and crops do not touch
pixels: the engine multiplies consecutive matrices into one pending warp and
resamples each image once (see `trainer.data.augment.engine`). Ops act about
the image centre ((W - 1) / 2, (H - 1) / 2); pixel centres sit at integer
coordinates.
"""

import math

import tensorflow as tf

from trainer.data.augment.engine import GeometricOp, draw, split, uniform
from trainer.data.augment.policy import (
    choice,
    fail,
    number,
    number_range,
    pair,
    register,
)

FILLS = ("constant", "nearest", "reflect")
INTERPOLATIONS = ("bilinear", "nearest")


def _affine(a, b, c, d, e, f):
    """[B, 3, 3] matrices [[a, b, c], [d, e, f], [0, 0, 1]] from [B] components."""
    zeros, ones = tf.zeros_like(a), tf.ones_like(a)
    return tf.reshape(tf.stack([a, b, c, d, e, f, zeros, zeros, ones], axis=-1), [-1, 3, 3])


def _about_centre(a, b, d, e, batch):
    """Linear map [[a, b], [d, e]] (output -> input) about the image centre."""
    cx, cy = (batch.width - 1.0) / 2.0, (batch.height - 1.0) / 2.0
    return _affine(a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy)


def _geometry_options(op, fill, interpolation):
    """Checks an op's `fill` and `interpolation` arguments; returns both."""
    return choice(op, "fill", fill, FILLS), choice(op, "interpolation", interpolation, INTERPOLATIONS)


@register("identity")
class Identity(GeometricOp):
    """Leaves images unchanged (a branch of `one_of` that does nothing)."""

    aligned = keeps_frame = True

    def apply(self, batch, seed, active):
        del batch, seed, active


@register("flip")
class Flip(GeometricOp):
    """Horizontal flip of each image with probability `p` (imgaug Fliplr, Keras horizontal_flip).

    Args:
      p: probability per image.
    """

    aligned = keeps_frame = True

    def __init__(self, p=0.5):
        self.p = number("flip", "p", p, 0.0, 1.0)

    def matrices(self, seed, batch):
        flipped = uniform(seed, [batch.size]) < self.p
        sign = tf.where(flipped, -1.0, 1.0)
        zeros = tf.zeros_like(sign)
        shift = tf.where(flipped, batch.width - 1.0, 0.0)
        return _affine(sign, zeros, shift, zeros, tf.ones_like(sign), zeros)


@register("zoom")
class Zoom(GeometricOp):
    """Keras ImageDataGenerator's zoom: x and y factors drawn independently in [lo, hi].

    A factor z maps output offsets from the centre to input offsets z times
    larger, so z > 1 zooms out and z < 1 zooms in; the aspect ratio changes.
    The generator's default fill was 'nearest' (edge pixels repeated) and its
    resampling bilinear (scipy order 1). Its centre was size / 2 + 0.5, one
    pixel past the true centre (size - 1) / 2, which this op uses.

    Args:
      lo, hi: range of each factor.
      fill: 'nearest' (reference), 'constant' (black) or 'reflect'.
      interpolation: 'bilinear' (reference) or 'nearest'.
    """

    aligned = True

    def __init__(self, lo=0.5, hi=1.5, fill="nearest", interpolation="bilinear"):
        self.lo, self.hi = number_range("zoom", ("lo", "hi"), lo, hi, minimum=1e-3)
        self.fill, self.interpolation = _geometry_options("zoom", fill, interpolation)

    def matrices(self, seed, batch):
        seed_x, seed_y = split(seed, 2)
        zx = draw(seed_x, [batch.size], self.lo, self.hi)
        zy = draw(seed_y, [batch.size], self.lo, self.hi)
        zeros = tf.zeros_like(zx)
        return _about_centre(zx, zeros, zeros, zy, batch)


@register("affine_scale")
class AffineScale(GeometricOp):
    """imgaug Affine(scale=(lo, hi)): one factor for both axes, about the centre, black fill.

    A factor s > 1 enlarges the picture (zooms in), s < 1 shrinks it with a
    black border. imgaug's defaults: bilinear (order 1), constant fill 0.

    Args:
      lo, hi: range of the factor.
      fill: 'constant' (reference), 'nearest' or 'reflect'.
      interpolation: 'bilinear' (reference) or 'nearest'.
    """

    aligned = True

    def __init__(self, lo=0.25, hi=2.0, fill="constant", interpolation="bilinear"):
        self.lo, self.hi = number_range("affine_scale", ("lo", "hi"), lo, hi, minimum=1e-3)
        self.fill, self.interpolation = _geometry_options("affine_scale", fill, interpolation)

    def matrices(self, seed, batch):
        inverse = 1.0 / draw(seed, [batch.size], self.lo, self.hi)
        zeros = tf.zeros_like(inverse)
        return _about_centre(inverse, zeros, zeros, inverse, batch)


@register("rotate")
class Rotate(GeometricOp):
    """imgaug Affine(rotate=(lo, hi)): rotation in degrees about the centre, black fill.

    Positive angles turn the picture clockwise on screen.

    Args:
      lo, hi: range of the angle in degrees.
      fill: 'constant' (reference), 'nearest' or 'reflect'.
      interpolation: 'bilinear' (reference) or 'nearest'.
      random_sign: negate the angle for half the images (RandAugment's magnitudes).
    """

    def __init__(self, lo=-45.0, hi=45.0, fill="constant", interpolation="bilinear", random_sign=False):
        self.lo, self.hi = number_range("rotate", ("lo", "hi"), lo, hi, -360.0, 360.0)
        self.fill, self.interpolation = _geometry_options("rotate", fill, interpolation)
        self.random_sign = bool(random_sign)

    def matrices(self, seed, batch):
        angle = draw(seed, [batch.size], self.lo, self.hi, self.random_sign) * (math.pi / 180.0)
        cos, sin = tf.cos(angle), tf.sin(angle)
        return _about_centre(cos, sin, -sin, cos, batch)


@register("shear")
class Shear(GeometricOp):
    """Shear about the centre: x_in = x + s * (y - cy) (axis 'x'), or the same in y.

    Args:
      lo, hi: range of the shear factor s (tan of the shear angle).
      axis: 'x' or 'y'.
      fill, interpolation: as for `rotate`.
      random_sign: negate s for half the images.
    """

    def __init__(self, lo=-0.3, hi=0.3, axis="x", fill="constant", interpolation="bilinear",
                 random_sign=False):
        self.lo, self.hi = number_range("shear", ("lo", "hi"), lo, hi, -10.0, 10.0)
        self.axis = choice("shear", "axis", axis, ("x", "y"))
        self.fill, self.interpolation = _geometry_options("shear", fill, interpolation)
        self.random_sign = bool(random_sign)

    def matrices(self, seed, batch):
        s = draw(seed, [batch.size], self.lo, self.hi, self.random_sign)
        zeros, ones = tf.zeros_like(s), tf.ones_like(s)
        if self.axis == "x":
            return _about_centre(ones, s, zeros, ones, batch)
        return _about_centre(ones, zeros, s, ones, batch)


@register("translate")
class Translate(GeometricOp):
    """Shifts the picture by a fraction of its width ('x') or height ('y').

    Args:
      lo, hi: range of the shift as a fraction of the size (0.1 = 10%).
      axis: 'x' or 'y'.
      fill, interpolation: as for `rotate`.
      random_sign: negate the shift for half the images.
    """

    aligned = True

    def __init__(self, lo=-0.1, hi=0.1, axis="x", fill="constant", interpolation="bilinear",
                 random_sign=False):
        self.lo, self.hi = number_range("translate", ("lo", "hi"), lo, hi, -1.0, 1.0)
        self.axis = choice("translate", "axis", axis, ("x", "y"))
        self.fill, self.interpolation = _geometry_options("translate", fill, interpolation)
        self.random_sign = bool(random_sign)

    def matrices(self, seed, batch):
        shift = draw(seed, [batch.size], self.lo, self.hi, self.random_sign)
        zeros, ones = tf.zeros_like(shift), tf.ones_like(shift)
        if self.axis == "x":
            return _affine(ones, zeros, -shift * batch.width, zeros, ones, zeros)
        return _affine(ones, zeros, zeros, zeros, ones, -shift * batch.height)


@register("random_crop")
class RandomCrop(GeometricOp):
    """Pad by `padding` pixels on each side, then crop back at a random position.

    The CIFAR-style crop: a whole-pixel shift in [-padding, padding] in x and y
    (exact, no resampling), fused into the batch's single warp.

    Args:
      padding: pixels of padding on each side.
      fill: 'constant' (zero padding), 'reflect' (TF's edge-inclusive mirror)
        or 'nearest' (edge replicate).
    """

    aligned = True

    def __init__(self, padding=4, fill="constant"):
        self.padding = number("random_crop", "padding", padding, 0, 1024, integer=True)
        self.fill = choice("random_crop", "fill", fill, FILLS)

    def matrices(self, seed, batch):
        offsets = tf.floor(uniform(seed, [2, batch.size]) * (2 * self.padding + 1)) - self.padding
        zeros, ones = tf.zeros([batch.size]), tf.ones([batch.size])
        return _affine(ones, zeros, offsets[0], zeros, ones, offsets[1])


@register("random_resized_crop")
class RandomResizedCrop(GeometricOp):
    """Inception-style crop: a box of random area and aspect ratio, resized to the image size.

    As torchvision's RandomResizedCrop: up to 10 tries per image for a box of
    area fraction in `scale` and aspect ratio (w / h, log-uniform) in `ratio`
    that fits, else the whole image; the box corners are not rounded to
    whole pixels.

    Args:
      scale: (lo, hi) fraction of the image area.
      ratio: (lo, hi) aspect ratio range.
      interpolation: 'bilinear' or 'nearest'.
    """

    aligned = True
    fill = "nearest"  # The box lies inside the image; sampling its border never reads black.
    _TRIES = 10

    def __init__(self, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), interpolation="bilinear"):
        self.scale = pair("random_resized_crop", "scale", scale, minimum=1e-4)
        self.ratio = pair("random_resized_crop", "ratio", ratio, minimum=1e-3)
        if self.scale[1] > 1.0:
            fail("random_resized_crop", f"scale must lie in (0, 1], got {scale!r}.")
        self.interpolation = choice("random_resized_crop", "interpolation", interpolation, INTERPOLATIONS)

    def matrices(self, seed, batch):
        seeds = split(seed, 4)
        shape = [batch.size, self._TRIES]
        area = draw(seeds[0], shape, *self.scale) * batch.height * batch.width
        aspect = tf.exp(draw(seeds[1], shape, math.log(self.ratio[0]), math.log(self.ratio[1])))
        w, h = tf.sqrt(area * aspect), tf.sqrt(area / aspect)
        fits = tf.logical_and(w <= batch.width, h <= batch.height)
        first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
        found = tf.reduce_any(fits, axis=1)
        w = tf.where(found, tf.gather(w, first, batch_dims=1), batch.width)
        h = tf.where(found, tf.gather(h, first, batch_dims=1), batch.height)
        x0 = uniform(seeds[2], [batch.size]) * (batch.width - w)
        y0 = uniform(seeds[3], [batch.size]) * (batch.height - h)
        sx, sy = w / batch.width, h / batch.height
        zeros = tf.zeros_like(sx)
        return _affine(sx, zeros, x0 + 0.5 * sx - 0.5, zeros, sy, y0 + 0.5 * sy - 0.5)
