"""Tests for trainer/models/blocks.py: each kind's layers, settings and shapes."""

import os
import re
import subprocess
import sys
import gin
import numpy as np
import keras
import pytest

from trainer.errors import UserError
from trainer import registry
from trainer.models import blocks


def _layers(outputs, inputs):
    """The layers between `inputs` and `outputs`, by name."""
    model = keras.Model(inputs, outputs)
    return {layer.name: layer for layer in model.layers}


def _image(size=8, channels=3):
    return keras.Input((size, size, channels))


def test_sepconv_has_the_reference_effective_settings():
    x = _image()
    layers = _layers(blocks.sepconv(x, name="s", filters=16), x)
    sep = layers["s_sepconv"]
    assert sep.kernel_size == (3, 3) and sep.strides == (1, 1) and sep.padding == "same"
    assert sep.depth_multiplier == 1 and sep.use_bias
    assert isinstance(sep.depthwise_initializer, keras.initializers.GlorotUniform)
    assert isinstance(sep.pointwise_initializer, keras.initializers.GlorotUniform)
    assert sep.depthwise_regularizer is None and sep.pointwise_regularizer is None
    assert list(layers)[-2:] == ["s_bn", "s_relu"]
    # depthwise 3*3*3 + pointwise 3*16 + bias 16; BN 4*16.
    assert sep.count_params() == 27 + 48 + 16
    assert layers["s_bn"].count_params() == 64


def test_sepconv_he_normal_l2_variant_is_selected_with_gin():
    gin.parse_config("sepconv.l2 = 1e-4\nsepconv.kernel_initializer = 'he_normal'")
    x = _image()
    model = keras.Model(x, blocks.sepconv(x, name="s", filters=4))
    sep = model.get_layer("s_sepconv")
    assert isinstance(sep.depthwise_initializer, keras.initializers.HeNormal)
    assert isinstance(sep.pointwise_initializer, keras.initializers.HeNormal)
    assert len(model.losses) == 2  # One L2 term per kernel.


def test_transition_is_conv1x1_with_bias_he_normal_l2_then_bn_relu():
    x = _image(channels=10)
    model = keras.Model(x, blocks.transition(x, name="T", filters=6))
    conv = model.get_layer("T_conv")
    assert conv.kernel_size == (1, 1) and conv.use_bias
    assert isinstance(conv.kernel_initializer, keras.initializers.HeNormal)
    assert conv.kernel_regularizer.l2 == pytest.approx(1e-4)
    assert len(model.losses) == 1
    assert [layer.name for layer in model.layers[1:]] == ["T_conv", "T_bn", "T_relu"]
    assert conv.count_params() == 10 * 6 + 6


def test_batch_norm_defaults_and_gin_settings():
    bn = blocks.batch_norm(name="bn")
    assert (bn.momentum, bn.epsilon, bn.synchronized) == (0.99, 1e-3, False)
    gin.parse_config("trainer.blocks.batch_norm.momentum = 0.9")
    bn = blocks.batch_norm(name="bn")
    assert (bn.momentum, bn.synchronized) == (0.9, False)
    with blocks.synchronized_batch_norm(True):  # The strategy's setting, applied while the trainer builds.
        assert blocks.batch_norm(name="bn").synchronized
    assert not blocks.batch_norm(name="bn").synchronized


def test_conv_activation_and_preactivation_order():
    x = _image()
    plain = keras.Model(x, blocks.conv(x, name="c", filters=4, activation=None))
    assert [layer.name for layer in plain.layers[1:]] == ["c_conv", "c_bn"]
    pre = keras.Model(x, blocks.conv(x, name="p", filters=4, preact=True, activation="swish"))
    assert [layer.name for layer in pre.layers[1:]] == ["p_bn", "p_swish", "p_conv"]


