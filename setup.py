"""Installs the `trainer` package and the project's gin files (as `trainer/gin/`)."""

import os

from setuptools import setup


def _gin_files():
    files = []
    for dirpath, _, names in os.walk("gin"):
        files += [os.path.relpath(os.path.join(dirpath, n), "gin") for n in names if n.endswith(".gin")]
    return sorted(files)


setup(
    name="tiny-imagenet-trainer",
    version="0.1.0",
    description="Declarative image-classification training on Tiny ImageNet with TensorFlow, Keras 3 and gin.",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["trainer", "trainer.data", "trainer.data.augment", "trainer.data.sources", "trainer.evaluation",
              "trainer.models", "trainer.gin"],
    package_dir={"trainer.gin": "gin"},
    package_data={"trainer.gin": _gin_files()},
    install_requires=[
        "tensorflow>=2.20,<2.22",
        "keras>=3.10",
        # trainer/config.py uses gin's public parser API; checked with 0.5.0.
        "gin-config>=0.5.0,<0.6",
        "absl-py>=2.1",
        "tensorboard>=2.20",
        "numpy>=1.26",
        "matplotlib>=3.5",  # The evaluation's figures (confusion matrix, Grad-CAM, reliability diagram).
    ],
    extras_require={
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "pillow>=10.0", "hypothesis>=6.100", "ruff>=0.6"],
        "bench": ["pillow>=10.0"],
    },
    entry_points={"console_scripts": [
        "tiny-train = trainer.cli:tiny_train",
        "tiny-plan = trainer.cli:tiny_plan",
        "tiny-evaluate = trainer.cli:tiny_evaluate",
        "tiny-predict = trainer.cli:tiny_predict",
        "tiny-export = trainer.cli:tiny_export",
        "tiny-compare = trainer.cli:tiny_compare",
        "tiny-sweep = trainer.cli:tiny_sweep",
        "tiny-preview = trainer.cli:tiny_preview",
        "tiny-synthetic = trainer.cli:tiny_synthetic",
        "tiny-download = trainer.cli:tiny_download",
        "tiny-convert = trainer.cli:tiny_convert",
    ]},
)
