"""Policy strings (parsing, errors, registration) and the shipped gin policies."""

import glob
import os

import augment_helpers as h
import numpy as np
import pytest
import tensorflow as tf

from trainer.data import augment
from trainer.data.augment import engine
from trainer.errors import UserError


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
            return engine.select(active, 1.0 - images, images), labels

    try:
        np.testing.assert_allclose(h.run("flip(1.0) | test_invert()")[0], 1.0 - h.make_images()[:, :, ::-1])
        with pytest.raises(ValueError, match="registered twice"):
            augment.register("test_invert")(Invert)
    finally:
        del augment.REGISTRY["test_invert"]


def test_every_augment_gin_file_is_tested():
    shipped = {os.path.basename(p) for p in glob.glob(os.path.join(h.REPO, "gin", "augment", "*.gin"))}
    assert shipped == {"reference.gin", "reference_heavy.gin", "modern.gin"}


@pytest.mark.parametrize("gin_file, first_ops", [
    ("reference.gin", [augment.Flip, augment.Zoom, augment.ChannelShuffle, augment.CoarseDropout]),
    ("reference_heavy.gin", [augment.Flip, augment.Brightness, augment.AffineScale, augment.Sometimes]),
    ("modern.gin", [augment.RandomResizedCrop, augment.Flip, augment.RandAugment,
                    augment.RandomErasing, augment.OneOf]),
])
def test_gin_policies_parse_and_run(gin_file, first_ops):
    policy = augment.build_policy(h.augment_macro(gin_file))
    assert [type(op) for op in policy.ops] == first_ops
    images, labels = policy(h.make_images(8), h.make_labels(8), tf.constant(h.SEED))
    assert images.shape == (8, 32, 32, 3) and images.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(images))
    # reference_heavy's multiply is unclipped (as in the reference): values above 1 may survive.
    assert float(tf.reduce_max(images)) <= (1.5 if gin_file == "reference_heavy.gin" else 1.0)
    np.testing.assert_allclose(tf.reduce_sum(labels, axis=1).numpy(), 1.0, atol=1e-6)
    assert not np.array_equal(images.numpy(), h.make_images(8))


def test_reference_heavy_arguments_match_the_recipe():
    heavy = augment.build_policy(h.augment_macro("reference_heavy.gin"))
    flip, brightness, scale, sometimes = heavy.ops
    assert flip.p == 0.5
    assert (brightness.lo, brightness.hi, brightness.per_channel, brightness.clip) == (0.5, 1.5, 0.5, False)
    assert (scale.lo, scale.hi, scale.fill) == (0.25, 2.0, "constant")
    dropout = sometimes.then
    assert sometimes.p == 0.7 and (dropout.p, dropout.size_percent, dropout.min_grid) == (0.2, 0.02, 4)
    assert (sometimes.otherwise.lo, sometimes.otherwise.hi) == (-45.0, 45.0)


def test_reference_arguments_match_the_recipe():
    flip, zoom, shuffle, dropout = augment.build_policy(h.augment_macro("reference.gin")).ops
    assert flip.p == 0.5 and (zoom.lo, zoom.hi, zoom.fill) == (0.5, 1.5, "nearest") and shuffle.p == 1.0
    assert (dropout.p, dropout.size_percent, dropout.min_grid) == (0.2, 0.02, 4)
