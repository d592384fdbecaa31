"""The trainer (trainer/train.py) on the small network and the synthetic dataset.

In-process where only the numbers matter; `python -m trainer.main` in a
subprocess where process behaviour does (SIGTERM, a second process).
SIGKILL is in test_kills.py, multi-replica strategies in test_strategy.py.
"""

import csv
import glob
import os
import re
import signal
import socket
import subprocess
import sys

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import checkpoints, config, optim, steps, summaries
from trainer.errors import UserError

from helpers import (AUGMENT, STEPS_PER_EPOCH, checkpoint_step, event_files, latest_step, main_command, run_until,
                     scalars, train_in_process)


# --- Optimizer, loss, metrics ----------------------------------------------------


def test_optimizers_and_schedules_are_gin_configurables():
    adam = optim.adam(optim.constant(10, 5))
    assert isinstance(adam, keras.optimizers.Adam) and adam.epsilon == 1e-8
    assert float(adam.learning_rate.numpy()) == pytest.approx(1e-3)
    adamw = optim.adamw(1e-3, weight_decay=0.05)
    assert isinstance(adamw, keras.optimizers.AdamW) and adamw.weight_decay == pytest.approx(0.05)
    schedule = optim.cosine(10, 5, learning_rate=0.4, warmup_epochs=1, end_fraction=0.1)
    sgd = optim.sgd(schedule, momentum=0.8, nesterov=True)
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.momentum == 0.8 and sgd.nesterov
    values = [float(schedule(s)) for s in (0, 5, 10, 30, 50)]
    assert values[0] == 0.0 and values[1] == pytest.approx(0.2) and values[2] == pytest.approx(0.4)
    assert 0.04 < values[3] < 0.4 and values[4] == pytest.approx(0.04)  # Cosine down to 10% of the peak.
    step = optim.step(10, 5, learning_rate=0.1, boundaries=(1, 3), factor=0.5)
    assert [float(step(s)) for s in (0, 9, 10, 29, 30)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    exponential = optim.exponential(10, 5, learning_rate=1.0, decay_per_epoch=0.5)
    assert [float(exponential(s)) for s in (0, 10, 20)] == pytest.approx([1.0, 0.5, 0.25])
    with pytest.raises(UserError, match="positive number"):
        optim.constant(10, 5, learning_rate=-1)
    with pytest.raises(UserError, match="increasing positive epochs"):
        optim.step(10, 5, boundaries=(3, 1))
    gin.parse_config("trainer.train.optimizer = @trainer.optim.sgd\ntrainer.optim.sgd.momentum = 0.5")
    assert gin.query_parameter("trainer.optim.sgd.momentum") == 0.5


def test_class_weighted_cross_entropy():
    labels, logits = tf.one_hot([0, 1], 2), tf.constant([[2.0, 0.0], [0.0, 1.0]])
    plain = optim.cross_entropy(2)(labels, logits).numpy()
    weighted = optim.cross_entropy(2, class_weights=[1.0, 3.0])(labels, logits).numpy()
    np.testing.assert_allclose(weighted, plain * [1.0, 3.0], rtol=1e-6)
    np.testing.assert_allclose(optim.cross_entropy(2, class_weights=[1.0, 3.0])(labels, logits, training=False),
                               plain, rtol=1e-6)  # Validation loss stays the plain one.
    with pytest.raises(UserError, match="3 weights for 2 classes"):
        optim.cross_entropy(2, class_weights=[1.0, 1.0, 1.0])


def test_class_weights_from_a_previous_runs_report(tmp_path):
    report = tmp_path / "report.json"
    report.write_text('{"per_class": [{"index": 1, "accuracy": 1.0}, {"index": 0, "accuracy": 0.0}]}')
    assert optim.weights_from_report(str(report), 2) == pytest.approx([4 / 3, 2 / 3])  # Mean 1.
    labels, logits = tf.one_hot([0, 1], 2), tf.constant([[2.0, 0.0], [0.0, 1.0]])
    plain = optim.cross_entropy(2)(labels, logits).numpy()
    np.testing.assert_allclose(optim.cross_entropy(2, class_weights=str(report))(labels, logits),
                               plain * [4 / 3, 2 / 3], rtol=1e-6)
    with pytest.raises(UserError, match="for 2 classes; this dataset has 3"):
        optim.weights_from_report(str(report), 3)
    with pytest.raises(UserError, match="could not read its per-class accuracy"):
        optim.weights_from_report(str(tmp_path / "none.json"), 2)


def test_step_minimises_mean_loss_plus_l2_with_label_smoothing_and_ignores_padding():
    """One `train_steps` call equals a hand-computed SGD step on mean smoothed cross-entropy + L2."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, kernel_regularizer=keras.regularizers.L2(0.1))(inputs))
    optimizer = keras.optimizers.SGD(0.5)
    optimizer.build(model.trainable_variables)
    step = tf.Variable(0, dtype=tf.int64)
    images = tf.random.normal([4, 4], seed=1)
    labels = tf.one_hot([0, 1, 2, 1], 3)
    before = [w.numpy() for w in model.trainable_variables]
    with tf.GradientTape() as tape:
        cross_entropy = keras.losses.categorical_crossentropy(labels, model(images), from_logits=True,
                                                              label_smoothing=0.2)
        loss = tf.reduce_mean(cross_entropy) + tf.add_n(model.losses)
    expected = [w - 0.5 * g.numpy() for w, g in zip(before, tape.gradient(loss, model.trainable_variables))]

    strategy = tf.distribute.get_strategy()
    train_steps, evaluate = steps.build_steps(strategy, model, optimizer, step, batch_size=4, num_classes=3,
                                                  per_example_loss=optim.cross_entropy(3, label_smoothing=0.2))
    data = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors((images, labels)).repeat())
    totals = train_steps(iter(data), tf.constant(1)).numpy()
    assert int(step.numpy()) == 1
    assert totals[0] == pytest.approx(float(tf.reduce_sum(cross_entropy)), rel=1e-5)
    assert totals[3] == 4
    for got, want in zip(model.trainable_variables, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)

    padded = tf.concat([labels[:3], tf.zeros([1, 3])], axis=0)  # The last row is evaluation padding.
    totals = evaluate(strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors((images, padded)))).numpy()
    logits = model(images)
    hits = tf.equal(tf.argmax(logits[:3], -1), tf.argmax(labels[:3], -1))
    assert totals[3] == 3 and totals[1] == int(tf.reduce_sum(tf.cast(hits, tf.int32)))
    assert totals[0] == pytest.approx(float(tf.reduce_sum(keras.losses.categorical_crossentropy(
        labels[:3], logits[:3], from_logits=True))), rel=1e-5)


def test_progress_is_a_bar_with_eta_on_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    progress = summaries.Progress(3, 10, steps=10, batch_size=20, log_every_steps=5)
    progress.update(5, {"loss": 1.5, "top1": 0.25}, images_per_second=100.0)
    assert capsys.readouterr().out == ("\r[===============               ] "
                                       "epoch 3/10 step 5/10 loss 1.5000 top1 0.2500 100 img/s ETA 1s\x1b[K")
    progress.update(6, {"loss": 1.5, "top1": 0.25}, images_per_second=None)  # The call that compiled.
    assert "compiling" in capsys.readouterr().out


def test_three_classes_say_top3_not_top5(caplog):
    """With fewer than 5 classes the 'top5' metric is top-k, k = classes: the lines say so, as evaluate's do."""
    means = {"loss": 1.0, "top1": 0.5, "top5": 1.0, "count": 18}
    with caplog.at_level("INFO"):
        summaries.Progress(1, 2, steps=2, batch_size=8, log_every_steps=1, top_k=3).finish(means, means, 0.4)
        summaries.end_summary("/tmp/run", {"epoch": 1, "val_top1": 0.5, "val_top5": 1.0, "step": 2}, None, top_k=3)
    assert "top1 0.5000 top3 1.0000 (18 images)" in caplog.text
    assert "Best epoch 1: val top-1 0.5000, top-3 1.0000 (step 2)." in caplog.text
    assert "top5" not in caplog.text and "top-5" not in caplog.text


# --- Phases ---------------------------------------------------------------------


def _small_weights(num_classes, image_size=32):
    gin.clear_config()
    config.parse_gin(["gin/models/small.gin"], [f"NUM_CLASSES = {num_classes}"])
    from trainer.models import builder  # pylint: disable=import-outside-toplevel
    return checkpoints.weights_by_path(builder.build_network(image_size))


def test_partial_init_is_refused_unless_allowed(tmp_path):
    source = _small_weights(5)
    tf.train.Checkpoint(weights=source).save(str(tmp_path / "checkpoints" / "ckpt"))
    target = _small_weights(6)  # Another head width: head/kernel and head/bias do not fit.
    with pytest.raises(UserError, match=r"(?s)2 of another shape.*head.*allow_partial_init = True"):
        checkpoints.transfer_weights(target, str(tmp_path))
    report = checkpoints.transfer_weights(target, str(tmp_path), allow_partial=True)
    assert f"{len(target) - 2} of {len(target)} variables restored" in report
    np.testing.assert_array_equal(target["stem_conv/kernel"].numpy(), source["stem_conv/kernel"].numpy())


@pytest.mark.slow
def test_phase_32_then_64_carries_weights(train_base_gin, tmp_path):
    """A 64 px phase started from the 32 px phase's weights is far ahead of one started from scratch."""
    phase32 = train_in_process(train_base_gin, tmp_path / "p32", "EPOCHS = 8")
    assert phase32["val_top1"] > 0.7, phase32  # Chance: 0.2.
    phase64 = train_in_process(train_base_gin, tmp_path / "p64", "IMAGE_SIZE = 64", "trainer.train.first_epoch = 9",
                               f"trainer.train.init_from = '{tmp_path / 'p32'}'",
                               "trainer.train.previous_phase = 'p32.gin'")
    scratch = train_in_process(train_base_gin, tmp_path / "scratch64", "IMAGE_SIZE = 64")
    assert phase64["val_top1"] > 0.55 and phase64["val_top1"] > scratch["val_top1"] + 0.2, (phase64, scratch)

    [val_events] = event_files(tmp_path / "p64", "val")
    top1 = dict(scalars(val_events, "top1"))
    end32 = 8 * STEPS_PER_EPOCH  # Phase 64 continues phase 32's step axis.
    assert sorted(top1) == [end32, end32 + STEPS_PER_EPOCH]  # The carried weights are evaluated first.
    assert top1[end32 + STEPS_PER_EPOCH] == pytest.approx(phase64["val_top1"])
    with open(tmp_path / "p64" / "metrics.csv", encoding="utf-8") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["9"]
    [train_events] = event_files(tmp_path / "p32", "train")  # 5 steps per tf.function call.
    assert [s for s, _ in scalars(train_events, "loss")] == list(range(5, 8 * STEPS_PER_EPOCH + 1, 5))


# --- Failures -------------------------------------------------------------------


@pytest.mark.slow
def test_missing_previous_phase_is_named_before_anything_is_written(train_base_gin, tmp_path):
    with pytest.raises(UserError, match=r"Run the previous phase first: python -m trainer.main "
                                        r"--gin_file=gin/phase32\.gin"):
        train_in_process(train_base_gin, tmp_path / "run", f"trainer.train.init_from = '{tmp_path / 'none'}'",
                         "trainer.train.previous_phase = 'gin/phase32.gin'")
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(train_base_gin, tmp_path):
    train_in_process(train_base_gin, tmp_path / "run")
    assert latest_step(tmp_path / "run") == STEPS_PER_EPOCH
    # Resumed with a learning rate that blows up: gin's rate replaces the checkpoint's.
    with pytest.raises(UserError, match=r"loss became nan \(not finite\) in steps 16-20.*ckpt-15"):
        train_in_process(train_base_gin, tmp_path / "run", "EPOCHS = 2",
                         "trainer.optim.constant.learning_rate = 1e30")
    assert [os.path.basename(p) for p in glob.glob(str(tmp_path / "run" / "checkpoints" / "*.index"))] == [
        "ckpt-15.index"]
    reader = tf.train.load_checkpoint(str(tmp_path / "run" / "checkpoints" / "ckpt-15"))
    assert all(np.all(np.isfinite(reader.get_tensor(k))) for k in reader.get_variable_to_shape_map()
               if k.startswith("weights/"))
    assert not os.path.exists(tmp_path / "run" / "LOCK")


@pytest.mark.slow
def test_resuming_a_model_dir_of_another_network_is_a_user_error(train_base_gin, tmp_path):
    train_in_process(train_base_gin, tmp_path / "run")
    wider = "trainer.network.blocks = [{'name': 'stem', 'kind': 'conv', 'filters': 8}, " \
            "{'name': 'head', 'kind': 'classifier', 'units': %NUM_CLASSES}]"
    with pytest.raises(UserError, match=r"Cannot resume .* with other settings \(trainer.network.blocks .*--model_dir"):
        train_in_process(train_base_gin, tmp_path / "run", "EPOCHS = 2", wider)


@pytest.mark.slow
def test_batch_that_does_not_split_over_replicas_is_a_user_error(train_base_gin, tmp_path):
    command = main_command(train_base_gin, tmp_path / "run", "BATCH_SIZE = 21")
    returncode, log = run_until(command + ["--gin_file=gin/strategy/mirrored_cpu.gin"])
    assert returncode == 1 and "Traceback" not in log, log[-2000:]
    assert "BATCH_SIZE 21 does not split evenly over 2 replicas: use a multiple of 2, e.g. 20 or 22." in log


@pytest.mark.slow
def test_lock_refuses_a_live_run_and_takes_over_a_stale_one(train_base_gin, tmp_path):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (model_dir / "LOCK").write_text(f"{socket.gethostname()} {sleeper.pid}")
        with pytest.raises(UserError, match=rf"in use by another run .*{sleeper.pid}"):
            train_in_process(train_base_gin, model_dir)
        assert (model_dir / "LOCK").read_text() == f"{socket.gethostname()} {sleeper.pid}"
    finally:
        sleeper.kill()
        sleeper.wait()
    # The same lock, its process gone: taken over, and released at the end.
    train_in_process(train_base_gin, model_dir, stop_after_steps=5)
    assert latest_step(model_dir) == 5
    assert not os.path.exists(model_dir / "LOCK")


@pytest.mark.slow
def test_mixed_precision_and_xla_switches(train_base_gin, tmp_path):
    train_in_process(train_base_gin, tmp_path / "mixed", "trainer.train.mixed_precision = 'mixed_float16'",
                     stop_after_steps=5)
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(tmp_path / "mixed" / "checkpoints")))
    assert "optimizer/dynamic_scale/.ATTRIBUTES/VARIABLE_VALUE" in reader.get_variable_to_shape_map()
    assert keras.mixed_precision.global_policy().name == "float32"  # Restored after the run.
    train_in_process(train_base_gin, tmp_path / "xla", "trainer.train.jit_compile = True", stop_after_steps=5)
    [events] = event_files(tmp_path / "xla", "train")
    [(step, loss)] = scalars(events, "loss")
    assert step == 5 and np.isfinite(loss)


