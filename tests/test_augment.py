"""Augmentation ops: contract (shape, dtype, range, seeds), semantics, fusion, policy parsing, gin files."""

import glob
import os

import gin
import numpy as np
import pytest
import tensorflow as tf

from trainer.data import augment
from trainer.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = (7, 11)

# One spec per registered op, with arguments that change every image batch.
OP_SPECS = {
    "identity": "identity()",
    "flip": "flip(1.0)",
    "zoom": "zoom(0.5, 1.5)",
    "affine_scale": "affine_scale(0.25, 2.0)",
    "rotate": "rotate(-45, 45)",
    "shear": "shear(-0.3, 0.3, axis='y')",
    "translate": "translate(-0.2, 0.2)",
    "random_crop": "random_crop(4, fill='reflect')",
    "random_resized_crop": "random_resized_crop()",
    "brightness": "brightness(0.5, 1.5, per_channel=0.5)",
    "channel_shuffle": "channel_shuffle(1.0)",
    "color": "color(0.2, 1.8)",
    "contrast": "contrast(0.2, 1.8)",
    "sharpness": "sharpness(0.0, 2.0)",
    "solarize": "solarize(0.3, 0.7)",
    "posterize": "posterize(2, 5)",
    "auto_contrast": "auto_contrast()",
    "equalize": "equalize()",
    "coarse_dropout": "coarse_dropout(0.5, 0.02)",
    "random_erasing": "random_erasing(1.0)",
    "mixup": "mixup(0.4)",
    "cutmix": "cutmix(1.0)",
    "sequential": "sequential(flip(1.0), coarse_dropout(0.5))",
    "sometimes": "sometimes(0.5, rotate(10, 20), brightness(0.5, 0.7))",
    "one_of": "one_of(flip(1.0), equalize(), translate(0.1, 0.2))",
    "random_order": "random_order(flip(1.0), coarse_dropout(0.5), rotate(5, 10))",
    "rand_augment": "rand_augment(2, 9)",
    "augmix": "augmix()",
}
CHANGING = sorted(set(OP_SPECS) - {"identity"})


def _images(batch=4, size=32):
    """Asymmetric, non-constant images in [0.1, 0.9] (so stretching, flips and crops show)."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0.1, 0.6, size, dtype=np.float32)
    base = ramp[None, :, None, None] * np.ones([batch, 1, size, 3], np.float32)
    base += np.linspace(0.0, 0.2, size, dtype=np.float32)[None, None, :, None]
    base[..., 1] *= 0.8
    noise = rng.uniform(-0.1, 0.1, base.shape).astype(np.float32)
    return np.clip(base + noise, 0.1, 0.9)


def _labels(batch=4, classes=5):
    return tf.one_hot(np.arange(batch) % classes, classes).numpy()


def _run(spec, images=None, labels=None, seed=SEED):
    images = _images() if images is None else images
    labels = _labels(len(images)) if labels is None else labels
    out_images, out_labels = augment.build_policy(spec)(images, labels, tf.constant(seed))
    return out_images.numpy(), out_labels.numpy()


def _resamplings(spec, size=32):
    """(crop_and_resize calls, projective transform calls) in the policy's graph."""
    policy = augment.build_policy(spec)
    function = tf.function(lambda x, y, s: policy(x, y, s)).get_concrete_function(
        tf.TensorSpec([8, size, size, 3], tf.float32), tf.TensorSpec([8, 5], tf.float32),
        tf.TensorSpec([2], tf.int32))
    types = [op.type for op in function.graph.get_operations()]
    return types.count("CropAndResize"), types.count("ImageProjectiveTransformV3")


def test_every_registered_op_is_covered():
    assert set(OP_SPECS) == set(augment.REGISTRY)


