"""Shared by the augmentation tests: small test images, labels, running a policy, the shipped gin policies."""

import os

import numpy as np
import tensorflow as tf

import gin
from trainer.data import augment

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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


def make_images(batch=4, size=32):
    """Asymmetric, non-constant images in [0.1, 0.9] (so stretching, flips and crops show)."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0.1, 0.6, size, dtype=np.float32)
    base = ramp[None, :, None, None] * np.ones([batch, 1, size, 3], np.float32)
    base += np.linspace(0.0, 0.2, size, dtype=np.float32)[None, None, :, None]
    base[..., 1] *= 0.8
    noise = rng.uniform(-0.1, 0.1, base.shape).astype(np.float32)
    return np.clip(base + noise, 0.1, 0.9)


def make_smooth_images(batch=4, size=32):
    """Smooth ramps in [0.1, 1] (resampling them once or several times differs only at edges)."""
    ramp = np.linspace(0.1, 0.9, size, dtype=np.float32)
    return np.clip(ramp[None, :, None, None] + 0.1 * ramp[None, None, :, None]
                   + np.zeros([batch, size, size, 3], np.float32), 0.0, 1.0)


def make_labels(batch=4, classes=5):
    """One-hot float32 labels [batch, classes]."""
    return tf.one_hot(np.arange(batch) % classes, classes).numpy()


def run(spec, images=None, labels=None, seed=SEED):
    """Builds the policy `spec` and runs it once on `images` (default `make_images()`); returns numpy arrays."""
    images = make_images() if images is None else images
    labels = make_labels(len(images)) if labels is None else labels
    out_images, out_labels = augment.build_policy(spec)(images, labels, tf.constant(seed))
    return out_images.numpy(), out_labels.numpy()


def augment_macro(gin_file):
    """The AUGMENT policy string of gin/augment/<gin_file>."""
    gin.clear_config()
    try:
        gin.parse_config_file(os.path.join(REPO, "gin", "augment", gin_file))
        return gin.query_parameter("%AUGMENT")
    finally:
        gin.clear_config()
