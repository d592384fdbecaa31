"""Checkpoints of a phase: save, resume, keep the best apart, and carry weights from a previous phase.

Layout of a model directory:

    checkpoints/ckpt-<step>   the last few (`trainer.train.keep_checkpoints`)
    best/ckpt-<step>          the best epoch so far by the selection metric

A checkpoint holds the network's variables keyed by their Keras path (block
names from the gin declaration, so they survive a change of resolution), the
optimizer, the phase's step and the best metric so far.
"""

import os
import re

import numpy as np
import tensorflow as tf
from absl import logging

from trainer.errors import UserError


def weights_by_path(model):
    """The model's variables keyed by their Keras path ('block/kernel'), which names them in checkpoints.

    Raises:
      UserError: two variables share a path (blocks need unique names).
    """
    weights = {}
    for w in model.weights:
        if w.path in weights:
            raise UserError(f"Two variables of the network share the path {w.path!r}: give its blocks unique names.")
        weights[w.path] = w
    return weights


class Checkpoints:
    """The phase's checkpoints: the last `keep` in model_dir/checkpoints, the best in model_dir/best.

    Every worker of a MultiWorkerMirroredStrategy has to save; the chief's
    copies are the model directory's, the others go to model_dir/workertemp_<id>
    (one kept), and every worker resumes from the chief's copies. Under that
    strategy SIGTERM goes through tf.distribute's PreemptionCheckpointHandler,
    which makes every worker save at the same step and then calls `on_preempted`.
    """

    def __init__(self, checkpoint, model, model_dir, keep, distribution, on_preempted):
        """Sets up the managers (nothing is restored or written yet).

        Args:
          checkpoint: the `tf.train.Checkpoint` to save and restore.
          model: the network (its weights are checked to be finite before a save).
          model_dir: the model directory.
          keep: how many recent checkpoints to keep.
          distribution: the `strategy.Distribution`.
          on_preempted: called after the preemption handler saved (multi-worker only).
        """
        self.directory = os.path.join(model_dir, "checkpoints")
        write_dir = model_dir if distribution.chief else os.path.join(model_dir, f"workertemp_{distribution.task_id}")
        self._checkpoint = checkpoint
        self._latest = tf.train.CheckpointManager(checkpoint, os.path.join(write_dir, "checkpoints"),
                                                  keep if distribution.chief else 1)
        self._best = tf.train.CheckpointManager(checkpoint, os.path.join(write_dir, "best"), 1)
        self._model = model
        self._model_dir = model_dir
        self._saved_step = None
        self._distribution = distribution
        self._on_preempted = on_preempted
        self._preemption = None

    @property
    def latest(self):
        """Path of the newest checkpoint of this phase, or None."""
        return tf.train.latest_checkpoint(self.directory)

    @property
    def best(self):
        """Path of the best checkpoint of this phase, or None."""
        return tf.train.latest_checkpoint(os.path.join(self._model_dir, "best"))

    def latest_step(self):
        """The step of the newest checkpoint, or None."""
        return _step_of(self.latest)

    def best_step(self):
        """The step of the best checkpoint, or None."""
        return _step_of(self.best)

    def remove_partial_saves(self):
        """Removes what a save killed midway left behind (`ckpt-N_temp` directories), in checkpoints/ and best/."""
        remove_partial_saves(self._model_dir)

    def restore(self, path):
        """Restores `path` (`resume_point`'s choice), or nothing when it is None.

        Returns:
          `path`.

        Raises:
          UserError: the checkpoint belongs to another network, schedule or optimizer.
        """
        if self._distribution.chief:
            self.remove_partial_saves()
        if path:
            try:
                self._checkpoint.restore(path).assert_existing_objects_matched()
            except (ValueError, AssertionError, tf.errors.OpError) as err:
                raise UserError(
                    f"{self._model_dir} holds checkpoints of {self._what_differs(path)} ({path}: "
                    f"{str(err).splitlines()[0][:300]}). Rerun with the old setting to resume, or use a new "
                    "--model_dir (start it from those weights with trainer.train.init_from and "
                    "trainer.train.allow_partial_init = True).") from None
            self._saved_step = _step_of(path)  # Already on disk: a save at that step does not rewrite it.
        if self._distribution.multi_worker:
            # It restores the same checkpoint again and adds its run counter to the checkpoint.
            self._preemption = tf.distribute.experimental.PreemptionCheckpointHandler(
                self._distribution.strategy.cluster_resolver, self._checkpoint, checkpoint_dir=self.directory,
                termination_config=tf.distribute.experimental.TerminationConfig(exit_fn=self._on_preempted))
        return path

    def _what_differs(self, path):
        """Names the setting a checkpoint disagrees with: the network, the schedule or the optimizer."""
        try:
            stored = tf.compat.v1.train.NewCheckpointReader(path).get_variable_to_shape_map()
        except (tf.errors.OpError, ValueError):
            return "another network, schedule or optimizer"
        ours = {_checkpoint_key(name): list(w.shape) for name, w in weights_by_path(self._model).items()}
        theirs = {k: list(v) for k, v in stored.items() if k.startswith("weights/")}
        if ours != theirs:
            return "another network (trainer.network.blocks)"
        if any(k.startswith("plateau/") for k in stored) != hasattr(self._checkpoint, "plateau"):
            return "another learning-rate schedule (trainer.train.schedule)"
        return "another optimizer (trainer.train.optimizer or its settings)"

    def save(self, step, best=False, rewrite=False):
        """Saves `step` (and as the best so far if `best`), after checking the weights are finite.

        The latest checkpoint at `step` is written once, unless `rewrite` (an epoch's commit adds its row
        to a checkpoint saved at that step without it).

        Raises:
          UserError: a weight is not finite (nothing is saved).
        """
        bad = [w.path for w in self._model.weights if not np.all(np.isfinite(w.numpy()))]
        if bad:
            raise UserError(f"The weights became non-finite ({', '.join(bad[:3])}, ...) by step {step}: "
                            f"the run stopped without saving them. The last good checkpoint is kept: "
                            f"{self.latest or 'none yet'}. Lower the learning rate and run the same command.")
        if step != self._saved_step or rewrite:
            self._latest.save(checkpoint_number=step)
            self._saved_step = step
        if best:
            self._best.save(checkpoint_number=step)

    def repair_best(self, step):
        """A damaged best/ is rebuilt from checkpoints/ckpt-<step> when that one is intact, else removed (logged).

        Args:
          step: the best epoch's step, by the history.
        """
        best, best_dir = self.best, os.path.join(self._model_dir, "best")
        why = damage(best) if best else None
        if why is None:
            return
        source = os.path.join(self.directory, f"ckpt-{step}")
        for f in tf.io.gfile.glob(best + ".*"):
            tf.io.gfile.remove(f)
        if _step_of(best) == step and damage(source) is None:
            for f in tf.io.gfile.glob(source + ".*"):
                tf.io.gfile.copy(f, os.path.join(best_dir, os.path.basename(f)), overwrite=True)
            logging.warning("%s was damaged (%s): rebuilt from %s, the same step.", best, why, source)
        else:
            tf.io.gfile.remove(os.path.join(best_dir, "checkpoint"))
            logging.warning("%s is damaged (%s) and checkpoints/ no longer holds an intact ckpt-%d: best/ is removed "
                            "(the next epoch that improves writes it again).", best, why, _step_of(best))
        self._best = tf.train.CheckpointManager(self._checkpoint, best_dir, 1)

    def save_if_preempted(self, step):
        """MultiWorkerMirroredStrategy: saves at the step the workers agreed on after a SIGTERM."""
        if self._preemption:
            self._preemption.save_checkpoint_if_preempted(checkpoint_number=step)


