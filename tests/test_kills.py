"""SIGKILL anywhere over a run's timeline loses and doubles nothing.

`python -m trainer.main` is killed at points chosen over a run's timeline: in the middle of an epoch, inside a
checkpoint write (a `*_temp*` directory exists), right after an epoch's checkpoint (before its CSV row, val point
and best/ are written), inside the best/ save, an atomic write of settings.json or metrics.csv, the export and the
evaluation. The same command is then rerun; after the last rerun the run must be whole: one CSV row and one val
point per epoch, the right best/, no half-written leftovers. The uninterrupted run they are compared with is also
the one whose TensorBoard events, metrics.csv, kept checkpoints and export are checked.
"""

import glob
import json
import os
import random
import re
import signal
import subprocess
import threading
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import AUGMENT, REPO, STEPS_PER_EPOCH, checkpoint_step, csv_rows, env, event_files, latest, leftovers, \
    main_command, read_events, run, scalars, val_points, weights

RUN = ("EPOCHS = 3", "trainer.train.steps_per_execution = 1", "trainer.train.checkpoint_every_steps = 4",
       "trainer.train.export = True", "trainer.train.evaluate_best = True", "trainer.train.deterministic_ops = True",
       AUGMENT)


# --- Killing a run at a point of its timeline --------------------------------------------------------------------

class Trigger:
    """A kill point: `kind` happens once the run has reached global step `after`.

    kinds: 'step' (the progress line of step `after`), 'state' (checkpoints/checkpoint names ckpt-`after`:
    the epoch's checkpoint is written, nothing derived from it yet), 'ckpt_temp' / 'best_temp' (a save into
    checkpoints/ or best/ is under way), 'tmp' (an atomic write of settings.json or metrics.csv is under way),
    'export' (an partial.export-* directory exists), 'eval' (the end-of-phase evaluation is writing eval/).
    """

    def __init__(self, kind, after):
        self.kind, self.after = kind, after

    def __repr__(self):
        return f"{self.kind}@{self.after}"

    def gives_up(self, step):
        """Past this step the point was missed (a save too quick to see): the next one is armed."""
        return self.kind not in ("export", "eval") and step > self.after + (3 if self.kind in ("step", "state") else 16)

    def fired(self, model_dir, step):
        if step < self.after and self.kind != "state":
            return False
        if self.kind == "step":
            return step >= self.after
        if self.kind == "state":
            try:
                with open(os.path.join(model_dir, "checkpoints", "checkpoint"), encoding="utf-8") as f:
                    return f'"ckpt-{self.after}"' in f.readline()
            except OSError:
                return False
        if self.kind in ("ckpt_temp", "best_temp"):
            directory = os.path.join(model_dir, "checkpoints" if self.kind == "ckpt_temp" else "best")
            try:
                return any("_temp" in name for name in os.listdir(directory))
            except OSError:
                return False
        if self.kind == "tmp":
            return bool(glob.glob(os.path.join(model_dir, "*.tmp-*")))
        if self.kind == "eval":
            return bool(glob.glob(os.path.join(model_dir, "eval", "best-*", "*")))
        return bool(glob.glob(os.path.join(model_dir, "partial.export-*")))


