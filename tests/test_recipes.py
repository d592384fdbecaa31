"""Every recipe in gin/recipes/: its header is honest, it parses, its network and augmentation build, it trains.

A recipe is a runnable gin file transcribing a published training recipe.
Each is parsed as written (with DATA_DIR pointed at the synthetic dataset),
its network is built at 64 px with 200 classes and counted against the
parameter count its header declares, its AUGMENT policy is built, and one
training step runs in-process on the synthetic dataset (5 classes, a small
batch, 32 px to keep it quick; no `init_from`).
"""

import glob
import os
import re

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import config
from trainer import train as train_lib
from trainer.data import augment
from trainer.models import blocks
from trainer.models import builder
from helpers import gin_header

pytestmark = pytest.mark.slow  # Trains or starts TensorFlow in subprocesses: CI runs these.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "gin", "recipes", "*.gin")))


@pytest.fixture(autouse=True)
def _clear_keras():
    yield  # (conftest clears gin around every test.)
    keras.backend.clear_session()


def _parse(recipe, synthetic_dir, *bindings, model_dir=None):
    config.parse_gin([recipe], [f"DATA_DIR = {synthetic_dir!r}", *bindings], model_dir=model_dir)


def test_there_is_a_recipe_beyond_the_reference():
    assert "gin/recipes/resnet18_cutmix.gin" in RECIPES
    # It reports well above the reference's 59.49%: the figure is in its header.
    assert "65.53%" in gin_header("gin/recipes/resnet18_cutmix.gin")


@pytest.mark.parametrize("recipe", RECIPES)
def test_header_states_its_status_and_source(recipe):
    header = gin_header(recipe)
    assert re.search(r"Status: \S", header), f"{recipe}: no 'Status:' line in the opening comment"
    cites = re.search(r"https?://\S+|arXiv:\d{4}\.\d{4,5}|docs/reference_recipe\.md", header)
    assert cites, f"{recipe}: the opening comment names no source URL or citation"
    assert re.search(r"python -m trainer\.main --gin_file=" + re.escape(recipe), header)
    assert "REQUIRED" in header and "Commonly overridden" in header


@pytest.mark.parametrize("recipe", RECIPES)
def test_parses_and_builds_the_declared_network_and_policy(recipe, synthetic_dir):
    _parse(recipe, synthetic_dir)
    for macro in ("DATA_DIR", "IMAGE_SIZE", "BATCH_SIZE", "EPOCHS", "NUM_CLASSES", "MODEL_DIR", "AUGMENT"):
        gin.query_parameter(f"%{macro}")  # Defined (raises otherwise).
    assert gin.query_parameter("%IMAGE_SIZE") == 64 and gin.query_parameter("%NUM_CLASSES") == 200
    declared = re.search(r"([\d,]+) parameters", gin_header(recipe))
    assert declared, f"{recipe}: the header declares no parameter count"
    model = builder.build_network(64)
    assert model.count_params() == int(declared.group(1).replace(",", ""))
    assert tuple(model.output.shape[1:]) == (200,)
    policy = augment.build_policy(gin.query_parameter("%AUGMENT"))
    assert policy is not None
    images = tf.random.uniform([4, 64, 64, 3])
    labels = tf.one_hot([0, 1, 2, 3], 200)
    out, mixed = policy(images, labels, tf.constant([1, 2], tf.int32))
    assert out.shape == images.shape and mixed.shape == labels.shape
    np.testing.assert_allclose(tf.reduce_sum(mixed, axis=1), np.ones(4), rtol=1e-5)  # Label rows keep their sum.


def test_resnet18_cutmix_transcribes_openmixup(synthetic_dir):
    _parse("gin/recipes/resnet18_cutmix.gin", synthetic_dir)
    assert gin.query_parameter("%BATCH_SIZE") == 100 and gin.query_parameter("%EPOCHS") == 400
    assert gin.query_parameter("trainer.optim.cosine.learning_rate") == 0.2
    assert gin.query_parameter("trainer.optim.cosine.warmup_epochs") == 0
    assert gin.query_parameter("trainer.optim.sgd.momentum") == 0.9
    assert gin.query_parameter("trainer.optim.sgd.nesterov") is False
    assert "cutmix(1.0)" in gin.query_parameter("%AUGMENT")
    model = builder.build_network(64)
    # PyTorch's coupled weight decay 1e-4 as an L2 term 5e-5 * sum(w^2) on every kernel (2 * 5e-5 * w gradient).
    kernels = [layer for layer in model.layers if hasattr(layer, "kernel")]
    assert kernels and all(layer.kernel_regularizer.l2 == pytest.approx(5e-5) for layer in kernels)
    bn = model.get_layer("stem_bn")
    assert (bn.momentum, bn.epsilon) == (pytest.approx(0.9), pytest.approx(1e-5))


def test_reference_recipe_ghost_batch_norm_line_is_commented_out_and_works(synthetic_dir):
    text = open(os.path.join(REPO, "gin/recipes/reference_one_device.gin"), encoding="utf-8").read()
    line = "reference/trainer.blocks.batch_norm.virtual_batch_size = 16"
    assert f"# {line}\n" in text and f"\n{line}" not in text
    _parse("gin/recipes/reference_one_device.gin", synthetic_dir, line)
    layer = builder.build_network(64).get_layer("stem_bn")
    assert isinstance(layer, blocks.GhostBatchNormalization) and layer.virtual_batch_size == 16


def _one_step(recipe, synthetic_dir, tmp_path, *bindings):
    _parse(recipe, synthetic_dir, "NUM_CLASSES = 5", "IMAGE_SIZE = 32", "BATCH_SIZE = 4",
           "trainer.train.init_from = None", "trainer.train.previous_phase = None",
           "trainer.train.first_epoch = 1", "trainer.train.export = False", "trainer.train.log_every_steps = 1",
           *bindings, model_dir=str(tmp_path / "run"))
    train_lib.train(stop_after_steps=1)
    latest = tf.train.latest_checkpoint(str(tmp_path / "run" / "checkpoints"))
    assert latest and latest.endswith("-1"), latest


# Bindings for one recipe's step: the reference's step also takes its commented-out ghost BatchNorm line (one
# trace of the big network for both; plain BatchNorm trains in every other training test).
ONE_STEP_BINDINGS = {"gin/recipes/reference_one_device.gin": ("reference/trainer.blocks.batch_norm.virtual_batch_size"
                                                              " = 2",)}


@pytest.mark.parametrize("recipe", RECIPES)
def test_one_training_step_on_synthetic_data(recipe, synthetic_dir, tmp_path):
    _one_step(recipe, synthetic_dir, tmp_path, *ONE_STEP_BINDINGS.get(recipe, ()))
