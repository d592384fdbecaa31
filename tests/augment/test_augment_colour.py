"""Colour ops: brightness (per-channel factors, clipping), channel shuffle."""

import augment_helpers as h
import numpy as np
import pytest

from trainer.errors import UserError


def test_brightness_per_channel_probability():
    images = np.full([8, 8, 8, 3], 0.5, np.float32)
    labels = h.make_labels(8)
    one, _ = h.run("brightness(0.5, 1.5, per_channel=0.0)", images=images, labels=labels)
    assert np.allclose(one[..., 0], one[..., 1]) and np.allclose(one[..., 1], one[..., 2])
    each, _ = h.run("brightness(0.5, 1.5, per_channel=1.0)", images=images, labels=labels)
    assert not np.allclose(each[..., 0], each[..., 1])


def test_channel_shuffle_permutes_channels():
    images = h.make_images()
    shuffled, _ = h.run("channel_shuffle(1.0)", images=images)
    for out, original in zip(shuffled, images):
        matches = [p for p in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
                   if np.array_equal(out, original[..., list(p)])]
        assert len(matches) == 1


# ---------------------------------------------------------------------------
# Clipping: the reference's multiply was not clipped (values above white reached the network).


def test_brightness_clips_by_default():
    images = np.full([4, 8, 8, 3], 0.9, np.float32)
    out, _ = h.run("brightness(1.5, 1.5)", images=images)
    np.testing.assert_array_equal(out, 1.0)


def test_brightness_without_clip_keeps_values_above_one():
    images = np.full([4, 8, 8, 3], 0.9, np.float32)
    out, _ = h.run("brightness(1.5, 1.5, clip=False)", images=images)
    np.testing.assert_allclose(out, 1.35, rtol=1e-6)


@pytest.mark.parametrize("spec", [
    "brightness(1.5, 1.5, clip=False) | affine_scale(1.3, 1.3)",                 # Fused bilinear warp after it.
    "affine_scale(1.3, 1.3) | rotate(10, 10) | brightness(1.5, 1.5, clip=False)",  # Warp pending before it.
    "one_of(brightness(1.5, 1.5, clip=False), contrast(1.0, 1.0)) | rotate(10, 10)",  # Partitioned branch.
])
def test_engine_keeps_unclipped_values_through_resampling(spec):
    images = h.make_smooth_images(8, 32) * 0.4 + 0.55  # In [0.59, 0.99]: x 1.5 is above 1 everywhere.
    out, _ = h.run(spec, images=images, labels=h.make_labels(8))
    assert out.max() > 1.3
    assert out.min() >= 0.0


def test_value_table_ops_after_an_unclipped_multiply_stay_in_range():
    images = np.full([4, 16, 16, 3], 0.9, np.float32)
    for spec in ("brightness(1.5, 1.5, clip=False) | equalize()", "brightness(1.5, 1.5, clip=False) | solarize()"):
        out, _ = h.run(spec, images=images)
        assert 0.0 <= out.min() and out.max() <= 1.0, spec


def test_brightness_clip_must_be_a_bool():
    with pytest.raises(UserError, match=r"'brightness'.*clip must be True or False, got 1"):
        h.run("brightness(0.5, 1.5, clip=1)")