def run_with_kills(command, model_dir, triggers, timeout=300):
    """Runs `command`, SIGKILLs it at the first trigger of `triggers` that fires (popping the missed ones).

    Returns (returncode, log, the trigger that fired or None).
    """
    proc = subprocess.Popen(command, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    state = {"step": 0, "lines": []}

    def read():
        for line in proc.stderr:
            state["lines"].append(line)
            m = re.search(r"epoch (\d+)/\d+ step (\d+)/(\d+) ", line)
            if m:
                state["step"] = (int(m.group(1)) - 1) * int(m.group(3)) + int(m.group(2))
            elif re.search(r"epoch (\d+)/\d+ done", line):
                state["step"] = max(state["step"], int(re.search(r"epoch (\d+)", line).group(1)) * STEPS_PER_EPOCH)
            elif "phase already complete" in line:
                state["step"] = 10**6

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    fired, deadline = None, time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        while triggers and triggers[0].gives_up(state["step"]) and state["step"] < 10**6:
            triggers.pop(0)
        # The first point that fires wins; the points before it were missed (e.g. no best/ save in that epoch).
        hit = next((i for i, t in enumerate(triggers) if t.fired(str(model_dir), state["step"])), None)
        if hit is not None:
            proc.send_signal(signal.SIGKILL)
            fired = triggers[hit]
            del triggers[:hit + 1]
            break
        time.sleep(0.001)
    if proc.poll() is None and not fired:
        proc.kill()
    proc.wait()
    reader.join(timeout=10)
    return proc.returncode, "".join(state["lines"]), fired


def seeded_kill_points(seed):
    """7 kill points over a 3-epoch run (45 steps): always right after ckpt-15, inside the export and inside the
    evaluation; a checkpoint save, a best/ save, a metrics.csv write and a mid-epoch step at seeded places."""
    rng = random.Random(seed)
    points = [Trigger("state", STEPS_PER_EPOCH), Trigger("ckpt_temp", rng.randint(1, 40)),
              Trigger("best_temp", rng.choice([15, 30, 45])), Trigger("tmp", rng.choice([15, 30])),
              Trigger("export", 45), Trigger("eval", 45)]
    points.append(Trigger("step", rng.choice([s for s in range(2, 45) if s % 15])))
    order = ("step", "state", "ckpt_temp", "best_temp", "tmp", "export", "eval")  # At one step, as they happen.
    return sorted(points, key=lambda t: (t.after, order.index(t.kind)))


# --- What a finished run must hold --------------------------------------------------------------------------------

def assert_whole(model_dir, epochs=3):
    rows = csv_rows(model_dir)
    assert [r["epoch"] for r in rows] == [str(e) for e in range(1, epochs + 1)], rows
    points = val_points(model_dir)
    assert [s for s, _ in points] == [STEPS_PER_EPOCH * e for e in range(1, epochs + 1)], points
    assert [v for _, v in points] == pytest.approx([float(r["val_top1"]) for r in rows])
    top1 = [float(r["val_top1"]) for r in rows]
    best_step = STEPS_PER_EPOCH * (int(np.argmax(top1)) + 1)  # The earliest of equals.
    assert latest(model_dir, "best").endswith(f"ckpt-{best_step}")
    assert latest(model_dir).endswith(f"ckpt-{STEPS_PER_EPOCH * epochs}")
    with open(os.path.join(str(model_dir), "export", "export.json"), encoding="utf-8") as f:
        assert f"ckpt-{best_step}" in json.dumps(json.load(f)["source"])
    history = json.loads(tf.train.load_checkpoint(latest(model_dir)).get_tensor(
        "history/.ATTRIBUTES/VARIABLE_VALUE").decode())
    assert [r["epoch"] for r in history] == list(range(1, epochs + 1))
    assert leftovers(model_dir) == []
    evaluated = model_dir / "eval" / f"best-{best_step}"
    assert (evaluated / ".complete").exists()
    assert len(glob.glob(str(model_dir / "eval" / f"events.out.tfevents.*.best-{best_step}"))) == 1


@pytest.fixture(scope="module")
def reference_run(train_base_gin, tmp_path_factory):
    """The uninterrupted run the killed ones are compared with."""
    model_dir = tmp_path_factory.mktemp("reference") / "run"
    returncode, log = run(main_command(train_base_gin, model_dir, *RUN))
    assert returncode == 0, log[-3000:]
    assert_whole(model_dir)
    return model_dir


@pytest.mark.slow
def test_tensorboard_csv_and_export_of_a_run(reference_run):
    [train_events] = event_files(reference_run, "train")
    [val_events] = event_files(reference_run, "val")
    train_acc, val_acc = read_events(train_events), read_events(val_events)
    assert {"loss", "top1", "top5", "learning_rate", "images_per_second", "epoch_time",
            "config/operative_gin", "network/plan", "augmented_inputs"} <= set(train_acc.Tags()["tensors"])
    assert {"loss", "top1", "top5"} <= set(val_acc.Tags()["tensors"])
    assert train_acc.SummaryMetadata("augmented_inputs").plugin_data.plugin_name == "images"
    assert train_acc.SummaryMetadata("network/plan").plugin_data.plugin_name == "text"
    config_text = tf.make_ndarray(train_acc.Tensors("config/operative_gin")[0].tensor_proto).item().decode()
    assert "train.checkpoint_every_steps = 4" in config_text  # (Gin writes the shortest unambiguous name.)
    assert [s for s, _ in scalars(val_events, "top1")] == [15, 30, 45]
    assert [s for s, _ in scalars(train_events, "epoch_time")] == [15, 30, 45]
    rows = csv_rows(reference_run)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and float(rows[-1]["val_top1"]) > 0.4
    indexes = glob.glob(str(reference_run / "checkpoints" / "*.index"))
    kept = sorted(checkpoint_step(p[:-len(".index")]) for p in indexes)
    assert kept == [40, 44, 45]  # Every 4 steps and at epoch ends; the last 3 kept.
    best_epoch = int(np.argmax([float(r["val_top1"]) for r in rows]))
    assert checkpoint_step(tf.train.latest_checkpoint(str(reference_run / "best"))) == 15 * (best_epoch + 1)
    model = keras.models.load_model(reference_run / "export" / "model.keras")
    assert model.output_shape == (None, 5)
    assert os.path.exists(reference_run / "export" / "saved_model" / "saved_model.pb")


@pytest.mark.slow
# More seeds: TRAINER_KILL_SEEDS="2,3,4" (each about a minute).
@pytest.mark.parametrize("seed", [int(s) for s in os.environ.get("TRAINER_KILL_SEEDS", "2").split(",")])
def test_sigkill_anywhere_then_rerun_loses_and_doubles_nothing(train_base_gin, reference_run, tmp_path, seed):
    """Seeded kill points over the run's timeline; after each kill the same command runs again."""
    model_dir = tmp_path / "run"
    command = main_command(train_base_gin, model_dir, *RUN)
    triggers = seeded_kill_points(seed)
    planned, fired, start = list(triggers), [], None
    for _ in range(len(planned) + 1):
        returncode, log, trigger = run_with_kills(command, model_dir, triggers)
        # The rerun takes over the killed run's lock and starts where the kill left it (unless a point that held
        # at once killed it before its banner).
        if start and "Start:" in log:
            assert "Taking over the stale lock" in log and start in log, (fired[-1], start, log[-3000:])
        if trigger is None:
            break
        assert returncode == -signal.SIGKILL, (trigger, log[-3000:])
        fired.append(trigger)
        kept = latest(model_dir)
        kept = checkpoint_step(kept) if kept else None
        start = ("Start:     fresh weights" if kept is None else f"at step {kept} (epoch " if kept < 3 * STEPS_PER_EPOCH
                 else f", step {kept}): nothing to train")
        if os.path.exists(model_dir / "metrics.csv"):  # Never a duplicated or half row, even right after a kill.
            epochs = [r["epoch"] for r in csv_rows(model_dir)]
            assert epochs == [str(e) for e in range(1, len(epochs) + 1)], (trigger, epochs)
    print(f"kill points {planned}: fired {fired}")
    assert returncode == 0 and "Traceback" not in log, log[-3000:]
    assert not triggers
    # The two points whose timing is certain always fire; a save too quick to catch may be missed.
    assert {repr(t) for t in fired} >= {"state@15", "export@45", "eval@45"} and len(fired) >= 4, (planned, fired)
    assert_whole(model_dir)
    # Resuming mid-epoch re-seeds the data order (seed mixed with the resume step): the weights differ from the
    # reference; the step, the epochs and the structure are the same.
    assert weights(latest(model_dir)).keys() == weights(latest(reference_run)).keys()


@pytest.mark.slow
def test_kills_after_the_last_step_keep_the_weights_bit_identical(train_base_gin, reference_run, tmp_path):
    """Killed right after the last epoch's checkpoint, then inside the export: the reruns train nothing more,
    so the checkpoints, best/ and the export are those of the uninterrupted run, bit for bit."""
    model_dir = tmp_path / "run"
    command = main_command(train_base_gin, model_dir, *RUN)
    triggers = [Trigger("state", 3 * STEPS_PER_EPOCH), Trigger("export", 45)]
    for expected in list(triggers):
        returncode, log, trigger = run_with_kills(command, model_dir, triggers)
        assert returncode == -signal.SIGKILL and trigger is expected, (trigger, log[-3000:])
    returncode, log = run(command)
    assert returncode == 0, log[-3000:]
    assert "phase already complete" in log and "epoch 3/3 step" not in log
    assert_whole(model_dir)
    for ours, theirs in ((latest(model_dir), latest(reference_run)),
                         (latest(model_dir, "best"), latest(reference_run, "best"))):
        a, b = weights(ours), weights(theirs)
        assert a.keys() == b.keys() and len(a) > 20
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
