"""Geometric ops: flip, rotation, zoom, affine scale (their matrices and pixels)."""

import augment_helpers as h
import numpy as np
import tensorflow as tf

from trainer.data import augment
from trainer.data.augment import engine


def test_flip_reverses_columns():
    np.testing.assert_array_equal(h.run("flip(1.0)")[0], h.make_images()[:, :, ::-1])


def test_rotate_positive_is_clockwise_about_the_centre():
    rotated, _ = h.run("rotate(90, 90, interpolation='nearest')")
    np.testing.assert_array_equal(rotated, np.rot90(h.make_images(), k=-1, axes=(1, 2)))


def test_zoom_factors_differ_per_axis_and_fill_repeats_edges():
    images = h.make_images(batch=16)
    zoomed, _ = h.run("zoom(0.5, 0.5)", images=images)  # Zoom in 2x: no border at all.
    np.testing.assert_allclose(zoomed[:, 16, 16], images[:, 16, 16], atol=0.2)
    out, _ = h.run("zoom(1.5, 1.5)", images=images)  # Zoom out: edges repeated, never black.
    assert out.min() >= 0.1 - 1e-6
    # Independent x/y factors: some images stretch more in x than in y. The matrix shows it.
    batch = engine.Batch(images, h.make_labels(16))
    matrices = augment.Zoom(0.5, 1.5).matrices(tf.constant(h.SEED), batch).numpy()
    assert np.abs(matrices[:, 0, 0] - matrices[:, 1, 1]).max() > 0.1


def test_affine_scale_keeps_aspect_and_fills_black():
    batch = engine.Batch(h.make_images(16), h.make_labels(16))
    matrices = augment.AffineScale(0.25, 2.0).matrices(tf.constant(h.SEED), batch).numpy()
    np.testing.assert_allclose(matrices[:, 0, 0], matrices[:, 1, 1])
    shrunk, _ = h.run("affine_scale(0.5, 0.5)")
    assert (shrunk[:, :4] == 0).all() and (shrunk[:, 12:20, 12:20] > 0).all()
