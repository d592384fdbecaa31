"""Precise BatchNorm, the collapsed-evaluation warning, and the shipped networks learning in one short epoch."""

import os
import re
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import helpers
from trainer import steps
from trainer.data import synthetic

REPO = helpers.REPO
NETWORKS = sorted(f[:-4] for f in os.listdir(os.path.join(REPO, "gin", "models")) if f.endswith(".gin"))
# The networks the 1-epoch test trains: every shipped one with TRAINER_ALL_NETWORKS=1 (about 3 minutes more on
# 2 cores: reference and densenet_bc take 80-90 s each in the suite, most of densenet_bc's in tracing); by default
# small (the quickstart's) and resnet18 (which collapsed before precise BN). reference and densenet_bc are built,
# counted and given a training step in every run (test_model_declarations.py, test_recipes.py), as big
# declarations are.
TRAINED = NETWORKS if os.environ.get("TRAINER_ALL_NETWORKS") == "1" else ["resnet18", "small"]
# Width divisors that keep the 1-epoch test of every shipped network near 2 minutes on 2 CPU cores: every
# 'filters' of the declaration (and densenet_bc's bottleneck) divided by this; depth and wiring unchanged.
WIDTH_DIVISOR = {"small": 1, "resnet18": 4, "densenet_bc": 4, "reference": 8}


def _bn_model():
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.Conv2D(5, 1, name="conv")(inputs)
    x = keras.layers.BatchNormalization(momentum=0.99, name="bn")(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))


def test_precise_bn_sets_the_statistics_of_all_the_batches_together():
    keras.utils.set_random_seed(0)
    model = _bn_model()
    [bn] = steps.batch_norm_layers(model)
    images = tf.random.normal([6, 8, 4, 4, 3], mean=3.0, stddev=2.0, seed=1)  # 6 batches of 8.
    strategy = tf.distribute.get_strategy()
    data = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((images, tf.zeros([6, 8, 2]))))
    kernel_before = model.get_layer("conv").kernel.numpy()
    steps.PreciseBatchNorm(strategy, model, 6)(iter(data))
    features = model.get_layer("conv")(tf.reshape(images, [-1, 4, 4, 3])).numpy().reshape(-1, 5)
    np.testing.assert_allclose(bn.moving_mean.numpy(), features.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn.moving_variance.numpy(), features.var(0), rtol=1e-3, atol=1e-4)
    assert bn.momentum == 0.99  # Restored.
    np.testing.assert_array_equal(model.get_layer("conv").kernel.numpy(), kernel_before)  # No weight changes.


def test_precise_bn_auto_is_on_when_an_epoch_is_too_short_for_the_momentum():
    model = _bn_model()
    on, why = steps.precise_bn_decision("auto", model, 46)  # 0.99 ** 46 = 63% left from before the epoch.
    assert on and "63%" in why
    assert not steps.precise_bn_decision("auto", model, 400)[0]  # 0.99 ** 400 = 1.8%.
    assert steps.precise_bn_decision(True, model, 400)[0] and not steps.precise_bn_decision(False, model, 46)[0]


def test_reference_recipe_files_turn_precise_bn_off():
    for name in ("phase32", "phase64", "phase64_aug"):
        text = open(os.path.join(REPO, "gin", f"{name}.gin"), encoding="utf-8").read()
        assert re.search(r"^trainer\.train\.precise_bn = False$", text, re.M), name


def test_collapse_is_one_class_or_a_val_loss_many_times_the_train_loss():
    totals = [279.5 * 500, 50, 250, 500] + [500] + [0] * 9  # Every image predicted as class 0.
    assert "100% of the images predicted as class 0" in steps.collapse(totals, 1.8)
    assert "155x the training loss" in steps.collapse(totals, 1.8)
    healthy = [1.0 * 500, 280, 490, 500] + [50] * 10
    assert steps.collapse(healthy, 0.9) is None
    assert steps.collapse([0.5 * 100, 90, 100, 100] + [50, 50], 0.01) is None  # Overfit, not collapsed.
    line = steps.collapse_warning("x", precise_bn=False)
    assert "\n" not in line and "trainer.train.precise_bn = True" in line