def remove_partial_saves(model_dir, ignore_errors=False):
    """Removes the `ckpt-N_temp` leftovers of saves killed midway, in model_dir/checkpoints and model_dir/best.

    Args:
      model_dir: the model directory.
      ignore_errors: leave what cannot be removed (a read-only or full disk), silently.
    """
    for directory in ("checkpoints", "best"):
        for leftover in tf.io.gfile.glob(os.path.join(model_dir, directory, "*_temp*")):
            try:
                if not ignore_errors:
                    logging.warning("Removing %s, left by a save that was killed midway.", leftover)
                if tf.io.gfile.isdir(leftover):
                    tf.io.gfile.rmtree(leftover)
                else:
                    tf.io.gfile.remove(leftover)
            except tf.errors.OpError:
                if not ignore_errors:
                    raise


def _step_of(path):
    return int(path.rsplit("-", 1)[1]) if path else None


def damage(path):
    """Why the checkpoint `path` cannot be trusted (one line), or None when every tensor of it reads back."""
    try:
        # (Not tf.train.load_checkpoint: it takes `path` for a directory where a file system, as ram:// does, says
        # that any prefix of a file name exists.)
        reader = tf.compat.v1.train.NewCheckpointReader(path)
        for key in reader.get_variable_to_shape_map():
            reader.get_tensor(key)
    except (tf.errors.OpError, ValueError, IndexError, RuntimeError) as err:
        return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return None


