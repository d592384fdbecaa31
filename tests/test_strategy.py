"""Strategies (trainer/strategy.py) running the one training loop: one device, two logical CPU
devices (MirroredStrategy), two loopback workers (MultiWorkerMirroredStrategy), no TPU."""

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types

import gin
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from helpers import REPO, STEPS_PER_EPOCH, csv_rows, env, main_command
from trainer import config, steps
from trainer import strategy as strategy_lib
from trainer.errors import UserError
from trainer.models import blocks, builder

pytestmark = pytest.mark.slow  # Trains or starts TensorFlow in subprocesses: CI runs these.

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_losses(model_dir):
    """{step: loss} logged to model_dir/train."""
    [path] = glob.glob(os.path.join(str(model_dir), "train", "events.out.tfevents.*"))
    acc = event_accumulator.EventAccumulator(path, size_guidance={"tensors": 0})
    acc.Reload()
    return {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors("loss")}


def test_unknown_strategy_and_options_are_user_errors():
    with pytest.raises(UserError, match=r"'@trainer.strategy.gpu' is not a configurable"):
        config.parse_gin(["gin/strategy/default.gin"], ["trainer.train.strategy = @trainer.strategy.gpu"])
    with pytest.raises(UserError, match="reduction_to_one_device"):
        strategy_lib.mirrored(cross_device_ops="ring")
    tf.config.list_logical_devices()  # TensorFlow has started in this process: too late to split the CPU.
    with pytest.raises(UserError, match="before TensorFlow starts"):
        strategy_lib.mirrored(logical_cpus=3)


def test_a_later_strategy_file_replaces_the_earlier_one_whole():
    config.parse_gin(["gin/strategy/mirrored_cpu.gin", "gin/strategy/default.gin"])
    assert gin.query_parameter("trainer.train.strategy").selector == "trainer.strategy.default"
    config.parse_gin(["gin/strategy/mirrored_cpu.gin", "gin/strategy/mirrored.gin"])
    reference = gin.query_parameter("trainer.train.strategy")
    assert reference.scoped_selector == "mirrored/trainer.strategy.mirrored"
    with gin.config_scope("mirrored"):  # mirrored_cpu.gin's logical CPUs do not reach mirrored.gin's strategy.
        assert "logical_cpus" not in gin.get_bindings("trainer.strategy.mirrored")


def test_tpu_without_a_tpu_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"no TPU could be reached: Please provide a TPU Name"):
        strategy_lib.tpu(address="")
    address = f"grpc://127.0.0.1:{free_port()}"  # Nothing listens there.
    with pytest.raises(UserError, match=r"address = 'grpc://127\.0\.0\.1:\d+'\) but no TPU could be reached"):
        strategy_lib.tpu(address=address)
    # The command line: one error line, no traceback, nothing written.
    result = subprocess.run(
        [sys.executable, "-m", "trainer.main", "--gin_file=gin/quickstart.gin", "--gin_file=gin/strategy/tpu.gin",
         f"--gin_bindings=TPU = '{address}'", f"--gin_bindings=DATA_DIR = '{tmp_path / 'data'}'",
         f"--model_dir={tmp_path / 'run'}"],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    [error] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "no TPU could be reached" in error and "gin/strategy/default.gin" in error
    assert not os.path.exists(tmp_path / "run")


def test_two_mirrored_cpu_replicas_match_one_device(train_base_gin, finished_run, tmp_path):
    """Same global batch, same initial weights, synchronized BatchNorm: the same losses."""
    one_step = "trainer.train.steps_per_execution = 1"
    result = subprocess.run(main_command(train_base_gin, tmp_path / "two", "--gin_file=gin/strategy/mirrored_cpu.gin",
                                         one_step),
                            cwd=REPO, env=env(), capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Strategy:  mirrored (tf.distribute.MirroredStrategy), 2 replicas" in result.stderr
    one_dir = finished_run(one_step)  # The same run on one device, trained in-process (the default strategy).
    one, two = train_losses(one_dir), train_losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, STEPS_PER_EPOCH + 1))
    for step in (1, 2, 3):  # Float rounding only (per-replica BatchNorm statistics differ by ~1e-2).
        assert two[step] == pytest.approx(one[step], abs=1e-5), (step, one[step], two[step])
    for step in one:  # Adam amplifies the rounding a little over the epoch.
        assert two[step] == pytest.approx(one[step], abs=2e-3), (step, one[step], two[step])
    [val_one], [val_two] = csv_rows(one_dir), csv_rows(tmp_path / "two")
    assert float(val_two["val_loss"]) == pytest.approx(float(val_one["val_loss"]), abs=2e-3)
    assert float(val_two["val_top1"]) == pytest.approx(float(val_one["val_top1"]), abs=0.011)  # At most 1 of 100.