# --- Whole runs of `python -m trainer.main` ------------------------------------------

@pytest.mark.slow
def test_sigterm_then_rerun_resumes_to_the_same_step(train_base_gin, tmp_path):
    """SIGTERM mid-epoch checkpoints and stops; the same command resumes there. (SIGKILL: test_kills.py.)"""
    model_dir = tmp_path / "run"
    command = main_command(train_base_gin, model_dir, "EPOCHS = 2", "trainer.train.steps_per_execution = 1",
                           "trainer.train.checkpoint_every_steps = 4", AUGMENT)

    # SIGTERM mid-epoch 1: the run checkpoints where it is and stops with one error line.
    returncode, log = run_until(command, r"epoch 1/2 step 6/15 ", signal.SIGTERM)
    assert returncode == 128 + signal.SIGTERM, log[-3000:]  # The shell's convention for a signal.
    stopped = int(re.search(r"stopped: SIGTERM at step (\d+) \(epoch 1\), after a checkpoint", log).group(1))
    assert 6 <= stopped < STEPS_PER_EPOCH and "Traceback" not in log
    assert latest_step(model_dir) == stopped and not os.path.exists(model_dir / "LOCK")

    # The same command again: resumes at that step and ends where an uninterrupted run ends.
    before = set(event_files(model_dir, "train"))
    returncode, log = run_until(command)
    assert returncode == 0, log[-3000:]
    assert f"resumes {model_dir}" in log and f"at step {stopped} (epoch 1)" in log
    assert latest_step(model_dir) == 2 * STEPS_PER_EPOCH and not os.path.exists(model_dir / "LOCK")
    [rerun_events] = set(event_files(model_dir, "train")) - before
    steps = [s for s, _ in scalars(rerun_events, "loss")]
    assert steps == list(range(stopped + 1, 2 * STEPS_PER_EPOCH + 1))  # Continues; does not restart at 0.


