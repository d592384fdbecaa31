"""Tests for trainer/models/builder.py: wiring, dtypes and one-line wiring errors."""

import re

import gin
import keras
import numpy as np
import pytest

from trainer import config
from trainer.errors import UserError
from trainer.models import builder


HEAD = [{"name": "gap", "kind": "global_avg_pool"}, {"name": "fc", "kind": "dense", "units": 3}]


def _build(blocks, image_size=8):
    return builder.build_network(image_size, blocks=blocks)


def test_sequential_default_and_named_inputs_concat_and_add():
    model = _build([
        {"name": "a", "kind": "conv", "filters": 4},
        {"name": "b", "kind": "conv", "filters": 4},
        {"name": "cat", "kind": "conv", "filters": 2, "inputs": ["a", "b", "image"]},
        {"name": "c", "kind": "conv", "filters": 4},
        {"name": "sum", "kind": "conv", "filters": 4, "inputs": ["a", "c"], "merge": "add"},
    ] + HEAD)
    assert model.get_layer("cat_in_concat").output.shape[-1] == 4 + 4 + 3
    assert model.get_layer("sum_in_add").output.shape[-1] == 4
    # 'b' takes 'a' (the previous block) by default.
    assert model.get_layer("b_conv").input is model.get_layer("a_relu").output
    assert model.output_shape == (None, 3)


def test_output_is_float32_logits_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _build([{"name": "a", "kind": "sepconv", "filters": 4}] + HEAD)
        assert model.get_layer("a_sepconv").compute_dtype == "float16"
        assert model.input.dtype == "float32"
        out = model(np.random.rand(2, 8, 8, 3).astype("float32"))
        assert out.dtype == "float32" and tuple(out.shape) == (2, 3)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_declaration_from_gin_with_macro_inside_dicts():
    gin.parse_config("""
        NUM_CLASSES = 7
        trainer.network.name = 'tiny'
        trainer.network.blocks = [
            {'name': 'stem', 'kind': 'conv', 'filters': 4},
            {'name': 'head', 'kind': 'classifier', 'units': %NUM_CLASSES},
        ]
    """)
    model = builder.build_network(16)
    assert model.name == "tiny" and model.output_shape == (None, 7)
    assert model.input_shape == (None, 16, 16, 3)


def test_gin_bound_required_argument_counts_as_given():
    gin.parse_config("dropout.rate = 0.25")
    model = _build([{"name": "gap", "kind": "global_avg_pool"}, {"name": "drop", "kind": "dropout"},
                    {"name": "fc", "kind": "dense", "units": 2}])
    assert model.get_layer("drop_dropout").rate == 0.25


