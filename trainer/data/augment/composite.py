"""Composite policies from the literature, built from the other ops: RandAugment and AugMix.

Keras 3's RandAugment, AugMix, MixUp, CutMix and RandomErasing layers are not
wrapped: they draw from a stateful `SeedGenerator` and reject a per-batch seed
tensor (`ValueError: Argument seed must be either an integer or an instance
of SeedGenerator`), so they cannot be deterministic per batch inside a
parallel tf.data map; Keras' RandAugment also picks one op for the whole batch
and computes every candidate op on every image. The versions here are
written from the papers and torchvision's definitions, vectorised per image.
"""

import tensorflow as tf

from trainer.data.augment.colour import (
    AutoContrast,
    Brightness,
    Color,
    Contrast,
    Equalize,
    Posterize,
    Sharpness,
    Solarize,
)
from trainer.data.augment.engine import Batch, Op, beta, scale_images, select, split
from trainer.data.augment.geometric import (
    INTERPOLATIONS,
    Identity,
    Rotate,
    Shear,
    Translate,
)
from trainer.data.augment.policy import (
    OneOf,
    Sequential,
    choice,
    fail,
    number,
    register,
)


@register("rand_augment")
class RandAugment(Op):
    """RandAugment (Cubuk et al. 2020) with torchvision's op set and magnitudes, per image.

    Each of `num_ops` rounds applies one op chosen uniformly per image among:
    identity, shear x/y (0.3 m), translate x/y (0.453 m of the size), rotate
    (30 m degrees), brightness / color / contrast / sharpness (factor 1 +- 0.9 m),
    posterize (8 - round(4 m) bits), solarize (threshold 1 - m), auto contrast,
    equalize; m = magnitude / (num_magnitude_bins - 1), signs random.
    Geometric ops act about the centre with black fill.

    Args:
      num_ops: ops per image.
      magnitude: 0 .. num_magnitude_bins - 1.
      num_magnitude_bins: magnitude scale (31 as torchvision).
      interpolation: 'bilinear' or 'nearest'.
    """

    heavy = True

    def __init__(self, num_ops=2, magnitude=9, num_magnitude_bins=31, interpolation="bilinear"):
        self.num_ops = number("rand_augment", "num_ops", num_ops, 1, 16, integer=True)
        bins = number("rand_augment", "num_magnitude_bins", num_magnitude_bins, 2, 1000, integer=True)
        magnitude = number("rand_augment", "magnitude", magnitude, 0, bins - 1)
        interpolation = choice("rand_augment", "interpolation", interpolation, INTERPOLATIONS)
        m = magnitude / (bins - 1)
        geometry = {"interpolation": interpolation, "random_sign": True}
        enhance = (1.0 + 0.9 * m, 1.0 + 0.9 * m)
        bits = 8 - round(4 * m)
        candidates = OneOf(
            Identity(),
            Shear(0.3 * m, 0.3 * m, axis="x", **geometry), Shear(0.3 * m, 0.3 * m, axis="y", **geometry),
            Translate(0.453 * m, 0.453 * m, axis="x", **geometry),
            Translate(0.453 * m, 0.453 * m, axis="y", **geometry),
            Rotate(30.0 * m, 30.0 * m, **geometry),
            Brightness(*enhance, random_sign=True), Color(*enhance, random_sign=True),
            Contrast(*enhance, random_sign=True), Sharpness(*enhance, random_sign=True),
            Posterize(bits, bits), Solarize(1.0 - m, 1.0 - m), AutoContrast(), Equalize())
        self._rounds = Sequential(*[candidates] * self.num_ops)

    def apply(self, batch, seed, active):
        self._rounds.apply(batch, seed, active)


@register("augmix")
class AugMix(Op):
    """AugMix (Hendrycks et al. 2020): a convex mix of `width` random op chains, then with the image.

    Each chain applies `depth` (or per image 1-3 when depth is -1) ops drawn
    from: auto contrast, equalize, posterize, rotate, solarize, shear x/y,
    translate x/y, at a level uniform in [0.1, severity] (continuous, not
    rounded as in the paper's code). Chain weights ~ Dirichlet(alpha); the
    result is (1 - m) * image + m * mix, m ~ Beta(alpha, alpha). The paper's
    Jensen-Shannon consistency loss is not part of it. The costliest op here
    (width x 3 steps, each a resampling and a partitioned pixel op).

    Args:
      severity: 1 .. 10.
      width: number of chains.
      depth: ops per chain, or -1 for 1-3 at random.
      alpha: Dirichlet and Beta parameter.
      interpolation: 'bilinear' or 'nearest'.
    """

    heavy = True

    def __init__(self, severity=3, width=3, depth=-1, alpha=1.0, interpolation="bilinear"):
        severity = number("augmix", "severity", severity, 0.1, 10.0)
        self.width = number("augmix", "width", width, 1, 16, integer=True)
        self.depth = number("augmix", "depth", depth, -1, 16, integer=True)
        if self.depth == 0:
            fail("augmix", "depth must be -1 (1 to 3 at random) or >= 1, got 0.")
        self.alpha = number("augmix", "alpha", alpha, 1e-3, 1e3)
        interpolation = choice("augmix", "interpolation", interpolation, INTERPOLATIONS)
        lo, hi = 0.1 / 10.0, severity / 10.0  # Level as a fraction of the paper's maximum (10).
        geometry = {"interpolation": interpolation, "random_sign": True}
        self._candidates = OneOf(
            AutoContrast(), Equalize(), Posterize(4 - min(int(severity * 0.4), 3), 4),
            Rotate(30.0 * lo, 30.0 * hi, **geometry), Solarize(1.0 - hi, 1.0 - lo),
            Shear(0.3 * lo, 0.3 * hi, axis="x", **geometry), Shear(0.3 * lo, 0.3 * hi, axis="y", **geometry),
            Translate(lo / 3.0, hi / 3.0, axis="x", **geometry),
            Translate(lo / 3.0, hi / 3.0, axis="y", **geometry))

    def apply(self, batch, seed, active):
        batch.flush()
        seeds = split(seed, self.width + 2)
        weights = tf.random.stateless_gamma([batch.size, self.width], seeds[0], alpha=self.alpha)
        weights /= tf.maximum(tf.reduce_sum(weights, axis=1, keepdims=True), 1e-30)
        mixed = tf.zeros_like(batch.images)
        for k in range(self.width):
            mixed += scale_images(self._chain(batch, seeds[k + 2]), weights[:, k])
        m = beta(seeds[1], [batch.size], self.alpha)
        batch.images = select(active, scale_images(batch.images, 1.0 - m) + scale_images(mixed, m), batch.images)

    def _chain(self, batch, seed):
        chain = Batch(batch.images, batch.labels, batch.unbounded)
        depth_seed, step_seed = split(seed, 2)
        steps = 3 if self.depth < 0 else self.depth
        depth = tf.random.stateless_uniform([batch.size], depth_seed, minval=1, maxval=4, dtype=tf.int32)
        for step in range(steps):
            active = depth > step if self.depth < 0 else None
            self._candidates.apply(chain, tf.random.experimental.stateless_fold_in(step_seed, step), active)
        chain.flush()
        return chain.images