# --- Schedules and early stopping in a run ---------------------------------------------


def test_plateau_lowers_the_rate_after_patience_epochs():
    plateau = optim.reduce_on_plateau(10, 5, learning_rate=1.0, metric="val_loss", factor=0.5, patience=2,
                                      min_delta=0.0, cooldown=1)
    rates = [plateau.update({"val_loss": loss}) for loss in (3.0, 2.0, 2.5, 2.1, 2.2, 2.3, 2.4, 1.0, 1.5, 1.6)]
    # Improves twice, waits 1, 2 -> halve; the cooldown epoch ends, waits 1, 2 -> halve; cooldown; improves;
    # waits 1, 2 -> halve (keras.callbacks.ReduceLROnPlateau's rules).
    assert rates == [1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 0.125]
    with pytest.raises(UserError, match="metric is 'val_acc'"):
        optim.reduce_on_plateau(10, 5, metric="val_acc").update({"val_loss": 1.0})


PLATEAU = ("trainer.train.schedule = @trainer.optim.reduce_on_plateau",
           "trainer.optim.reduce_on_plateau.patience = 2", "trainer.optim.reduce_on_plateau.factor = 0.5",
           "trainer.optim.reduce_on_plateau.min_delta = 100.0", "EPOCHS = 6")


def _csv_column(model_dir, name):
    with open(os.path.join(str(model_dir), "metrics.csv"), encoding="utf-8") as f:
        return [float(row[name]) for row in csv.DictReader(f)]