@pytest.mark.slow
def test_a_collapsed_evaluation_is_one_warning_line_at_the_epoch_end_and_atop_report_md(train_base_gin, tmp_path,
                                                                                        caplog):
    """BatchNorm statistics that barely move in 15 steps (momentum 0.9999, no precise BN): one class wins."""
    caplog.set_level("INFO")
    caplog.set_level("INFO", logger="absl")
    helpers.train_in_process(train_base_gin, tmp_path, "trainer.train.precise_bn = False",
                             "small/trainer.blocks.batch_norm.momentum = 0.9999", "trainer.train.evaluate_best = True")
    warnings = [r.getMessage() for r in caplog.records if "Collapsed evaluation" in r.getMessage()]
    assert len(warnings) == 2, caplog.text  # The epoch's end, then the evaluation of best/.
    assert "\n" not in warnings[0] and "trainer.train.precise_bn = True" in warnings[0]
    [report] = tmp_path.glob("eval/best-*/report.md")
    lines = report.read_text().splitlines()
    assert lines[0].startswith("# Evaluation") and lines[2].startswith("**Warning: Collapsed evaluation:")


@pytest.fixture(scope="module")
def quickstart_like_dir(tmp_path_factory):
    """The quickstart's dataset at half the size: 10 classes x 150 training images, 30 val images a class."""
    out = tmp_path_factory.mktemp("quickstart_like") / "tiny-imagenet-200"
    return synthetic.write_synthetic(str(out), num_classes=10, per_class=150, val_per_class=30, test_images=5)


def _reduced_model_file(name, tmp_path):
    """gin/models/<name>.gin with every width divided by WIDTH_DIVISOR[name] (NUM_CLASSES untouched)."""
    divisor = WIDTH_DIVISOR[name]
    text = open(os.path.join(REPO, "gin", "models", f"{name}.gin"), encoding="utf-8").read()
    text = re.sub(r"('filters': )(\d+)", lambda m: f"{m[1]}{max(2, int(m[2]) // divisor)}", text)
    text = re.sub(r"(bottleneck = )(\d+)", lambda m: f"{m[1]}{max(2, int(m[2]) // divisor)}", text)
    path = tmp_path / f"{name}.gin"
    path.write_text(text)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("network", TRAINED)
def test_each_shipped_network_learns_in_one_short_epoch(network, quickstart_like_dir, tmp_path, caplog):
    """The quickstart's settings, one epoch of 46 steps: every network ends well above chance (10%).

    Measured on 2 shared CPU cores: small 11 s, resnet18 44 s, reference 140 s, densenet_bc 130 s (most of it
    tracing the deep graphs, which a narrower network does not shorten).

    Before precise BN, resnet18 ended at 10% (every image one class): BatchNorm's momentum 0.99 cannot
    settle in 46 steps.
    """
    caplog.set_level("INFO")
    caplog.set_level("INFO", logger="absl")
    gin_file = tmp_path / "run.gin"
    gin_file.write_text(f"""
include 'gin/quickstart.gin'
include '{_reduced_model_file(network, tmp_path)}'
DATA_DIR = '{quickstart_like_dir}'
BATCH_SIZE = 32
EPOCHS = 1
trainer.data.synthetic_if_missing = False
trainer.train.export = False
trainer.train.evaluate_best = False
trainer.train.scan_data = False
trainer.train.check_memory = False
""")
    start = time.time()
    best = helpers.train_in_process(str(gin_file), tmp_path / "run")
    print(f"{network} (width / {WIDTH_DIVISOR[network]}): val top-1 {best['val_top1']:.3f} in "
          f"{time.time() - start:.0f} s")
    assert "Precise BatchNorm: on" in caplog.text or network == "small"  # small's momentum is 0.9.
    assert best["val_top1"] > 0.2, best  # Measured: 0.33 small, 0.45 resnet18, 0.45 densenet_bc, 0.28 reference.
    assert "Collapsed evaluation" not in caplog.text