def test_dense_unit_concatenates_input_and_two_sepconvs():
    x = _image(channels=5)
    out = blocks.dense_unit(x, name="d", filters=7)
    assert tuple(out.shape[1:]) == (8, 8, 12)
    layers = _layers(out, x)
    assert {"d_a_sepconv", "d_b_sepconv", "d_concat"} <= set(layers)
    # sepconv(5->7): 45 + 35 + 7, BN 28; sepconv(7->7): 63 + 49 + 7, BN 28.
    assert sum(layer.count_params() for layer in layers.values()) == 87 + 28 + 119 + 28


def test_dense_unit_with_bottleneck_is_densenet_b():
    x = _image(channels=16)
    out = blocks.dense_unit(x, name="d", filters=4, conv_kind="conv", bottleneck=8)
    layers = _layers(out, x)
    assert layers["d_a_conv"].kernel_size == (1, 1) and layers["d_a_conv"].filters == 8
    assert layers["d_b_conv"].kernel_size == (3, 3) and layers["d_b_conv"].filters == 4
    assert tuple(out.shape[1:]) == (8, 8, 20)


def test_dense_unit_rejects_unknown_conv_kind():
    with pytest.raises(UserError, match="conv_kind"):
        blocks.dense_unit(_image(), name="d", filters=4, conv_kind="dense")


def test_residual_basic_identity_and_projection_shortcuts():
    x = _image(channels=8)
    same = _layers(blocks.residual_basic(x, name="r", filters=8), x)
    assert "r_proj_conv" not in same and "r_add" in same and "r_out_relu" in same
    x2 = _image(channels=8)
    out = blocks.residual_basic(x2, name="q", filters=16, strides=2)
    assert tuple(out.shape[1:]) == (4, 4, 16)
    proj = _layers(out, x2)["q_proj_conv"]
    assert proj.kernel_size == (1, 1) and proj.strides == (2, 2) and not proj.use_bias


def test_residual_bottleneck_expands_channels():
    x = _image(channels=8)
    out = blocks.residual_bottleneck(x, name="b", filters=4, strides=2)
    assert tuple(out.shape[1:]) == (4, 4, 16)
    layers = _layers(out, x)
    assert [layers[f"b_{p}_conv"].kernel_size for p in "abc"] == [(1, 1), (3, 3), (1, 1)]
    assert "b_proj_conv" in layers


@pytest.mark.parametrize("kind, expected", [
    ("max_pool", (4, 4, 3)), ("avg_pool", (4, 4, 3)),
    ("global_avg_pool", (3,)), ("global_max_pool", (3,)),
])
def test_pooling_shapes(kind, expected):
    out = blocks.KINDS[kind].factory(_image(), name="p")
    assert tuple(out.shape[1:]) == expected


def test_merges_check_shapes():
    a, b, c = _image(channels=2), _image(channels=5), _image(size=4, channels=2)
    assert tuple(blocks.concat([a, b], name="m").shape[1:]) == (8, 8, 7)
    assert tuple(blocks.add([a, _image(channels=2)], name="n").shape[1:]) == (8, 8, 2)
    assert blocks.concat([a], name="one") is a
    with pytest.raises(UserError, match=r"cannot concatenate inputs of shapes \(8, 8, 2\), \(4, 4, 2\)"):
        blocks.concat([a, c], name="bad")
    with pytest.raises(UserError, match="cannot add"):
        blocks.add([a, b], name="bad")


@pytest.mark.parametrize("head, layer", [("dense", "h_dense"), ("conv", "h_head_conv")])
def test_classifier_heads_output_logits(head, layer):
    x = _image(channels=6)
    out = blocks.classifier(x, name="h", units=5, head=head, dropout_rate=0.5)
    assert tuple(out.shape[1:]) == (5,)
    assert layer in _layers(out, x)


def test_conv_kinds_reject_flat_input():
    with pytest.raises(UserError, match="before any global pooling"):
        blocks.conv(keras.Input((4,)), name="c", filters=2)


