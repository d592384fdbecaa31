"""The batch engine and the op contract: shape, dtype, range, seeds, probabilities; warp fusion and resampling."""

import augment_helpers as h
import numpy as np
import pytest
import tensorflow as tf

from trainer.data import augment
from trainer.data.augment import engine


def _resamplings(spec, size=32):
    """(crop_and_resize calls, projective transform calls) in the policy's graph."""
    policy = augment.build_policy(spec)
    function = tf.function(lambda x, y, s: policy(x, y, s)).get_concrete_function(
        tf.TensorSpec([8, size, size, 3], tf.float32), tf.TensorSpec([8, 5], tf.float32),
        tf.TensorSpec([2], tf.int32))
    types = [op.type for op in function.graph.get_operations()]
    return types.count("CropAndResize"), types.count("ImageProjectiveTransformV3")


def test_every_registered_op_is_covered():
    assert set(h.OP_SPECS) == set(augment.REGISTRY)


@pytest.mark.parametrize("name", sorted(h.OP_SPECS))
def test_shape_dtype_range_and_label_sums(name):
    images, labels = h.run(h.OP_SPECS[name])
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert labels.shape == (4, 5) and labels.dtype == np.float32
    np.testing.assert_allclose(labels.sum(axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("name", h.CHANGING)
def test_changes_images_with_probability_one(name):
    images, _ = h.run(f"sometimes(1.0, {h.OP_SPECS[name]})")
    assert not np.array_equal(images, h.make_images())


@pytest.mark.parametrize("name", sorted(h.OP_SPECS))
def test_never_changes_with_probability_zero(name):
    images, labels = h.run(f"sometimes(0.0, {h.OP_SPECS[name]})")
    np.testing.assert_array_equal(images, h.make_images())
    np.testing.assert_array_equal(labels, h.make_labels())


def test_identity_never_changes():
    np.testing.assert_array_equal(h.run("identity()")[0], h.make_images())


@pytest.mark.parametrize("spec", ["flip({})", "channel_shuffle({})", "coarse_dropout({})",
                                  "random_erasing({})"])
def test_own_probability(spec):
    assert not np.array_equal(h.run(spec.format(1.0))[0], h.make_images())
    np.testing.assert_array_equal(h.run(spec.format(0.0))[0], h.make_images())


@pytest.mark.parametrize("name", sorted(h.OP_SPECS))
def test_same_seed_same_output_other_seed_other_output(name):
    first, first_labels = h.run(h.OP_SPECS[name])
    again, again_labels = h.run(h.OP_SPECS[name])
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first_labels, again_labels)
    if name not in ("identity", "flip", "auto_contrast", "equalize"):  # Those draw nothing (here).
        assert not np.array_equal(first, h.run(h.OP_SPECS[name], seed=(8, 11))[0])


def test_uint8_input_gives_float_output():
    as_uint8 = np.round(h.make_images() * 255).astype(np.uint8)
    images, _ = h.run("flip(1.0) | brightness(0.9, 1.1)", images=as_uint8)
    expected, _ = h.run("flip(1.0) | brightness(0.9, 1.1)", images=as_uint8.astype(np.float32) / 255)
    assert images.dtype == np.float32
    np.testing.assert_array_equal(images, expected)


@pytest.mark.parametrize("gin_file, expected", [
    ("reference.gin", (0, 1)),        # Flip + zoom with edge fill: one projective transform.
    ("reference_heavy.gin", (1, 1)),  # Flip + scale (+ rotation for some): one warp, split by kind.
])
def test_reference_policies_resample_each_image_once(gin_file, expected):
    assert _resamplings(h.augment_macro(gin_file)) == expected


def test_flips_and_whole_pixel_crops_fuse_into_one_exact_crop():
    assert _resamplings("flip(0.5) | random_crop(4) | flip(0.5)") == (1, 0)
    np.testing.assert_array_equal(h.run("flip(1.0) | flip(1.0)")[0], h.make_images())
    np.testing.assert_array_equal(h.run("flip(1.0) | random_crop(0)")[0], h.make_images()[:, :, ::-1])


def test_different_fills_are_not_fused():
    assert _resamplings("zoom(0.9, 1.1) | rotate(-10, 10)") == (1, 2)


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_crop_and_resize_path_samples_like_the_projective_transform(interpolation):
    rng = np.random.default_rng(1)
    images = tf.constant(h.make_images(16))
    scale = rng.uniform(0.3, 2.5, [16, 2]) * rng.choice([-1.0, 1.0], [16, 2])
    shift = rng.uniform(-20.0, 40.0, [16, 2])
    matrices = np.zeros([16, 3, 3], np.float32)
    matrices[:, 0, 0], matrices[:, 1, 1], matrices[:, 2, 2] = scale[:, 0], scale[:, 1], 1.0
    matrices[:, 0, 2], matrices[:, 1, 2] = shift[:, 0], shift[:, 1]
    # pylint: disable=protected-access
    crop = engine._crop(images, tf.constant(matrices), interpolation)
    projective = engine._projective(images, tf.constant(matrices), interpolation, "constant")
    np.testing.assert_allclose(crop.numpy(), projective.numpy(), atol=1e-4)


@pytest.mark.parametrize("spec", [
    ("flip(1.0) | brightness(1.3, 1.3) | affine_scale(1.5, 1.5) | channel_shuffle(0.0) | rotate(30, 30)"
     " | coarse_dropout(0.0)"),
    "affine_scale(1.6, 1.6) | rotate(-30, -30) | shear(0.3, 0.3)",
    "translate(0.2, 0.2) | rotate(20, 20) | translate(-0.2, -0.2)",
])
def test_fused_equals_op_by_op(spec):
    """One fused warp = the ops one at a time, but for one resampling instead of several.

    Also where an intermediate step lost pixels at its border: those stay black.
    """
    images = h.make_smooth_images()
    fused, _ = h.run(spec, images=images)
    for step in spec.split(" | "):  # Each op alone (deterministic arguments: the seed does not matter).
        images, _ = h.run(step, images=images)
    assert (np.abs(fused - images) > 0.05).mean() < 0.06  # Edges: blurred once, not two or three times.
    assert abs((fused.max(axis=-1) < 0.02).mean() - (images.max(axis=-1) < 0.02).mean()) < 0.03


def test_fused_nearest_is_exact():
    spec = "flip(1.0) | brightness(1.3, 1.3) | rotate(90, 90, interpolation='nearest') | coarse_dropout(0.0)"
    images = h.make_images()
    for step in spec.split(" | "):
        images, _ = h.run(step, images=images)
    np.testing.assert_allclose(h.run(spec)[0], images, atol=1e-6)


def test_runs_inside_tf_data_with_dataset_seeds():
    policy = augment.build_policy(h.augment_macro("reference_heavy.gin"))
    images = tf.data.Dataset.from_tensors((h.make_images(), h.make_labels())).repeat(2)
    seeds = tf.data.Dataset.random(seed=3).batch(2, drop_remainder=True)
    dataset = tf.data.Dataset.zip((images, seeds)).map(
        lambda batch, s: policy(batch[0], batch[1], tf.cast(s, tf.int32)), num_parallel_calls=2)
    batches = [b[0].numpy() for b in dataset]
    assert len(batches) == 2 and not np.array_equal(batches[0], batches[1])
    assert all(b.shape == (4, 32, 32, 3) for b in batches)
