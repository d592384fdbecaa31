"""Every declaration in gin/models/: its header is true, its plan agrees with Keras, it trains."""

import glob
import os
import re

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import config
from trainer.models import builder
from trainer.models import plan
from helpers import gin_header

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_FILES = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "gin", "models", "*.gin")))
NUM_CLASSES = 200


@pytest.fixture(autouse=True)
def _clean_gin():
    yield  # (conftest clears gin around every test.)
    keras.backend.clear_session()


def _parse(model_file):
    config.parse_gin([model_file], defaults=[f"NUM_CLASSES = {NUM_CLASSES}"])


def _number(text):
    return int(text.replace(",", ""))


def test_the_four_declarations_are_there():
    assert {"reference.gin", "resnet18.gin", "densenet_bc.gin", "small.gin"} <= {
        os.path.basename(p) for p in MODEL_FILES}


@pytest.mark.slow
@pytest.mark.parametrize("model_file", MODEL_FILES)
def test_plan_matches_keras_and_the_filegin_header(model_file):
    _parse(model_file)
    result = plan.make_plan(64)
    model = builder.build_network(64)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    non_trainable = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    t = result.totals
    assert (t.params, t.trainable, t.non_trainable) == (model.count_params(), trainable, non_trainable)

    header = gin_header(model_file)
    params = re.search(r"([\d,]+) parameters \(([\d,]+) trainable, ([\d,]+) non-trainable", header)
    assert params, f"{model_file}: the header must state the parameter count"
    assert tuple(_number(g) for g in params.groups()) == (t.params, t.trainable, t.non_trainable)
    rf = re.search(r"[Rr]eceptive field ([\d,]+) px at the output", header)
    assert rf and _number(rf.group(1)) == t.rf, f"{model_file}: header RF vs plan RF {t.rf}"


@pytest.mark.slow
@pytest.mark.parametrize("model_file", MODEL_FILES)
def test_one_training_step_on_cpu(model_file):
    _parse(model_file)
    keras.utils.set_random_seed(0)
    model = builder.build_network(32)
    images = tf.random.stateless_uniform((2, 32, 32, 3), seed=(1, 2))
    labels = tf.one_hot([3, 7], NUM_CLASSES)
    before = [v.numpy().copy() for v in model.weights]
    optimizer = keras.optimizers.Adam(1e-3)
    with tf.GradientTape() as tape:
        logits = model(images, training=True)
        loss = tf.reduce_mean(keras.losses.categorical_crossentropy(labels, logits, from_logits=True))
        loss += sum(model.losses)
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    assert logits.dtype == tf.float32 and tuple(logits.shape) == (2, NUM_CLASSES)
    assert np.isfinite(float(loss))
    assert all(g is not None for g in grads)
    # Every kernel, BN scale and offset trains and every BN moving statistic updates (biases
    # before a BatchNorm get a gradient of about zero, so they are left out).
    unchanged = [v.path for b, v in zip(before, model.weights)
                 if v.name != "bias" and np.array_equal(b, v.numpy())]
    assert not unchanged


def _config_after(*gin_files):
    """The declared network's get_config() after parsing `gin_files` (10 classes), layer by layer."""
    gin.clear_config()
    keras.backend.clear_session()
    config.parse_gin(list(gin_files), ["NUM_CLASSES = 10"])
    return builder.build_network(32).get_config()


@pytest.mark.slow
@pytest.mark.parametrize("model_file", MODEL_FILES)
def test_a_model_file_declares_its_network_whatever_was_included_before(model_file):
    """Block defaults are scoped under the network's name: no model file leaks into another."""
    alone = _config_after(model_file)
    before = ["gin/quickstart.gin", *(other for other in MODEL_FILES if other != model_file)]
    if _config_after(*before, model_file) != alone:  # All at once (a build takes seconds); then which one.
        leaks = [other for other in before if _config_after(other, model_file) != alone]
        pytest.fail(f"{', '.join(leaks) or 'the files included together'} "
                    f"{'leaks' if len(leaks) == 1 else 'leak'} into {model_file}")


def test_scoped_block_defaults_reach_their_network_only():
    gin.clear_config()
    config.parse_gin(["gin/models/small.gin"], ["NUM_CLASSES = 10"])
    small = builder.build_network(32)
    assert {layer.momentum for layer in small.layers if isinstance(layer, keras.layers.BatchNormalization)} == {0.9}
    gin.clear_config()
    keras.backend.clear_session()
    config.parse_gin(["gin/models/small.gin", "gin/models/resnet18.gin"], ["NUM_CLASSES = 10"])
    resnet = builder.build_network(32)
    assert {layer.momentum for layer in resnet.layers if isinstance(layer, keras.layers.BatchNormalization)} == {0.99}
