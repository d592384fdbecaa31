"""Mixing ops: MixUp and CutMix mix labels by what they mix of the images."""

import augment_helpers as h
import numpy as np
import pytest


@pytest.mark.parametrize("spec", ["mixup(0.4)", "cutmix(1.0)", "one_of(mixup(0.8), cutmix(1.0))"])
def test_mixing_ops_mix_labels_summing_to_one(spec):
    labels = h.make_labels(8, classes=8)
    images, mixed = h.run(spec, images=h.make_images(8), labels=labels)
    np.testing.assert_allclose(mixed.sum(axis=1), 1.0, atol=1e-6)
    assert (mixed >= 0).all() and (mixed.max(axis=1) < 1.0).any()
    assert images.min() >= 0.0 and images.max() <= 1.0


def test_cutmix_label_weight_is_the_pasted_area():
    images = np.stack([np.full([32, 32, 3], i / 8.0, np.float32) for i in range(8)])
    labels = h.make_labels(8, classes=8)
    out, mixed = h.run("cutmix(1.0)", images=images, labels=labels)
    for i in range(8):
        own = np.isclose(out[i, ..., 0], images[i, 0, 0, 0]).mean()
        assert mixed[i, i] == pytest.approx(own, abs=1e-5)