@pytest.mark.parametrize("name", sorted(OP_SPECS))
def test_shape_dtype_range_and_label_sums(name):
    images, labels = _run(OP_SPECS[name])
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert labels.shape == (4, 5) and labels.dtype == np.float32
    np.testing.assert_allclose(labels.sum(axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("name", CHANGING)
def test_changes_images_with_probability_one(name):
    images, _ = _run(f"sometimes(1.0, {OP_SPECS[name]})")
    assert not np.array_equal(images, _images())


@pytest.mark.parametrize("name", sorted(OP_SPECS))
def test_never_changes_with_probability_zero(name):
    images, labels = _run(f"sometimes(0.0, {OP_SPECS[name]})")
    np.testing.assert_array_equal(images, _images())
    np.testing.assert_array_equal(labels, _labels())


def test_identity_never_changes():
    np.testing.assert_array_equal(_run("identity()")[0], _images())


@pytest.mark.parametrize("spec", ["flip({})", "channel_shuffle({})", "coarse_dropout({})",
                                  "random_erasing({})"])
def test_own_probability(spec):
    assert not np.array_equal(_run(spec.format(1.0))[0], _images())
    np.testing.assert_array_equal(_run(spec.format(0.0))[0], _images())


@pytest.mark.parametrize("name", sorted(OP_SPECS))
def test_same_seed_same_output_other_seed_other_output(name):
    first, first_labels = _run(OP_SPECS[name])
    again, again_labels = _run(OP_SPECS[name])
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first_labels, again_labels)
    if name not in ("identity", "flip", "auto_contrast", "equalize"):  # Those draw nothing (here).
        assert not np.array_equal(first, _run(OP_SPECS[name], seed=(8, 11))[0])


def test_uint8_input_gives_float_output():
    as_uint8 = np.round(_images() * 255).astype(np.uint8)
    images, _ = _run("flip(1.0) | brightness(0.9, 1.1)", images=as_uint8)
    expected, _ = _run("flip(1.0) | brightness(0.9, 1.1)", images=as_uint8.astype(np.float32) / 255)
    assert images.dtype == np.float32
    np.testing.assert_array_equal(images, expected)


# ---------------------------------------------------------------------------
# Semantics.


def test_flip_reverses_columns():
    np.testing.assert_array_equal(_run("flip(1.0)")[0], _images()[:, :, ::-1])


def test_rotate_positive_is_clockwise_about_the_centre():
    rotated, _ = _run("rotate(90, 90, interpolation='nearest')")
    np.testing.assert_array_equal(rotated, np.rot90(_images(), k=-1, axes=(1, 2)))


def test_zoom_factors_differ_per_axis_and_fill_repeats_edges():
    images = _images(batch=16)
    zoomed, _ = _run("zoom(0.5, 0.5)", images=images)  # Zoom in 2x: no border at all.
    np.testing.assert_allclose(zoomed[:, 16, 16], images[:, 16, 16], atol=0.2)
    out, _ = _run("zoom(1.5, 1.5)", images=images)  # Zoom out: edges repeated, never black.
    assert out.min() >= 0.1 - 1e-6
    # Independent x/y factors: some images stretch more in x than in y. The matrix shows it.
    batch = augment._Batch(images, _labels(16))  # pylint: disable=protected-access
    matrices = augment.Zoom(0.5, 1.5).matrices(tf.constant(SEED), batch).numpy()
    assert np.abs(matrices[:, 0, 0] - matrices[:, 1, 1]).max() > 0.1


def test_affine_scale_keeps_aspect_and_fills_black():
    batch = augment._Batch(_images(16), _labels(16))  # pylint: disable=protected-access
    matrices = augment.AffineScale(0.25, 2.0).matrices(tf.constant(SEED), batch).numpy()
    np.testing.assert_allclose(matrices[:, 0, 0], matrices[:, 1, 1])
    shrunk, _ = _run("affine_scale(0.5, 0.5)")
    assert (shrunk[:, :4] == 0).all() and (shrunk[:, 12:20, 12:20] > 0).all()


@pytest.mark.parametrize("size", [32, 64])
def test_coarse_dropout_is_a_3x3_grid_at_reference_sizes(size):
    images = np.full([64, size, size, 3], 0.5, np.float32)
    dropped, _ = _run("coarse_dropout(0.2, 0.02)", images=images, labels=_labels(64))
    zero = dropped[..., 0] == 0
    assert (zero == (dropped == 0).all(axis=-1)).all()  # All channels together.
    cells = (np.arange(size) * 3) // size
    for image in zero:  # Constant within each of the nine cells.
        for r in range(3):
            for c in range(3):
                block = image[cells == r][:, cells == c]
                assert block.all() or not block.any()
    fraction = zero.mean()
    assert 0.08 < fraction < 0.35  # Expected 0.2 of the area.


def test_brightness_per_channel_probability():
    images = np.full([8, 8, 8, 3], 0.5, np.float32)
    labels = _labels(8)
    one, _ = _run("brightness(0.5, 1.5, per_channel=0.0)", images=images, labels=labels)
    assert np.allclose(one[..., 0], one[..., 1]) and np.allclose(one[..., 1], one[..., 2])
    each, _ = _run("brightness(0.5, 1.5, per_channel=1.0)", images=images, labels=labels)
    assert not np.allclose(each[..., 0], each[..., 1])


def test_channel_shuffle_permutes_channels():
    images = _images()
    shuffled, _ = _run("channel_shuffle(1.0)", images=images)
    for out, original in zip(shuffled, images):
        matches = [p for p in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
                   if np.array_equal(out, original[..., list(p)])]
        assert len(matches) == 1


@pytest.mark.parametrize("spec", ["mixup(0.4)", "cutmix(1.0)", "one_of(mixup(0.8), cutmix(1.0))"])
def test_mixing_ops_mix_labels_summing_to_one(spec):
    labels = _labels(8, classes=8)
    images, mixed = _run(spec, images=_images(8), labels=labels)
    np.testing.assert_allclose(mixed.sum(axis=1), 1.0, atol=1e-6)
    assert (mixed >= 0).all() and (mixed.max(axis=1) < 1.0).any()
    assert images.min() >= 0.0 and images.max() <= 1.0


def test_cutmix_label_weight_is_the_pasted_area():
    images = np.stack([np.full([32, 32, 3], i / 8.0, np.float32) for i in range(8)])
    labels = _labels(8, classes=8)
    out, mixed = _run("cutmix(1.0)", images=images, labels=labels)
    for i in range(8):
        own = np.isclose(out[i, ..., 0], images[i, 0, 0, 0]).mean()
        assert mixed[i, i] == pytest.approx(own, abs=1e-5)


# ---------------------------------------------------------------------------
# Fusion: consecutive geometric ops run as one transform, and the result equals op-by-op.


@pytest.mark.parametrize("gin_file, expected", [
    ("reference.gin", (0, 1)),        # Flip + zoom with edge fill: one projective transform.
    ("reference_heavy.gin", (1, 1)),  # Flip + scale (+ rotation for some): one warp, split by kind.
])
def test_reference_policies_resample_each_image_once(gin_file, expected):
    assert _resamplings(_augment_macro(gin_file)) == expected


def test_flips_and_whole_pixel_crops_fuse_into_one_exact_crop():
    assert _resamplings("flip(0.5) | random_crop(4) | flip(0.5)") == (1, 0)
    np.testing.assert_array_equal(_run("flip(1.0) | flip(1.0)")[0], _images())
    np.testing.assert_array_equal(_run("flip(1.0) | random_crop(0)")[0], _images()[:, :, ::-1])


def test_different_fills_are_not_fused():
    assert _resamplings("zoom(0.9, 1.1) | rotate(-10, 10)") == (1, 2)


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_crop_and_resize_path_samples_like_the_projective_transform(interpolation):
    rng = np.random.default_rng(1)
    images = tf.constant(_images(16))
    scale = rng.uniform(0.3, 2.5, [16, 2]) * rng.choice([-1.0, 1.0], [16, 2])
    shift = rng.uniform(-20.0, 40.0, [16, 2])
    matrices = np.zeros([16, 3, 3], np.float32)
    matrices[:, 0, 0], matrices[:, 1, 1], matrices[:, 2, 2] = scale[:, 0], scale[:, 1], 1.0
    matrices[:, 0, 2], matrices[:, 1, 2] = shift[:, 0], shift[:, 1]
    # pylint: disable=protected-access
    crop = augment._crop(images, tf.constant(matrices), interpolation)
    projective = augment._projective(images, tf.constant(matrices), interpolation, "constant")
    np.testing.assert_allclose(crop.numpy(), projective.numpy(), atol=1e-4)


def _smooth_images(batch=4, size=32):
    ramp = np.linspace(0.1, 0.9, size, dtype=np.float32)
    return np.clip(ramp[None, :, None, None] + 0.1 * ramp[None, None, :, None]
                   + np.zeros([batch, size, size, 3], np.float32), 0.0, 1.0)


@pytest.mark.parametrize("spec", [
    "flip(1.0) | brightness(1.3, 1.3) | affine_scale(1.5, 1.5) | channel_shuffle(0.0) | rotate(30, 30)"
    " | coarse_dropout(0.0)",
    "affine_scale(1.6, 1.6) | rotate(-30, -30) | shear(0.3, 0.3)",
    "translate(0.2, 0.2) | rotate(20, 20) | translate(-0.2, -0.2)",
])
def test_fused_equals_op_by_op(spec):
    """One fused warp = the ops one at a time, but for one resampling instead of several.

    Also where an intermediate step lost pixels at its border: those stay black.
    """
    images = _smooth_images()
    fused, _ = _run(spec, images=images)
    for step in spec.split(" | "):  # Each op alone (deterministic arguments: the seed does not matter).
        images, _ = _run(step, images=images)
    assert (np.abs(fused - images) > 0.05).mean() < 0.06  # Edges: blurred once, not two or three times.
    assert abs((fused.max(axis=-1) < 0.02).mean() - (images.max(axis=-1) < 0.02).mean()) < 0.03


def test_fused_nearest_is_exact():
    spec = "flip(1.0) | brightness(1.3, 1.3) | rotate(90, 90, interpolation='nearest') | coarse_dropout(0.0)"
    images = _images()
    for step in spec.split(" | "):
        images, _ = _run(step, images=images)
    np.testing.assert_allclose(_run(spec)[0], images, atol=1e-6)


def test_runs_inside_tf_data_with_dataset_seeds():
    policy = augment.build_policy(_augment_macro("reference_heavy.gin"))
    images = tf.data.Dataset.from_tensors((_images(), _labels())).repeat(2)
    seeds = tf.data.Dataset.random(seed=3).batch(2, drop_remainder=True)
    dataset = tf.data.Dataset.zip((images, seeds)).map(
        lambda batch, s: policy(batch[0], batch[1], tf.cast(s, tf.int32)), num_parallel_calls=2)
    batches = [b[0].numpy() for b in dataset]
    assert len(batches) == 2 and not np.array_equal(batches[0], batches[1])
    assert all(b.shape == (4, 32, 32, 3) for b in batches)


# ---------------------------------------------------------------------------
# Policy strings.


def test_empty_policy_is_none():
    assert augment.build_policy(None) is None
    assert augment.build_policy("  ") is None


def test_pipe_builds_one_flat_sequence():
    policy = augment.build_policy("flip(0.5) | zoom(0.5, 1.5) | channel_shuffle")
    assert isinstance(policy, augment.Sequential)
    assert [type(op) for op in policy.ops] == [augment.Flip, augment.Zoom, augment.ChannelShuffle]


def test_line_breaks_and_keywords():
    policy = augment.build_policy("flip(p=0.5)\n  | sometimes(0.7, coarse_dropout(0.2, 0.02),\n"
                                  "                otherwise=rotate(-45, 45))")
    assert isinstance(policy.ops[1].otherwise, augment.Rotate)


@pytest.mark.parametrize("spec, expected", [
    ("flp(0.5)", r"Unknown augmentation op 'flp'.*Did you mean 'flip'"),
    ("flip(0.5) | sometimes(0.5, rotat(-4, 4))", r"'rotat'.*Did you mean 'rotate'"),
    ("flip(2)", r"'flip'.*p must be a number in \[0.0, 1.0\], got 2"),
    ("zoom(1.5, 0.5)", r"'zoom'.*lo must be <= hi"),
    ("rotate(-45, 45, fill='black')", r"'rotate'.*fill must be one of 'constant', 'nearest', 'reflect'"),
    ("zoom(0.5, hi)", r"'zoom'.*argument 'hi' is neither a literal nor a known op"),
    ("zoom(lo=0.5, bogus=1)", r"'zoom'.*unexpected keyword argument 'bogus'.*Expected zoom\(lo=0.5"),
    ("flip(0.5) +", r"not a valid expression"),
    ("flip(0.5) | 3", r"expected an op call"),
    ("flip(__import__('os'))", r"Unknown augmentation op '__import__'"),
    ("flip(p=[x for x in 'a'])", r"'flip'.*must be a literal"),
    ("flip('0.5')", r"'flip'.*p must be a number"),
    ("sometimes(0.5, 3)", r"'sometimes'.*then must be an op"),
    ("one_of()", r"'one_of'.*needs at least one op"),
])
def test_policy_errors_are_user_errors_naming_the_op(spec, expected):
    with pytest.raises(UserError, match=expected):
        augment.build_policy(spec)


def test_non_string_policy_is_a_user_error():
    with pytest.raises(UserError, match="must be a string"):
        augment.build_policy(3)


def test_register_adds_an_op_and_refuses_duplicates():
    @augment.register("test_invert")
    class Invert(augment.PixelOp):  # pylint: disable=unused-variable
        def transform(self, images, labels, seed, active):
            return augment._select(active, 1.0 - images, images), labels  # pylint: disable=protected-access

    try:
        np.testing.assert_allclose(_run("flip(1.0) | test_invert()")[0], 1.0 - _images()[:, :, ::-1])
        with pytest.raises(ValueError, match="registered twice"):
            augment.register("test_invert")(Invert)
    finally:
        del augment.REGISTRY["test_invert"]


# ---------------------------------------------------------------------------
# The shipped gin policies.


def _augment_macro(gin_file):
    gin.clear_config()
    try:
        gin.parse_config_file(os.path.join(REPO, "gin", "augment", gin_file))
        return gin.query_parameter("%AUGMENT")
    finally:
        gin.clear_config()


def test_every_augment_gin_file_is_tested():
    shipped = {os.path.basename(p) for p in glob.glob(os.path.join(REPO, "gin", "augment", "*.gin"))}
    assert shipped == {"reference.gin", "reference_heavy.gin", "modern.gin"}


@pytest.mark.parametrize("gin_file, first_ops", [
    ("reference.gin", [augment.Flip, augment.Zoom, augment.ChannelShuffle, augment.CoarseDropout]),
    ("reference_heavy.gin", [augment.Flip, augment.Brightness, augment.AffineScale, augment.Sometimes]),
    ("modern.gin", [augment.RandomResizedCrop, augment.Flip, augment.RandAugment,
                    augment.RandomErasing, augment.OneOf]),
])
def test_gin_policies_parse_and_run(gin_file, first_ops):
    policy = augment.build_policy(_augment_macro(gin_file))
    assert [type(op) for op in policy.ops] == first_ops
    images, labels = policy(_images(8), _labels(8), tf.constant(SEED))
    assert images.shape == (8, 32, 32, 3) and images.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 1.0
    np.testing.assert_allclose(tf.reduce_sum(labels, axis=1).numpy(), 1.0, atol=1e-6)
    assert not np.array_equal(images.numpy(), _images(8))


def test_reference_heavy_arguments_match_the_recipe():
    heavy = augment.build_policy(_augment_macro("reference_heavy.gin"))
    flip, brightness, scale, sometimes = heavy.ops
    assert flip.p == 0.5
    assert (brightness.lo, brightness.hi, brightness.per_channel) == (0.5, 1.5, 0.5)
    assert (scale.lo, scale.hi, scale.fill) == (0.25, 2.0, "constant")
    assert sometimes.p == 0.7 and (sometimes.then.p, sometimes.then.size_percent) == (0.2, 0.02)
    assert (sometimes.otherwise.lo, sometimes.otherwise.hi) == (-45.0, 45.0)