def test_xla_with_synchronized_batch_norm_over_replicas_is_refused():
    gin.clear_config()
    try:
        config.parse_gin(["gin/models/small.gin"], ["NUM_CLASSES = 5"])
        with blocks.synchronized_batch_norm(True):
            model = builder.build_network(32)
    finally:
        gin.clear_config()
    two_replicas = types.SimpleNamespace(num_replicas_in_sync=2)
    with pytest.raises(UserError, match="jit_compile = True cannot compile synchronized BatchNorm over 2 replicas"):
        steps.build_steps(two_replicas, model, None, None, 20, 5, jit_compile=True)


def _start_workers(command, model_dir, tag):
    """Two MultiWorkerMirroredStrategy workers on loopback ports; logs in model_dir.<tag>.w<i>.log."""
    ports = [free_port(), free_port()]
    workers = []
    for index in range(2):
        tf_config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                     "task": {"type": "worker", "index": index}}
        log = open(f"{model_dir}.{tag}.w{index}.log", "w", encoding="utf-8")  # pylint: disable=consider-using-with
        workers.append((subprocess.Popen(command, cwd=REPO, env=dict(env(), TF_CONFIG=json.dumps(tf_config)),
                                         stdout=subprocess.DEVNULL, stderr=log), log))
    return workers


def _wait(workers, timeout=300):
    deadline = time.time() + timeout
    try:
        for proc, _ in workers:
            proc.wait(timeout=max(1, deadline - time.time()))
    finally:
        for proc, log in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    return [proc.returncode for proc, _ in workers], [open(log.name, encoding="utf-8").read() for _, log in workers]


def test_two_workers_preempted_then_resumed_end_with_identical_weights(train_base_gin, tmp_path):
    """SIGTERM to one worker: both save at the same step and stop; rerun: both resume and finish in lockstep."""
    model_dir = tmp_path / "run"
    command = main_command(train_base_gin, model_dir, "--gin_file=gin/strategy/multi_worker.gin",
                           "--gin_bindings=EPOCHS = 2",
                           "--gin_bindings=trainer.train.steps_per_execution = 1")
    workers = _start_workers(command, model_dir, "preempted")
    deadline = time.time() + 300
    while time.time() < deadline and workers[1][0].poll() is None:
        with open(workers[1][1].name, encoding="utf-8") as f:
            if "epoch 1/2 step 6/15 " in f.read():
                workers[1][0].send_signal(signal.SIGTERM)
                break
        time.sleep(0.05)
    returncodes, logs = _wait(workers)
    assert returncodes == [128 + signal.SIGTERM] * 2, logs[1][-3000:]
    stopped = {int(re.search(r"stopped: SIGTERM at step (\d+)", log).group(1)) for log in logs}
    assert len(stopped) == 1, stopped  # The same step on both workers.
    [stopped] = stopped
    assert 6 < stopped < 2 * STEPS_PER_EPOCH

    returncodes, logs = _wait(_start_workers(command, model_dir, "resumed"))
    assert returncodes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert all(f"ckpt-{stopped} at step {stopped}" in log for log in logs), logs[0][-2000:]
    chief = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(model_dir / "checkpoints")))
    other = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(model_dir / "workertemp_1" / "checkpoints")))
    assert int(chief.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")) == 2 * STEPS_PER_EPOCH
    names = [k for k in chief.get_variable_to_shape_map() if k.startswith("weights/")]
    assert len(names) == 48 and any("moving_mean" in k for k in names)  # BatchNorm statistics included.
    for name in names:
        np.testing.assert_array_equal(chief.get_tensor(name), other.get_tensor(name), err_msg=name)
