"""Tests for the plan (trainer/models/plan.py and the `python -m trainer.plan` command)."""

import os
import subprocess
import sys

import pytest

from trainer import config
from trainer.errors import UserError
from trainer.models import plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Hand computation, 16 px input:
#   c1   conv 3x3, 3 -> 4             16x16x4  RF 3 = 1 + 2*1, jump 1
#        params 3*3*3*4 + 4 = 112, BN 4*4 = 16 (8 non-trainable)   MACs 16*16*9*3*4 = 27,648
#   p    max_pool 2x2/2               8x8x4    RF 4 = 3 + 1*1, jump 2
#   c2   conv 3x3 dilation 2, 4 -> 8  8x8x8    RF 12 = 4 + (5-1)*2, jump 2
#        params 3*3*4*8 + 8 = 296, BN 32 (16 non-trainable)        MACs 8*8*9*4*8 = 18,432
#   s    sepconv 3x3/2, 8 -> 6        4x4x6    RF 16 = 12 + 2*2, jump 4
#        params 9*8 + 8*6 + 6 = 126, BN 24 (12 non-trainable)      MACs 4*4*(9*8 + 8*6) = 1,920
#   gap  global average pooling       6        RF 16
#   fc   dense 6 -> 5                 5        params 35           MACs 30
CHAIN = [
    {"name": "c1", "kind": "conv", "filters": 4},
    {"name": "p", "kind": "max_pool"},
    {"name": "c2", "kind": "conv", "filters": 8, "dilation_rate": 2},
    {"name": "s", "kind": "sepconv", "filters": 6, "strides": 2},
    {"name": "gap", "kind": "global_avg_pool"},
    {"name": "fc", "kind": "dense", "units": 5},
]


def _rows(result):
    return {row.name: row for row in result.rows}


def test_chain_matches_hand_computation():
    result = plan.make_plan(16, CHAIN)
    rows = _rows(result)
    assert [(rows[n].rf, rows[n].jump, rows[n].stride) for n in ("c1", "p", "c2", "s")] == [
        (3, 1, 1), (4, 2, 2), (12, 2, 1), (16, 4, 2)]
    assert [rows[n].output_shape for n in ("c1", "p", "c2", "s", "gap", "fc")] == [
        (16, 16, 4), (8, 8, 4), (8, 8, 8), (4, 4, 6), (6,), (5,)]
    assert [rows[n].params for n in ("c1", "p", "c2", "s", "gap", "fc")] == [128, 0, 328, 150, 0, 35]
    assert [rows[n].non_trainable for n in ("c1", "c2", "s")] == [8, 16, 12]
    assert [rows[n].macs for n in ("c1", "p", "c2", "s", "gap", "fc")] == [
        27_648, 0, 18_432, 1_920, 0, 30]
    t = result.totals
    assert (t.params, t.trainable, t.non_trainable) == (641, 605, 36)
    assert (t.macs, t.rf, t.image_size) == (48_030, 16, 16)


def test_merge_takes_the_largest_receptive_field():
    # a: 5x5 conv (RF 5); b: 3x3 conv of the image (RF 3); m: 1x1 conv of concat[a, b] (RF 5);
    # q: 3x3 stride-1 average pool (RF 7); r: residual unit, stride 2 (RF 7 + 2 + 2*2 = 13).
    result = plan.make_plan(8, [
        {"name": "a", "kind": "conv", "filters": 2, "kernel_size": 5},
        {"name": "b", "kind": "conv", "filters": 2, "inputs": ["image"]},
        {"name": "m", "kind": "conv", "filters": 2, "kernel_size": 1, "inputs": ["a", "b"]},
        {"name": "q", "kind": "avg_pool", "pool_size": 3, "strides": 1, "padding": "same"},
        {"name": "r", "kind": "residual_basic", "filters": 4, "strides": 2},
        {"name": "gap", "kind": "global_avg_pool"},
    ])
    rows = _rows(result)
    assert [rows[n].rf for n in ("a", "b", "m", "q", "r", "gap")] == [5, 3, 5, 7, 13, 13]
    assert (rows["r"].jump, rows["r"].stride) == (2, 2)
    # m: 1x1 conv on 4 channels: 8*8*4*2 MACs, 4*2 + 2 weights + 8 BN.
    assert (rows["m"].macs, rows["m"].params) == (512, 18)


@pytest.mark.parametrize("image_size, gmacs", [(32, 10.4), (64, 41.5)])
def test_reference_network_facts(image_size, gmacs):
    config.parse_gin(["gin/models/reference.gin"], defaults=["NUM_CLASSES = 200"])
    result = plan.make_plan(image_size)
    t = result.totals
    assert (t.params, t.trainable, t.non_trainable) == (11_178_211, 11_150_739, 27_472)
    assert t.rf == 80
    assert round(t.macs / 1e9, 1) == gmacs
    rows = _rows(result)
    assert rows["T3"].rf == 63  # Before the max-pool.
    assert (rows["pool"].rf, rows["pool"].stride) == (64, 2)
    assert [r.name for r in result.rows if r.stride != 1] == ["pool"]  # One 2x downsampling.
    assert rows["logits"].output_shape == (200,)


