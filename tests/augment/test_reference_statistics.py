"""The reference policies' statistics against figures measured on the reference's libraries.

The reference recipe ran Keras ImageDataGenerator and imgaug 0.2.9; the
targets below were measured on that path. Each test runs an op or a policy
on synthetic images, uniform in [0.2, 1] per pixel (strictly positive, so
only the augmentation makes black), and counts black pixels: all three
channels exactly 0. Sample sizes make one percentage point at least three
standard errors of our own estimate (for a share p over n images the
standard error is sqrt(p (1 - p) / n)); the seeds are fixed, so every run
measures the same figures. Figures observed when these tests were written are
in each docstring.
"""

import augment_helpers as h
import numpy as np
import pytest
import tensorflow as tf

from trainer.data import augment
from trainer.data.augment import engine

POINT = 0.01  # One percentage point.
HEAVY_DROPOUT = "coarse_dropout(p=0.2, size_percent=0.02, min_grid=4)"


def _outputs(spec, count, size, batch=600, seed=0):
    """Yields (inputs, outputs) of policy `spec` over `count` images of `size` px, in batches.

    One batch of random images serves every batch (each with its own
    augmentation seed): what is measured depends on the augmentation's draws,
    not on the pixel values, as long as they are positive.
    """
    policy = augment.build_policy(spec)
    run = tf.function(lambda x, y, s: policy(x, y, s)[0])
    images = np.random.default_rng(seed).uniform(0.2, 1.0, [batch, size, size, 3]).astype(np.float32)
    labels = tf.zeros([batch, 1])
    for k in range(count // batch):
        yield images, run(images, labels, tf.constant([seed, k])).numpy()


def _black_areas(spec, count, size):
    """Per image, the share of pixels black in all three channels."""
    return np.concatenate([(out == 0).all(axis=-1).mean(axis=(1, 2)) for _, out in _outputs(spec, count, size)])


def _assert_share(observed, target, count, tolerance=POINT):
    """`observed` within `tolerance` of `target`, and the tolerance at least 3 standard errors."""
    assert 3 * np.sqrt(target * (1 - target) / count) <= tolerance
    assert abs(observed - target) <= tolerance, f"observed {observed:.4f}, target {target:.4f}"


def test_phase64_aug_black_pixels():
    """reference_heavy.gin at 64 px: 2.0% of images without a black pixel, 35.9% of the area black.

    Observed: 2.03% without black, mean black area 35.6% (7,200 images).
    The black comes from the scale's border (s < 1, 43% of images), the
    dropped cells and the rotation's corners (every rotated image but those
    with tiny angles), so almost every image has some.
    """
    count = 7200  # Black area: sd about 0.28 per image, so n >= 9 x 0.28^2 / 0.01^2 = 7,056.
    areas = _black_areas(h.augment_macro("reference_heavy.gin"), count, 64)
    _assert_share((areas == 0).mean(), 0.020, count)
    assert 3 * areas.std() / np.sqrt(count) <= POINT
    assert abs(areas.mean() - 0.359) <= POINT, areas.mean()


def test_coarse_dropout_alone_is_imgaug_0_2_9():
    """coarse_dropout(p=0.2, size_percent=0.02, min_grid=4) alone: 0.8^16 = 2.8% of images lose nothing.

    imgaug 0.2.9's 4x4 minimum grid at 32 and 64 px: 16 cells, each dropped
    with p 0.2, so 2.8% untouched and 20% of the area black (imgaug 0.4.0's
    3x3 grid would leave 13.4% untouched). Observed: 2.80% untouched, 20.1%
    black (3,000 images at 32 px; the grid, and so the draws, are the same at 64 px).
    """
    count = 3000
    areas = _black_areas(HEAVY_DROPOUT, count, 32)
    _assert_share((areas == 0).mean(), 0.8 ** 16, count)
    assert abs(areas.mean() - 0.2) <= POINT


def test_phase64_aug_dropout_branch():
    """Images of phase64_aug that lose no cell to coarse dropout: issue 11's 32.8%, read as 0.3 + 0.7 x 0.8^16.

    Issue 11 gives 32.8% for "images losing nothing" to the dropout branch.
    Dropout alone leaves 0.8^16 = 2.8% untouched (previous test), so the
    figure must count the whole policy: the 30% of images that take the
    rotation branch plus the 70% x 2.8% whose sixteen cells all survive,
    31.97% exactly. That is 0.8 points from 32.8%: less than one standard
    error if the reference counted about 2,000 images (1 point); the test
    checks the exact figure, as a seed-dependent pass against 32.8% would
    prove nothing. (Counting
    instead the images where dropout changes no visible pixel, i.e. also those
    whose dropped cells fall inside the black border of a shrunk image, gives
    about 36%, which does not match.)

    Measured on the policy itself, with every op but the dropout replaced by
    identity(): the positions in the sequence and so the seeds are unchanged,
    the dropout draws are those of the full policy. Observed: 32.0% (24,000
    images; the grid is 4x4 at any size below 200 px, so 16 px images suffice).
    """
    policy = h.augment_macro("reference_heavy.gin")
    ops = [op.strip() for op in policy.split(" | ")]
    assert ops[3] == f"sometimes(0.7, {HEAVY_DROPOUT}, rotate(-45, 45))"
    dropout_only = " | ".join(["identity()"] * 3 + [f"sometimes(0.7, {HEAVY_DROPOUT}, identity())"])
    count = 24000
    untouched = np.concatenate([(out == images).all(axis=(1, 2, 3))
                                for images, out in _outputs(dropout_only, count, 16, batch=4000)])
    expected = 0.3 + 0.7 * 0.8 ** 16
    _assert_share(untouched.mean(), expected, count)
    assert abs(expected - 0.328) < 0.0085  # Issue 11's figure is 0.83 points away.


@pytest.mark.parametrize("size", [32, 64])
def test_phase32_and_phase64_black_pixels(size):
    """reference.gin: 2.7-2.9% of images without a black pixel (zoom fills with edge pixels; only dropout blackens).

    Observed: 3.00% at both sizes (3,000 images; the same draws, as the grid is 4x4 at both).
    """
    count = 3000
    areas = _black_areas(h.augment_macro("reference.gin"), count, size)
    _assert_share((areas == 0).mean(), 0.028, count)


def test_zoom_draws_x_and_y_independently():
    """zoom(0.5, 1.5): |zx - zy| > 0.05 in about 90% of images (independent draws: 0.95^2 = 90.25%).

    Observed: 90.1% (20,000 images, from the op's matrices).
    """
    count = 20000
    batch = engine.Batch(tf.zeros([count, 4, 4, 3]), tf.zeros([count, 1]))
    matrices = augment.Zoom(0.5, 1.5).matrices(tf.constant([1, 2]), batch).numpy()
    zx, zy = matrices[:, 0, 0], matrices[:, 1, 1]
    assert 0.5 <= zx.min() and zx.max() <= 1.5 and 0.5 <= zy.min() and zy.max() <= 1.5
    _assert_share((np.abs(zx - zy) > 0.05).mean(), 0.90, count)


def test_affine_scale_draws_one_factor_for_both_axes():
    """affine_scale(0.25, 2.0): the same factor in x and y for every image, spread over [0.25, 2].

    Observed: 42.7% of images shrunk (expected 0.75 / 1.75 = 42.9%; 24,000 images).
    """
    count = 24000
    batch = engine.Batch(tf.zeros([count, 4, 4, 3]), tf.zeros([count, 1]))
    matrices = augment.AffineScale(0.25, 2.0).matrices(tf.constant([1, 2]), batch).numpy()
    np.testing.assert_array_equal(matrices[:, 0, 0], matrices[:, 1, 1])
    scale = 1.0 / matrices[:, 0, 0]
    assert 0.25 <= scale.min() < 0.26 and 1.99 < scale.max() <= 2.0
    _assert_share((scale < 1.0).mean(), 0.75 / 1.75, count)  # Shrunk (black border): 42.9%.


def test_rotation_black_area():
    """rotate(-45, 45) with black fill at 64 px: 10.7% of the area black on average.

    Observed: 10.3% (1,200 images; per-image sd about 0.05, so the standard error is 0.15 points).
    """
    count = 1200
    areas = _black_areas("rotate(-45, 45)", count, 64)
    assert 3 * areas.std() / np.sqrt(count) <= POINT
    assert abs(areas.mean() - 0.107) <= POINT, areas.mean()


def test_brightness_per_channel_share():
    """brightness(0.5, 1.5, per_channel=0.5): about half the images get a factor per channel.

    The reference measured 49%; imgaug's per_channel=0.5 is a Binomial(0.5)
    draw per image, so the expectation is 50% and 49% is within the sampling
    error of a reference measurement on about 2,000 images. The test checks
    the exact 50% (one point is 3 standard errors at 22,500 images).
    Observed: 49.7% (24,000 images). Images with one factor keep their three
    channels equal.
    """
    count = 24000
    flat = np.full([count, 2, 2, 3], 0.5, np.float32)
    out, _ = h.run("brightness(0.5, 1.5, per_channel=0.5, clip=False)", images=flat, labels=np.zeros([count, 1]))
    channels = out[:, 0, 0]
    per_channel = ~((channels[:, 0] == channels[:, 1]) & (channels[:, 1] == channels[:, 2]))
    _assert_share(per_channel.mean(), 0.50, count)
    assert (out == out[:, :1, :1]).all()  # One factor per channel over the whole image.