def _on_disk(directory):
    """The ckpt-N checkpoints in `directory` that have an .index file, newest first."""
    paths = [p[:-len(".index")] for p in tf.io.gfile.glob(os.path.join(directory, "ckpt-*.index"))]
    return sorted((p for p in paths if re.fullmatch(r"ckpt-\d+", os.path.basename(p))), key=_step_of, reverse=True)


def resume_point(model_dir, resume_from=None):
    """The checkpoint a run of this phase resumes from: the newest intact one (a damaged one is skipped, logged).

    Args:
      model_dir: the model directory.
      resume_from: a checkpoint named by the user (`trainer.train.resume_from`), or None.

    Returns:
      Its path, or None when the phase starts fresh (nothing of a run in `model_dir`).

    Raises:
      UserError: the directory holds a run but no readable checkpoint index (damaged, not fresh), or no intact
        checkpoint.
    """
    directory = os.path.join(model_dir, "checkpoints")
    if resume_from:
        path = find_checkpoint(model_dir, resume_from)
        why = damage(path)
        if why:
            raise UserError(f"trainer.train.resume_from = {resume_from!r} is damaged ({why}): name an intact "
                            f"checkpoint ({', '.join(map(os.path.basename, _on_disk(directory))) or 'none left'}).")
        return path
    latest, on_disk = tf.train.latest_checkpoint(directory), _on_disk(directory)
    if not latest:
        run = ([os.path.basename(p) for p in on_disk[:3]]
               + [f"best/{os.path.basename(p)}" for p in _on_disk(os.path.join(model_dir, "best"))]
               + [f for f in ("metrics.csv",) if tf.io.gfile.exists(os.path.join(model_dir, f))])
        if not run:
            return None  # (A settings.json alone: the first run was stopped before its first checkpoint.)
        intact = next((p for p in on_disk if damage(p) is None), None)
        how = (f"Resume from the newest intact checkpoint with trainer.train.resume_from = '{intact}'" if intact
               else "No intact checkpoint is left")
        raise UserError(f"{model_dir} holds a run ({', '.join(run)}) but no readable checkpoint index "
                        f"({os.path.join(directory, 'checkpoint')} is missing or damaged): refusing to start it "
                        f"over. {how}, or move the folder aside to start afresh.")
    why = None
    for path in [latest] + [p for p in on_disk if _step_of(p) < _step_of(latest)]:
        why = damage(path)
        if why is None:
            if path != latest:
                logging.warning("%s is damaged (%s): resuming from %s, the newest intact checkpoint; steps %d-%d are "
                                "trained again.", latest, damage(latest), path, _step_of(path) + 1, _step_of(latest))
            return path
    raise UserError(f"No intact checkpoint in {directory}: {latest} is damaged ({why}), and so is every older one. "
                    "Move the folder aside to start afresh.")