@pytest.mark.parametrize("blocks, pattern", [
    ([{"name": "a", "kind": "conv", "filters": 4, "inputs": ["stme"]}],
     r"^Block 'a': unknown input 'stme'; .*"),
    ([{"name": "stem", "kind": "conv", "filters": 4},
      {"name": "b", "kind": "conv", "filters": 4, "inputs": ["stme"]}],
     r"^Block 'b': unknown input 'stme'.* Did you mean 'stem'\?"),
    ([{"name": "a", "kind": "sepconvv", "filters": 4}],
     r"^Block 'a': unknown kind 'sepconvv'\. Did you mean 'sepconv'\?"),
    ([{"name": "a", "kind": "conv", "filters": 4}, {"name": "p", "kind": "max_pool"},
      {"name": "c", "kind": "conv", "filters": 4, "inputs": ["a", "p"]}],
     r"^Block 'c' \(kind 'conv'\): cannot concatenate inputs of shapes \(8, 8, 4\), \(4, 4, 4\)"),
    ([{"name": "a", "kind": "conv", "filters": 4}, {"name": "b", "kind": "conv", "filters": 5},
      {"name": "s", "kind": "add", "inputs": ["a", "b"]}],
     r"^Block 's' \(kind 'add'\): cannot add inputs of shapes \(8, 8, 4\), \(8, 8, 5\)"),
    ([{"name": "a", "kind": "conv", "filters": 4}, {"name": "b", "kind": "conv", "filters": 5},
      {"name": "s", "kind": "conv", "filters": 4, "inputs": ["a", "b"], "merge": "add"}],
     r"^Block 's' \(kind 'conv'\): cannot add inputs"),
    ([{"name": "p1", "kind": "max_pool", "pool_size": 4}, {"name": "p2", "kind": "max_pool", "pool_size": 4}],
     r"^Block 'p2' \(kind 'max_pool'\): the spatial size shrinks below 1"),
    ([{"name": "a", "kind": "conv", "filters": 4, "kernal_size": 5}],
     r"^Block 'a' \(kind 'conv'\): unknown argument 'kernal_size'\. Did you mean 'kernel_size'\?"),
    ([{"name": "a", "kind": "conv"}],
     r"^Block 'a' \(kind 'conv'\): missing required argument 'filters'"),
    ([{"name": "a", "kind": "conv", "filters": 4}, {"name": "a", "kind": "conv", "filters": 4}],
     r"^Block 'a': the name is already used"),
    ([{"name": "a", "kind": "conv", "filters": 4}],
     r"^Block 'a' \(kind 'conv'\) is the last block and outputs shape \(8, 8, 4\)"),
    ([{"name": "a", "kind": "conv", "filters": 4}, {"name": "c", "kind": "concat", "merge": "add"}],
     r"^Block 'c' \(kind 'concat'\): 'merge' does not apply"),
    ([{"name": "a", "kind": "conv", "filters": 4, "inputs": ["image"], "merge": "sum"}],
     r"^Block 'a' \(kind 'conv'\): 'merge' must be one of 'concat', 'add', got 'sum'"),
    ([{"name": "d", "kind": "dense_unit", "filters": 4}, {"name": "d_a", "kind": "sepconv", "filters": 4}] + HEAD,
     r"^Block 'd_a': its layer name 'd_a_sepconv' is also used by another block"),
    ([{"name": "a", "kind": "conv", "filters": 4}, {"name": "b", "kind": "conv", "filters": 4, "inputs": ["image"]}]
     + HEAD, r"^Block 'a' \(kind 'conv'\): its output is not used: the next block 'b' takes other inputs"),
    ([{"kind": "conv", "filters": 4}], r"^Block #1 of trainer.network.blocks needs a 'name'"),
    ([{"name": "a/b", "kind": "conv", "filters": 4}], r"^Block #1 .* needs a 'name'"),
    ([], r"^trainer.network.blocks must be a non-empty list"),
])
def test_wiring_errors_are_one_line_and_name_the_block(blocks, pattern):
    with pytest.raises(UserError) as err:
        builder.assemble(8, blocks)
    message = str(err.value)
    assert "\n" not in message and "\x1b" not in message
    assert re.search(pattern, message), message


def test_wiring_error_through_gin_starts_with_the_same_line():
    # Gin appends "In call to configurable 'build_network'" on a new line to
    # exceptions raised inside a configurable; the first line is ours.
    config.parse_gin([], ["trainer.network.blocks = [{'name': 'a', 'kind': 'conv', 'filters': 4, "
                          "'inputs': ['stme']}]"])
    with pytest.raises(UserError) as err:
        builder.build_network(8)
    assert str(err.value).splitlines()[0].startswith("Block 'a': unknown input 'stme'")




def test_built_network_round_trips_through_its_config():
    model = _build([{"name": "a", "kind": "sepconv", "filters": 4},
                    {"name": "r", "kind": "residual_basic", "filters": 4, "strides": 2},
                    {"name": "head", "kind": "classifier", "units": 3}])
    clone = keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    images = np.random.rand(2, 8, 8, 3).astype("float32")
    np.testing.assert_allclose(clone(images), model(images), rtol=1e-6)
    assert [layer.name for layer in clone.layers] == [layer.name for layer in model.layers]
