"""Shared fixtures: one small synthetic dataset in Tiny ImageNet's layout per test session."""

import gin
import pytest

from trainer.data import synthetic


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """5 classes x 40 training images (64 px), 10 val images a class, 12 test images."""
    out = tmp_path_factory.mktemp("synthetic") / "tiny-imagenet-200"
    return synthetic.write_synthetic(str(out), num_classes=5, per_class=40, val_per_class=10, test_images=12)


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()
