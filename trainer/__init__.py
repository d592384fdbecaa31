"""A declarative image-classification trainer for Tiny ImageNet (TensorFlow, Keras 3, gin)."""

__version__ = "0.1.0"