def test_the_docs_table_of_kinds_is_the_registry():
    """docs/writing_a_network.md §2 is `python -m trainer.models.blocks --markdown`: no kind listed by hand."""
    docs = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                             "writing_a_network.md"), encoding="utf-8").read()
    table = re.search(r"<!-- block kinds: [^>]*-->\n(.*?)<!-- end of block kinds -->", docs, re.S).group(1)
    assert table.strip() == blocks.describe_kinds(markdown=True), "regenerate: python -m trainer.models.blocks " \
        "--markdown"
    assert {line.split("`")[1] for line in table.splitlines()[2:]} == set(blocks.KINDS)


def test_every_kind_is_registered_once_and_gin_configurable():
    assert len(blocks.KINDS) >= 16
    for kind in blocks.KINDS.values():
        assert gin.get_configurable(f"trainer.blocks.{kind.name}")
        assert f"trainer.blocks.{kind.name}" in registry.CONFIGURABLES
    assert [k for k, v in blocks.KINDS.items() if v.multi_input] == ["concat", "add"]


def test_list_prints_every_kind_with_its_arguments():
    result = subprocess.run([sys.executable, "-m", "trainer.models.blocks", "--list"], capture_output=True,
                            text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stderr
    for kind in blocks.KINDS:
        assert f"\n{kind}(" in "\n" + result.stdout
    assert "conv(name: str, filters: int, kernel_size: int = 3" in result.stdout
    assert "cuda" not in result.stderr.lower()  # TensorFlow's start-up lines stay off the console.
    help_result = subprocess.run([sys.executable, "-m", "trainer.models.blocks", "--help"], capture_output=True,
                                 text=True, check=False, timeout=60)
    assert help_result.returncode == 0 and "--list" in help_result.stdout


# --- Ghost BatchNorm (batch_norm.virtual_batch_size) ---------------------------------------------------------


def _bn_pair(virtual_batch_size, channels=4, momentum=0.9):
    """A plain BN and a Ghost BN with the same (non-trivial) gamma, beta and moving statistics."""
    rng = np.random.default_rng(3)
    ghost = blocks.GhostBatchNormalization(virtual_batch_size, momentum=momentum, name="g_bn")
    plain = keras.layers.BatchNormalization(momentum=momentum, name="p_bn")
    weights = [rng.uniform(0.5, 1.5, channels), rng.normal(size=channels), rng.normal(size=channels),
               rng.uniform(0.5, 2.0, channels)]  # gamma, beta, moving mean, moving variance.
    for layer in (ghost, plain):
        layer.build((None, 5, 5, channels))
        layer.set_weights([w.astype("float32") for w in weights])
    return ghost, plain, weights


def _batch(n=8, channels=4):
    return np.random.default_rng(7).normal(2.0, 3.0, (n, 5, 5, channels)).astype("float32")


def test_batch_norm_virtual_batch_size_selects_ghost_batch_norm():
    assert type(blocks.batch_norm(name="bn")) is keras.layers.BatchNormalization
    gin.parse_config("reference/trainer.blocks.batch_norm.virtual_batch_size = 16")
    with gin.config_scope("reference"):
        bn = blocks.batch_norm(name="bn")
    assert isinstance(bn, blocks.GhostBatchNormalization) and bn.virtual_batch_size == 16
    assert (bn.momentum, bn.epsilon) == (0.99, 1e-3)
    assert type(blocks.batch_norm(name="bn")) is keras.layers.BatchNormalization  # Scoped: other networks unchanged.
    with pytest.raises(UserError, match="virtual_batch_size must be None or a positive integer"):
        blocks.batch_norm(name="bn", virtual_batch_size=0)


def test_ghost_bn_with_one_group_is_plain_bn_in_training():
    ghost, plain, _ = _bn_pair(virtual_batch_size=8)
    x = _batch(8)
    np.testing.assert_allclose(ghost(x, training=True), plain(x, training=True), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ghost.moving_mean.numpy(), plain.moving_mean.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ghost.moving_variance.numpy(), plain.moving_variance.numpy(), rtol=1e-6,
                               atol=1e-6)


def test_ghost_bn_normalises_each_half_by_its_own_statistics():
    ghost, plain, weights = _bn_pair(virtual_batch_size=4)
    x = _batch(8)
    x[4:] = x[4:] * 0.2 - 5.0  # Two halves with very different statistics.
    out = ghost(x, training=True).numpy()
    halves, means, variances = [], [], []
    for part in (x[:4], x[4:]):
        plain.set_weights([w.astype("float32") for w in weights])  # Each half from the same starting state.
        halves.append(plain(part, training=True).numpy())
        means.append(part.mean(axis=(0, 1, 2)))
        variances.append(part.var(axis=(0, 1, 2)))
    np.testing.assert_allclose(out, np.concatenate(halves), rtol=1e-4, atol=1e-4)
    # The whole batch's statistics would not do: the halves differ.
    whole = _bn_pair(virtual_batch_size=8)[1](x, training=True).numpy()
    assert not np.allclose(out, whole, atol=1e-2)
    # Moving statistics: momentum 0.9 towards the mean of the two halves' means and variances.
    np.testing.assert_allclose(ghost.moving_mean.numpy(), 0.9 * weights[2] + 0.1 * np.mean(means, axis=0),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ghost.moving_variance.numpy(), 0.9 * weights[3] + 0.1 * np.mean(variances, axis=0),
                               rtol=1e-4, atol=1e-4)


def test_ghost_bn_in_inference_is_plain_bn_with_the_moving_statistics():
    ghost, plain, weights = _bn_pair(virtual_batch_size=2)
    x = _batch(6)
    np.testing.assert_allclose(ghost(x, training=False), plain(x, training=False), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ghost(x[:3]), plain(x[:3]), rtol=1e-6, atol=1e-6)  # Any batch size.
    np.testing.assert_allclose(ghost.moving_mean.numpy(), weights[2].astype("float32"))  # Not updated.


def test_ghost_bn_rejects_a_batch_that_is_not_a_multiple_naming_the_block():
    x = keras.Input((5, 5, 4), batch_size=12)
    gin.parse_config("trainer.blocks.batch_norm.virtual_batch_size = 8")
    model = keras.Model(x, blocks.conv(x, name="res1a_a", filters=4))
    with pytest.raises(UserError, match=r"block 'res1a_a'.*12 images, not a multiple of 8"):
        model(np.zeros((12, 5, 5, 4), "float32"), training=True)


def test_ghost_bn_get_config_round_trip():
    layer = blocks.GhostBatchNormalization(16, momentum=0.9, epsilon=1e-5, name="g_bn")
    config = layer.get_config()
    assert config["virtual_batch_size"] == 16 and config["momentum"] == 0.9 and config["epsilon"] == 1e-5
    copy = blocks.GhostBatchNormalization.from_config(config)
    assert copy.get_config() == config
    assert keras.saving.get_registered_name(blocks.GhostBatchNormalization) == "trainer>GhostBatchNormalization"


def test_a_model_with_ghost_bn_saves_and_loads_as_keras(tmp_path):
    gin.parse_config("trainer.blocks.batch_norm.virtual_batch_size = 4")
    x = _image(channels=3)
    model = keras.Model(x, blocks.classifier(blocks.conv(x, name="c", filters=4), name="h", units=3))
    images = np.random.default_rng(0).normal(1.0, 2.0, (8, 8, 8, 3)).astype("float32")
    model(images, training=True)  # Moves the moving statistics away from their initial values.
    path = str(tmp_path / "model.keras")
    model.save(path)
    gin.clear_config()
    loaded = keras.models.load_model(path)
    layer = loaded.get_layer("c_bn")
    assert isinstance(layer, blocks.GhostBatchNormalization) and layer.virtual_batch_size == 4
    np.testing.assert_allclose(loaded(images, training=False), model(images, training=False), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loaded(images, training=True), model(images, training=True), rtol=1e-5, atol=1e-5)