@pytest.mark.slow
def test_reduce_on_plateau_resumes_mid_plateau(train_base_gin, tmp_path):
    """The plateau's state is in the checkpoint: a run stopped mid-plateau and resumed drops the rate on time."""
    train_in_process(train_base_gin, tmp_path / "whole", *PLATEAU)
    expected = [1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4]  # Only epoch 1 improves by min_delta (on infinity).
    assert _csv_column(tmp_path / "whole", "learning_rate") == pytest.approx(expected)
    train_in_process(train_base_gin, tmp_path / "resumed", *PLATEAU, stop_after_steps=2 * STEPS_PER_EPOCH)
    assert _csv_column(tmp_path / "resumed", "learning_rate") == pytest.approx(expected[:2])
    keras.backend.clear_session()
    train_in_process(train_base_gin, tmp_path / "resumed", *PLATEAU)
    assert _csv_column(tmp_path / "resumed", "learning_rate") == pytest.approx(expected)


@pytest.mark.slow
def test_early_stopping_and_the_metric_that_picks_the_best(train_base_gin, tmp_path):
    best = train_in_process(train_base_gin, tmp_path / "run", "EPOCHS = 6", "trainer.train.early_stopping_patience = 2",
                            "trainer.optim.constant.learning_rate = 1e-12")  # Nothing improves after epoch 1.
    assert _csv_column(tmp_path / "run", "epoch") == [1, 2, 3] and best["epoch"] == 1
    assert checkpoint_step(tf.train.latest_checkpoint(str(tmp_path / "run" / "best"))) == STEPS_PER_EPOCH
    by_loss = train_in_process(train_base_gin, tmp_path / "loss", "EPOCHS = 3",
                               "trainer.train.select_best_by = 'val_loss'")
    losses = _csv_column(tmp_path / "loss", "val_loss")
    assert by_loss["val_loss"] == pytest.approx(min(losses), abs=1e-6)