def test_plan_text_is_a_markdown_table_with_totals():
    text = plan.plan_text(16, CHAIN)
    lines = text.splitlines()
    assert lines[0].split("|")[1:-1] == [
        " block ", " kind            ", " output  ", " stride ", " jump ", " RF ", " params ",
        "   MACs "]
    assert lines[1].startswith("|---")
    assert "| s     | sepconv         | 4x4x6   |      2 |    4 | 16 |    150 |  1,920 |" in lines
    assert "- Parameters: 641 (trainable 605, non-trainable 36)" in lines
    assert "- MACs per image: 48,030 (48.03 K) at 16x16" in lines
    assert ("- Receptive field at the output: 16 px for a 16 px image "
            "(covers the whole image; 1.00x its side)") in lines


def test_plan_reads_the_gin_declaration_and_image_size():
    assert plan.default_image_size() == 64
    config.parse_gin([], [
        "IMAGE_SIZE = 16", "NUM_CLASSES = 5",
        "trainer.network.blocks = [{'name': 'c', 'kind': 'conv', 'filters': 4},"
        " {'name': 'head', 'kind': 'classifier', 'units': %NUM_CLASSES}]"])
    assert plan.default_image_size() == 16
    result = plan.make_plan(plan.default_image_size())
    assert result.rows[-1].output_shape == (5,) and result.totals.image_size == 16


def test_plan_without_declaration_is_a_user_error():
    with pytest.raises(UserError, match="No network is declared"):
        plan.make_plan(32)


def _run_plan(*args):
    return subprocess.run([sys.executable, "-m", "trainer.plan", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)


def test_command_plans_a_model_file_with_default_num_classes():
    done = _run_plan("--gin_file=gin/models/small.gin", "--image_size=32")
    assert done.returncode == 0, done.stderr
    assert "| head   | classifier | 200      |" in done.stdout
    assert "- Parameters: 61,192 (trainable 60,360, non-trainable 832)" in done.stdout
    assert "at 32x32" in done.stdout


def test_command_reports_a_wiring_error_on_one_line():
    done = _run_plan("--gin_file=gin/models/small.gin",
                     "--gin_bindings=trainer.network.blocks = [{'name': 'a', 'kind': 'convv'}]")
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and errors[0].startswith(
        "error: Block 'a': unknown kind 'convv'. Did you mean 'conv'?")


def test_training_memory_estimate():
    small, large = plan.make_plan(16, CHAIN), plan.make_plan(32, CHAIN)
    c1 = _rows(small)["c1"]
    assert c1.activations % (16 * 16 * 4) == 0 and c1.activations >= 16 * 16 * 4  # conv, BN, ReLU outputs.
    assert _rows(large)["c1"].activations == 4 * c1.activations  # Twice the side: four times the values.
    assert _rows(small)["fc"].activations == 5
    assert small.totals.activations == sum(r.activations for r in small.rows)
    memory = plan.training_memory(small)
    assert memory.per_image == 4 * small.totals.activations  # float32.
    assert memory.fixed == 4 * (small.totals.params + 3 * small.totals.trainable)  # Weights, gradients, Adam's 2.
    assert memory.at(10) == memory.fixed + 10 * memory.per_image
    assert memory.largest_batch(memory.at(7) + memory.per_image // 2) == 7
    assert memory.largest_batch(memory.fixed - 1) == 0


def test_plan_text_warns_when_the_output_is_not_num_classes_logits():
    config.parse_gin([], ["NUM_CLASSES = 7"])
    text = plan.plan_text(16, CHAIN)
    assert "- Output: The network outputs shape (5,) per image (its last block: 'fc') but it must output (7,)" in text
    config.parse_gin([], ["NUM_CLASSES = 5"])
    assert "- Output:" not in plan.plan_text(16, CHAIN)


def test_a_layer_the_plan_cannot_count_is_named_not_counted_as_zero(monkeypatch):
    import keras  # pylint: disable=import-outside-toplevel

    from trainer.models import blocks  # pylint: disable=import-outside-toplevel

    def deconv(x, *, name, filters):  # A user's own block kind: a layer type the plan has no MAC rule for.
        return keras.layers.Conv2DTranspose(filters, 3, padding="same", name=f"{name}_deconv")(x)

    monkeypatch.setitem(blocks.KINDS, "deconv", blocks.Kind("deconv", deconv, deconv, False))
    text = plan.plan_text(16, [CHAIN[0], {"name": "up", "kind": "deconv", "filters": 2}] + CHAIN[4:])
    assert ("- Not counted: the MACs of 1 layer(s) of a type the plan does not know: up_deconv (Conv2DTranspose); "
            "the MACs above leave them out") in text.splitlines()
    assert "Not counted" not in plan.plan_text(16, CHAIN)  # Every layer of the shipped kinds has a rule.
