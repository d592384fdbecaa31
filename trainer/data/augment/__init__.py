"""Batch augmentation ops composed from a gin string: the reference policies and modern ones.

An op augments a whole batch at once inside tf.data (vectorised, per-image
random draws):

    op(images, labels, seed) -> (images, labels)

- images: float32 [B, H, W, 3] in [0, 1] (uint8 in [0, 255] is accepted and
  converted); the output is float32, in [0, 1] unless an op is told not to
  clip (`brightness(..., clip=False)`, the reference recipe's unclipped
  multiply): then values above 1 survive into the output.
- labels: float32 [B, C] (one-hot, or already mixed); only MixUp and CutMix
  change them, keeping each row's sum.
- seed: an int32/int64 tensor of shape [2]. Every draw is stateless, so the
  same seed gives the same output.

A policy is a string over the registry, e.g.
`flip(0.5) | zoom(0.5, 1.5) | channel_shuffle() | coarse_dropout(0.2, 0.02)`;
`build_policy` parses it into one op (see `policy`). `python -m
trainer.data.augment --list` prints every op with its arguments.

Modules:
  policy:     the policy language (parsing, argument checks, registry) and the
              combinators sequential / sometimes / one_of / random_order.
  engine:     the batch with its pending fused warp, resampling, random draws,
              and the Op / GeometricOp / PixelOp base classes.
  geometric:  identity, flip, zoom, affine_scale, rotate, shear, translate,
              random_crop, random_resized_crop.
  colour:     brightness, channel_shuffle, color, contrast, sharpness,
              solarize, posterize, auto_contrast, equalize.
  erasing:    coarse_dropout, random_erasing.
  mixing:     mixup, cutmix.
  composite:  rand_augment, augmix.

The public names below load lazily (on first use), so `python -m
trainer.data.augment --help` does not import TensorFlow.
"""

import importlib

# Modules that register ops, in registration order.
OP_MODULES = ("policy", "geometric", "colour", "erasing", "mixing", "composite")

# Public name -> the module that defines it.
_EXPORTS = {
    "build_policy": "policy", "register": "policy", "REGISTRY": "policy",
    "Sequential": "policy", "Sometimes": "policy", "OneOf": "policy", "RandomOrder": "policy",
    "Op": "engine", "GeometricOp": "engine", "PixelOp": "engine",
    "Identity": "geometric", "Flip": "geometric", "Zoom": "geometric", "AffineScale": "geometric",
    "Rotate": "geometric", "Shear": "geometric", "Translate": "geometric", "RandomCrop": "geometric",
    "RandomResizedCrop": "geometric",
    "Brightness": "colour", "ChannelShuffle": "colour", "Color": "colour", "Contrast": "colour",
    "Sharpness": "colour", "Solarize": "colour", "Posterize": "colour", "AutoContrast": "colour",
    "Equalize": "colour",
    "CoarseDropout": "erasing", "RandomErasing": "erasing",
    "MixUp": "mixing", "CutMix": "mixing",
    "RandAugment": "composite", "AugMix": "composite",
}


def load():
    """Imports every op module (this imports TensorFlow), so the registry is complete.

    Returns:
      The registry: policy name -> op factory.
    """
    for name in OP_MODULES:
        importlib.import_module(f"{__name__}.{name}")
    return importlib.import_module(f"{__name__}.policy").REGISTRY


def __getattr__(name):
    """Loads a public name on first use (PEP 562), after every op module has registered its ops."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    load()  # Every op registered before any policy is built.
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    """The module's names, the lazily loaded ones included."""
    return sorted(set(globals()) | set(_EXPORTS))