@pytest.mark.slow
def test_same_command_twice_gives_bit_identical_weights(train_base_gin, tmp_path):
    """SEED seeds weights, data order and augmentation; deterministic_ops makes TensorFlow's kernels repeatable."""
    bindings = ("trainer.train.deterministic_ops = True", AUGMENT)
    weights = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        if name == "a":  # A new process; "b" in this one, which has run other tests before: two processes.
            returncode, log = run_until(main_command(train_base_gin, tmp_path / name, *bindings, f"SEED = {seed}"))
            assert returncode == 0, log[-3000:]
        else:
            train_in_process(train_base_gin, tmp_path / name, *bindings, f"SEED = {seed}")
        reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(tmp_path / name / "checkpoints")))
        weights.append({k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
                        if k.startswith("weights/")})
    assert len(weights[0]) > 20 and weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        np.testing.assert_array_equal(weights[0][key], weights[1][key], err_msg=key)
    [stem] = [k for k in weights[0] if "stem_conv" in k and "kernel" in k]
    assert not np.array_equal(weights[0][stem], weights[2][stem])  # Another SEED: other weights.


@pytest.mark.slow
def test_a_phase_starts_adam_afresh_unless_told_to_carry_it(train_base_gin, finished_run, tmp_path):
    first = finished_run()  # The base run, 1 epoch (shared: init_from only reads it).
    for name, carry in (("fresh", False), ("carried", True)):
        keras.backend.clear_session()
        train_in_process(train_base_gin, tmp_path / name, f"trainer.train.init_from = '{first}'",
                         f"trainer.train.carry_optimizer = {carry}")
        reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(tmp_path / name / "checkpoints")))
        iterations = int(reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"))
        assert iterations == (2 if carry else 1) * STEPS_PER_EPOCH, (name, iterations)