def find_init_checkpoint(init_from, previous_phase=None):
    """The checkpoint `init_from` names: a model directory's latest one, or a checkpoint path.

    Raises:
      UserError: there is none; the message names the phase to run first.
    """
    path = init_from
    if tf.io.gfile.isdir(init_from):
        path = (tf.train.latest_checkpoint(os.path.join(init_from, "checkpoints"))
                or tf.train.latest_checkpoint(init_from))
    if not path or not tf.io.gfile.glob(path + "*"):
        run_first = (f" Run the previous phase first: python -m trainer.main --gin_file={previous_phase}."
                     if previous_phase else "")
        raise UserError(f"trainer.train.init_from = {init_from!r} holds no checkpoint to start this phase from."
                        f"{run_first} Or set trainer.train.init_from = None to start from scratch.")
    why = damage(path)
    if why:
        raise UserError(f"trainer.train.init_from = {init_from!r}: {path} is damaged ({why}). Rerun the previous "
                        "phase (it resumes from its newest intact checkpoint), or name an intact checkpoint.")
    return path


def _checkpoint_key(path, attribute="weights"):
    """The name `tf.train.Checkpoint(<attribute>={path: variable})` gives a variable inside the checkpoint."""
    return f"{attribute}/" + path.replace(".", "..").replace("/", ".S") + "/.ATTRIBUTES/VARIABLE_VALUE"


def transfer_weights(weights, init_from, previous_phase=None, allow_partial=False):
    """Loads a previous phase's weights by name and returns a transfer report.

    Args:
      weights: {path: variable} of the model being trained (`weights_by_path`).
      init_from: a model directory (its latest checkpoint) or a checkpoint path.
      previous_phase: gin file of the phase that writes `init_from` (for the error).
      allow_partial: accept variables missing from the checkpoint or of another shape.

    Returns:
      A multi-line report: variables restored, missing, shape mismatches, unused.

    Raises:
      UserError: no checkpoint at `init_from`, or a partial load not allowed.
    """
    path = find_init_checkpoint(init_from, previous_phase)
    reader = tf.compat.v1.train.NewCheckpointReader(path)
    stored = reader.get_variable_to_shape_map()
    restored, missing, mismatched = [], [], []
    for name, var in weights.items():
        k = _checkpoint_key(name)
        if k not in stored:
            missing.append(name)
        elif list(stored[k]) != list(var.shape):
            mismatched.append(f"{name} {list(stored[k])} -> {list(var.shape)}")
        else:
            var.assign(reader.get_tensor(k))
            restored.append(name)
    used = {_checkpoint_key(n) for n in restored}
    unused = [k for k in stored if k.startswith("weights/") and k not in used]
    report = (f"Transfer from {path}: {len(restored)} of {len(weights)} variables restored, "
              f"{len(missing)} missing from the checkpoint, {len(mismatched)} of another shape, "
              f"{len(unused)} checkpoint variables unused.")
    details = "".join(f"\n  missing: {n}" for n in missing[:20]) + "".join(f"\n  shape: {m}" for m in mismatched[:20])
    if (missing or mismatched) and not allow_partial:
        raise UserError(report + details
                        + "\nRefusing a partial load: set trainer.train.allow_partial_init = True to accept it.")
    logging.info("%s", report + details)
    return report + details


def restore_weights(model, path):
    """Restores only the network's weights from a checkpoint (for evaluation and export).

    Raises:
      UserError: the checkpoint does not hold this network's weights.
    """
    try:
        tf.train.Checkpoint(weights=weights_by_path(model)).restore(path).expect_partial() \
            .assert_existing_objects_matched()
    except (ValueError, AssertionError, tf.errors.OpError) as err:
        raise UserError(f"{path} does not hold the weights of this network: {str(err).splitlines()[0][:300]}") \
            from None


# --- Reading a run's checkpoints (evaluation and export). ---------------------------------------------------------

CHECKPOINT_DIRS = {"best": "best", "latest": "checkpoints"}


def find_checkpoint(model_dir, which="best"):
    """The checkpoint `which` names in a run's model directory.

    Args:
      model_dir: the run's model directory (local or gs://).
      which: 'best' (model_dir/best: the epoch of best val top-1), 'latest'
        (model_dir/checkpoints), a checkpoint path (the prefix of its .index file,
        e.g. runs/x/checkpoints/ckpt-30), or a directory holding checkpoints.

    Returns:
      The checkpoint path (the prefix of its .index and .data files).

    Raises:
      UserError: no such checkpoint.
    """
    path = _find_checkpoint(model_dir, which)
    why = damage(path)
    if why:
        raise UserError(f"{path} is damaged ({why}). Rerun the phase's training command (it rebuilds best/ from "
                        "checkpoints/ when it can) or name another checkpoint with --checkpoint.")
    return path


def _find_checkpoint(model_dir, which):
    model_dir = model_dir if "://" in str(model_dir or "") else os.path.expanduser(model_dir or "")
    if which in CHECKPOINT_DIRS:
        directory = os.path.join(model_dir, CHECKPOINT_DIRS[which])
        path = tf.train.latest_checkpoint(directory)
        if not path:
            other = "latest" if which == "best" else "best"
            why = ("best/ is written at the end of every epoch that improves val top-1" if which == "best"
                   else "checkpoints/ is written during training")
            raise UserError(f"No {which!r} checkpoint in {model_dir or '.'}: expected a checkpoint in {directory} "
                            f"({why}), found none. Is it the model directory of a training run that finished an "
                            f"epoch? Use --checkpoint={other} or --checkpoint=PATH.")
        return path
    path = which if "://" in which else os.path.expanduser(which)
    if tf.io.gfile.isdir(path):
        path = tf.train.latest_checkpoint(path) or path
    if not tf.io.gfile.exists(path + ".index"):
        raise UserError(f"--checkpoint={which!r} is neither 'best', 'latest' nor a checkpoint: expected the prefix "
                        f"of a .index file (e.g. {os.path.join(model_dir, 'checkpoints', 'ckpt-100')}), but "
                        f"{path}.index does not exist.")
    return path


def read_history(path):
    """The committed epochs stored in a trainer checkpoint's `history`: a list of row dicts, oldest first.

    Returns [] for a checkpoint without a history (or an unreadable one).
    """
    import json  # pylint: disable=import-outside-toplevel

    try:
        reader = tf.compat.v1.train.NewCheckpointReader(path)
        key = "history/.ATTRIBUTES/VARIABLE_VALUE"
        if not reader.has_tensor(key):
            return []
        rows = json.loads(reader.get_tensor(key).decode())
        return rows if isinstance(rows, list) else []
    except (tf.errors.OpError, ValueError, AttributeError):
        return []


def checkpoint_step(path):
    """The phase's step a trainer checkpoint was saved at (its `step`, else the number of its name, else None)."""
    try:
        reader = tf.compat.v1.train.NewCheckpointReader(path)
        key = "step/.ATTRIBUTES/VARIABLE_VALUE"
        if reader.has_tensor(key):
            return int(reader.get_tensor(key))
    except (tf.errors.OpError, ValueError):
        pass
    try:
        return _step_of(path)
    except (ValueError, IndexError):
        return None


def describe_checkpoint(path):
    """What a trainer checkpoint holds beyond weights: its step, its epoch's row and the best val top-1 so far.

    Returns:
      {'step', 'epoch', 'val_top1' (this checkpoint's epoch, as training logged it), 'best_top1' (max
      val_top1 of the history), 'train_loss' (this checkpoint's epoch)}; None for what the checkpoint does
      not record (a checkpoint between epoch ends has no row of its own).
    """
    step = checkpoint_step(path)
    rows = read_history(path)
    row = next((r for r in rows if r.get("step") == step), None)
    scored = [r["val_top1"] for r in rows if isinstance(r.get("val_top1"), (int, float))]
    return {"step": step, "epoch": row.get("epoch") if row else None,
            "val_top1": row.get("val_top1") if row else None, "best_top1": max(scored) if scored else None,
            "train_loss": row.get("train_loss") if row else None}
