"""The generic trainer: one custom loop under tf.distribute for every network, policy and strategy.

Read top to bottom, `train()`:

  1. starts the gin-chosen strategy, opens the data, claims the model directory;
  2. builds the gin-declared network, optimizer and schedule under the strategy;
  3. resumes the phase from its last checkpoint, or starts it from `init_from`
     (a previous phase's weights, carried over by name);
  4. loops over epochs: `steps_per_execution` steps per `tf.function` call,
     checkpoints every `checkpoint_every_steps` and at each epoch end;
  5. at each epoch end evaluates, and commits the epoch: its metrics go into
     the checkpoint's history first, then the CSV, TensorBoard's val points and
     `best/` are written from that history, so a crash anywhere loses or
     doubles nothing (a rerun rewrites them from the checkpoint);
  6. exports the best checkpoint and evaluates it in depth.

A killed run loses at most one checkpoint interval: the same command resumes
it. SIGTERM and SIGINT make the run checkpoint and stop (exit 128 + signal).
Why a custom loop and not `model.fit`: docs/decisions.md §4.
"""

import contextlib
import dataclasses
import functools
import json
import os
import signal
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from trainer import checkpoints as checkpoints_lib
from trainer import optim
from trainer import run_dir
from trainer import strategy as strategy_lib
from trainer import summaries
from trainer.cli import Interrupted
from trainer.errors import UserError
from trainer.models import blocks, builder, plan
from trainer.registry import configurable

METRICS = ("loss", "top1", "top5", "count")


@configurable("trainer", denylist=["stop_after_steps"])
def train(model_dir,
          data,
          epochs,
          num_classes,
          strategy=strategy_lib.default,
          optimizer=optim.adam,
          schedule=optim.constant,
          loss=optim.cross_entropy,
          first_epoch=1,
          init_from=None,
          previous_phase=None,
          allow_partial_init=False,
          carry_optimizer=False,
          select_best_by="val_top1",
          early_stopping_patience=None,
          steps_per_execution=None,
          checkpoint_every_steps=0,
          keep_checkpoints=3,
          mixed_precision=None,
          jit_compile=False,
          seed=None,
          deterministic_ops=False,
          log_every_steps=50,
          export=True,
          evaluate_best=True,
          check_memory=True,
          scan_data=True,
          stop_after_steps=None):
    """Trains one phase. Every argument is set in gin (gin/common.gin and the runnable files).

    Args:
      model_dir: where checkpoints, TensorBoard logs, the CSV log and the export go.
      data: a reference to `trainer.data` (called after the strategy starts).
      epochs: epochs in this phase.
      num_classes: must match the dataset's class count and the network's output.
      strategy: a reference to a `trainer.strategy.*` factory.
      optimizer: a reference to a `trainer.optim` optimizer, called with the schedule's rate.
      schedule: a reference to a `trainer.optim` schedule.
      loss: a reference to a `trainer.optim` loss.
      first_epoch: number shown for this phase's first epoch (the reference
        counted 1-230 across three phases).
      init_from: a previous phase's model directory or checkpoint path, whose
        weights start this phase (ignored when resuming this phase).
      previous_phase: the gin file that writes `init_from`, named in the error
        when it does not exist.
      allow_partial_init: accept an `init_from` checkpoint that does not cover every variable.
      carry_optimizer: also carry the previous phase's optimizer state (the
        reference started Adam afresh each phase: False).
      select_best_by: the epoch metric that picks the best checkpoint (kept in
        best/, exported): 'val_top1', 'val_top5' (higher is better) or 'val_loss'.
      early_stopping_patience: stop the phase after this many epochs without a
        new best (None: never).
      steps_per_execution: training steps per `tf.function` call; None: the strategy's choice (100 on
        a TPU, 10 elsewhere).
      checkpoint_every_steps: extra checkpoints between epoch ends (0 = only at epoch ends).
      keep_checkpoints: how many recent checkpoints to keep (the best is kept apart, in `best/`).
      mixed_precision: None, 'mixed_float16' or 'mixed_bfloat16'.
      jit_compile: compile the forward and backward pass with XLA (off on CPU: docs/decisions.md §7).
      seed: seeds the weight initialisation; None = random.
      deterministic_ops: TensorFlow's op determinism and an ordered input pipeline: the same command
        twice gives bit-identical weights (slower).
      log_every_steps: console progress interval when stdout is not a terminal.
      export: export the best checkpoint at the end of the phase (model_dir/export).
      evaluate_best: evaluate the best checkpoint in depth at the end of the phase
        (model_dir/eval/best-<step>/: report, confusion matrix, Grad-CAM; see `trainer.evaluate`).
      check_memory: before the first step, compare the plan's estimate of training memory with the memory
        available (host RAM when training on CPU): stop naming a batch size that fits, warn when close.
      scan_data: before training, decode every image once and report per split the images found and the
        unreadable ones, empty or tiny classes and class imbalance (model_dir/data_report.json; the scan is
        cached per dataset, see `tiny_imagenet.scan`).
      stop_after_steps: checkpoint and return at this step; for tests.

    Returns:
      The best epoch's row of the history (a dict), or None if no epoch was evaluated.

    Raises:
      UserError: bad configuration, missing data, a non-finite loss, a model
        directory in use by another run.
      Interrupted: SIGTERM or SIGINT, after a checkpoint.
    """
    # --- 1. Strategy, data, model directory. ---------------------------------------------------------------------
    distribution = strategy()  # First: logical CPU devices must be set up before TensorFlow runs anything.
    data = data()
    if deterministic_ops:
        data = dataclasses.replace(data, deterministic=True)
    steps_per_execution = steps_per_execution or distribution.steps_per_execution
    _check_settings(data, num_classes, distribution, steps_per_execution, checkpoint_every_steps)
    if not model_dir:
        raise UserError("No model directory: set MODEL_DIR in the gin file or pass --model_dir.")
    model_dir = os.path.expanduser(model_dir)
    checkpoint_dir = os.path.join(model_dir, "checkpoints")
    resuming = bool(tf.train.latest_checkpoint(checkpoint_dir))
    settings = _settings(data, num_classes)
    if resuming:
        _check_resumable(model_dir, settings)
    if init_from and not resuming:
        init_from = checkpoints_lib.find_init_checkpoint(os.path.expanduser(init_from), previous_phase)
    _makedirs(model_dir)
    with _disk_errors(model_dir), _claimed(model_dir, distribution) as (lock, signals), _precision(mixed_precision):
        if distribution.chief:  # (Resuming, the check above found it equal.)
            run_dir.write_text(os.path.join(model_dir, SETTINGS_FILE), json.dumps(settings, indent=1) + "\n")
        if distribution.chief and scan_data:
            _scan_data(data, model_dir)
        if seed is not None:
            keras.utils.set_random_seed(seed)
        if deterministic_ops:
            tf.config.experimental.enable_op_determinism()

        # --- 2. Network, optimizer, counters, under the strategy. -------------------------------------------------
        steps_per_epoch, total_steps = data.steps_per_epoch, epochs * data.steps_per_epoch
        with distribution.strategy.scope(), blocks.synchronized_batch_norm(distribution.synchronized_batch_norm):
            model = builder.build_network(data.image_size)
            _check_output(model, num_classes)
            learning_rate = schedule(steps_per_epoch=steps_per_epoch, epochs=epochs)
            plateau = learning_rate if isinstance(learning_rate, optim.Plateau) else None
            opt = optimizer(learning_rate=float(plateau.rate.numpy()) if plateau else learning_rate)
            if keras.mixed_precision.global_policy().name == "mixed_float16":
                opt = keras.optimizers.LossScaleOptimizer(opt)
            opt.build(model.trainable_variables)
            step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        history = tf.Variable("[]", dtype=tf.string, trainable=False, name="history")  # The committed epochs.
        weights = checkpoints_lib.weights_by_path(model)
        checkpoint = tf.train.Checkpoint(weights=weights, optimizer=opt, step=step, history=history,
                                         **({"plateau": plateau} if plateau else {}))
        checkpoints = checkpoints_lib.Checkpoints(checkpoint, model, model_dir, keep_checkpoints, distribution,
                                                  on_preempted=signals.preempted)
        train_steps, evaluate = build_steps(distribution.strategy, model, opt, step, data.batch_size, num_classes,
                                            loss(num_classes=num_classes), jit_compile)
        writers = summaries.Writers(model_dir, distribution.chief)

        # --- 3. Resume this phase, or start it from the previous one. ---------------------------------------------
        resumed_from = checkpoints.restore()
        if plateau:
            opt.learning_rate = float(plateau.rate.numpy())  # Where the restored plateau had brought it.
        elif resumed_from and isinstance(learning_rate, float):
            opt.learning_rate = learning_rate  # A constant rate comes from gin: a rerun may lower it.
        done = int(step.numpy())  # Steps done in this phase (the host's copy of `step`).
        rows = json.loads(history.numpy().decode())
        offset = _step_offset(init_from if not resumed_from else None, rows, first_epoch, steps_per_epoch)
        if resumed_from:
            start = f"resumes {resumed_from} at step {done} (epoch {first_epoch + done // steps_per_epoch})"
            if done >= total_steps:
                start = f"phase already complete ({resumed_from}, step {done}): nothing to train"
        elif init_from:
            checkpoints_lib.transfer_weights(weights, init_from, previous_phase, allow_partial_init)
            if carry_optimizer:
                tf.train.Checkpoint(optimizer=opt).read(init_from).expect_partial()
            start = f"weights of {init_from}"
        else:
            start = "fresh weights" + (f" (seed {seed})" if seed is not None else "")
        decoded = tf.Variable(0, dtype=tf.int64, trainable=False)  # Counts decoded images.
        val_data = distribution.strategy.distribute_datasets_from_function(lambda ctx: data.eval("val", ctx))
        network_plan = plan.make_plan(data.image_size)
        summaries.banner(data, _network_summary(model, network_plan), distribution, model_dir, epochs,
                         first_epoch, start)
        if check_memory and done < total_steps:
            _check_memory(network_plan, data, distribution.strategy.num_replicas_in_sync)
        commit = functools.partial(_commit, history=history, checkpoints=checkpoints, writers=writers,
                                   model_dir=model_dir, chief=distribution.chief, metric=select_best_by)
        if done % steps_per_epoch == 0 and 0 < done and not any(r["step"] == done for r in rows):
            # A checkpoint landed on an epoch's last step but the run died before the epoch was committed.
            row = _row(first_epoch + done // steps_per_epoch - 1, done, offset, None, _means(evaluate(val_data)),
                       0.0, _current_lr(opt))
            rows = commit(rows, row, plateau_rate=plateau.update(row) if plateau else None, opt=opt)
        train_data = iter(distribution.strategy.distribute_datasets_from_function(
            lambda ctx: data.train(ctx, resume_step=done, decoded_counter=decoded))) if done < total_steps else None
        # At a phase's start, a batch shows what the augmentation does (every worker takes it; none trains on it).
        preview = (_first_images(distribution.strategy, next(train_data)) if done == 0 and train_data else None)
        if distribution.chief:
            _write_run_start(model_dir, writers, network_plan, offset + done, preview, data)
            _republish(model_dir, rows, checkpoints, select_best_by, writers)  # After a crash: CSV, best/, val.
        if init_from and not resumed_from and done == 0:
            carried = _means(evaluate(val_data))
            writers.scalars("val", offset, carried)
            logging.info("Carried-over weights at %d px, before training: val loss %.4f, top-1 %.4f, top-5 %.4f.",
                         data.image_size, carried["loss"], carried["top1"], carried["top5"])
        # --- 4. The loop. ---------------------------------------------------------------------------------------
        compiled = False
        while done < total_steps:
            epoch = done // steps_per_epoch
            epoch_end = (epoch + 1) * steps_per_epoch
            epoch_start = time.time()
            progress = summaries.Progress(first_epoch + epoch, first_epoch + epochs - 1, steps_per_epoch,
                                          data.batch_size, log_every_steps)
            epoch_totals = np.zeros(4)
            while done < epoch_end:
                n = _steps_this_call(done, epoch_end, steps_per_execution, checkpoint_every_steps, stop_after_steps)
                if not compiled:
                    logging.info("Compiling the training step (the first call traces the network)...")
                call_start = time.time()
                try:
                    if compiled or n == 1:
                        totals = train_steps(train_data, tf.constant(n, tf.int32)).numpy()
                    else:  # The first call traces, then runs one step: a signal waits for one step at most.
                        totals = train_steps(train_data, tf.constant(1, tf.int32)).numpy()
                        signals.immediate = False
                        totals += train_steps(train_data, tf.constant(n - 1, tf.int32)).numpy()
                except Exception:  # pylint: disable=broad-except
                    if not (signals.received and signals.immediate):
                        raise
                    # Stopped at once (run_dir.StopSignals.immediate) during the first call; tracing wraps the
                    # exception (autograph's StagingError), so it is raised again here.
                    if int(step.numpy()) == done:
                        raise signals.before_training() from None  # While tracing: no step ran.
                    return _stop(signals, checkpoints, writers, int(step.numpy()), first_epoch + epoch, model_dir)
                signals.immediate = False  # From here on a signal stops after the current execution.
                images_per_second = n * data.batch_size / (time.time() - call_start) if compiled else None
                compiled = True
                done = int(step.numpy())
                _check_finite(totals, done, n, checkpoints.latest)
                checkpoints.save_if_preempted(done)
                if lock:
                    lock.heartbeat()
                epoch_totals += totals
                progress.update(done - epoch * steps_per_epoch, _means(epoch_totals), images_per_second)
                writers.scalars("train", offset + done, {**_means(totals), "learning_rate": _current_lr(opt),
                                                         **({"images_per_second": images_per_second}
                                                            if images_per_second else {})})
                if checkpoint_every_steps and done % checkpoint_every_steps == 0 and done < epoch_end:
                    checkpoints.save(done)  # (At an epoch's end the commit saves, with the epoch's row.)
                if done < epoch_end and _should_stop(signals, done, stop_after_steps):
                    return _stop(signals, checkpoints, writers, done, first_epoch + epoch, model_dir)
            # End of epoch: evaluate, then commit the epoch (checkpoint first, then what derives from it).
            val = _means(evaluate(val_data))
            row = _row(first_epoch + epoch, done, offset, _means(epoch_totals), val, time.time() - epoch_start,
                       _current_lr(opt))
            rows = commit(rows, row, plateau_rate=plateau.update(row) if plateau else None, opt=opt)
            progress.finish(_means(epoch_totals), val, time.time() - epoch_start)
            if first_epoch + epoch == first_epoch and not distribution.multi_worker:
                _report_skipped(data.num_train, int(decoded.numpy()), data.reader.data_dir)
            if done < total_steps and _should_stop(signals, done, stop_after_steps):
                return _stop(signals, checkpoints, writers, done, first_epoch + epoch, model_dir)
            since_best = len(rows) - 1 - rows.index(_best(rows, select_best_by))
            if early_stopping_patience and since_best >= early_stopping_patience:
                logging.info("Early stop: %d epochs without a better %s.", since_best, select_best_by)
                break

        # --- 5. The phase is done: export the best checkpoint. --------------------------------------------------
        best = _best(rows, select_best_by)
        exported = None
        if best and distribution.chief and export:
            from trainer import export as export_lib  # pylint: disable=import-outside-toplevel

            exported = export_lib.export_trained(model_dir, data)["export_dir"]
        if best and distribution.chief and evaluate_best:
            from trainer.evaluation import evaluator  # pylint: disable=import-outside-toplevel

            evaluator.evaluate_best_of_phase(model_dir, data, model=model, strategy=distribution)
        writers.flush()
        summaries.end_summary(model_dir, best, exported)
        return best


# --- The compiled steps ------------------------------------------------------------------------------------------


def build_steps(strategy, model, optimizer, step, batch_size, num_classes, per_example_loss=None,
                jit_compile=False):
    """The trainer's two compiled functions (`benchmarks/train_step.py` times `train_steps`).

    The loss is the per-example loss summed over each replica's examples and
    divided by the global batch size, plus the blocks' L2 terms once over all
    replicas: the gradients, summed over replicas by the optimizer, are those of
    the mean loss over the global batch.

    Args:
      strategy: the `tf.distribute.Strategy` the model and optimizer were built under.
      model: a Keras model mapping images to logits.
      optimizer: a built Keras 3 optimizer (a LossScaleOptimizer under mixed_float16).
      step: an int64 variable, advanced by `train_steps`.
      batch_size: the global batch size.
      num_classes: number of classes (top-5 becomes top-k with k = min(5, num_classes)).
      per_example_loss: `fn(labels, logits, training) -> [batch]`; default plain cross-entropy.
      jit_compile: compile the forward and backward pass with XLA.

    Returns:
      `(train_steps, evaluate)`. `train_steps(iterator, n)` runs `n` (an int32
      scalar tensor) training steps and adds `n` to `step`; `evaluate(dataset)`
      makes one pass over a distributed dataset. Both return a float32 [4]
      tensor summed over steps and replicas: loss sum, top-1 hits, top-5 hits,
      examples (rows with an all-zero label, the evaluation padding, count for nothing).

    Raises:
      UserError: `jit_compile` with synchronized BatchNorm over several replicas.
    """
    per_example_loss = per_example_loss or optim.cross_entropy(num_classes)
    if jit_compile and strategy.num_replicas_in_sync > 1 and any(
            getattr(layer, "synchronized", False) for layer in model.layers):
        raise UserError("trainer.train.jit_compile = True cannot compile synchronized BatchNorm over "
                        f"{strategy.num_replicas_in_sync} replicas (its all-reduce would sit inside the XLA "
                        "function): turn one of them off.")

    def totals_and_loss(images, labels, training):
        logits = tf.cast(model(images, training=training), tf.float32)
        weight = tf.reduce_sum(labels, axis=-1)  # 0 for padding rows.
        per_example = per_example_loss(labels, logits, training=training)
        target = tf.argmax(labels, axis=-1)
        top1 = tf.cast(tf.equal(tf.argmax(logits, axis=-1), target), tf.float32)
        top5 = tf.cast(tf.math.in_top_k(target, logits, k=min(5, num_classes)), tf.float32)
        totals = tf.stack([tf.reduce_sum(per_example * weight), tf.reduce_sum(top1 * weight),
                           tf.reduce_sum(top5 * weight), tf.reduce_sum(weight)])
        loss = totals[0] / batch_size
        if model.losses:  # The blocks' L2 terms, once over all replicas.
            loss += tf.add_n(model.losses) / strategy.num_replicas_in_sync
        return totals, loss

    def gradients(images, labels):
        with tf.GradientTape() as tape:
            totals, loss = totals_and_loss(images, labels, training=True)
            scaled = optimizer.scale_loss(loss)  # Loss scaling under mixed_float16, else the loss.
        return tape.gradient(scaled, model.trainable_variables), totals

    if jit_compile:
        gradients = tf.function(gradients, jit_compile=True)

    def train_step(batch):
        grads, totals = gradients(*batch)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))  # Sums gradients over replicas.
        return totals

    def eval_step(batch):
        return totals_and_loss(*batch, training=False)[0]

    @tf.function
    def train_steps(iterator, num_steps):
        totals = tf.zeros([4])
        for _ in tf.range(num_steps):
            totals += strategy.reduce("SUM", strategy.run(train_step, args=(next(iterator),)), axis=None)
        step.assign_add(tf.cast(num_steps, tf.int64))
        return totals

    @tf.function
    def evaluate(data):
        totals = tf.zeros([4])
        for batch in data:
            totals += strategy.reduce("SUM", strategy.run(eval_step, args=(batch,)), axis=None)
        return totals

    return train_steps, evaluate


# --- Helpers, in the order `train` uses them ----------------------------------------------------------------------


def _check_settings(data, num_classes, distribution, steps_per_execution, checkpoint_every_steps):
    if data.num_classes != num_classes:
        raise UserError(f"NUM_CLASSES is {num_classes} but the dataset at {data.reader.data_dir} has "
                        f"{data.num_classes} classes (wnids.txt): set NUM_CLASSES = {data.num_classes}.")
    if data.steps_per_epoch < 1:
        raise UserError(f"BATCH_SIZE {data.batch_size} is larger than the training set ({data.num_train} "
                        f"images): use at most {data.num_train}.")
    replicas = distribution.strategy.num_replicas_in_sync
    if data.batch_size % replicas:
        raise UserError(f"BATCH_SIZE {data.batch_size} does not split evenly over {replicas} replicas: use a "
                        f"multiple of {replicas}, e.g. {data.batch_size // replicas * replicas or replicas} or "
                        f"{(data.batch_size // replicas + 1) * replicas}.")
    if steps_per_execution < 1 or checkpoint_every_steps < 0:
        raise UserError(f"trainer.train.steps_per_execution must be >= 1 (got {steps_per_execution}) and "
                        f"trainer.train.checkpoint_every_steps >= 0 (got {checkpoint_every_steps}).")


# What a checkpoint cannot carry from one run of a phase to the next (model_dir/settings.json, written when the
# phase starts): resuming with another value is refused. Everything else (learning rate, epochs, ...) is carried,
# and the resumed run logs how its gin configuration differs from the previous run's (model_dir/config.gin).
SETTINGS_FILE = "settings.json"


def _settings(data, num_classes):
    name, blocks = builder.declared()
    return {"IMAGE_SIZE": data.image_size, "BATCH_SIZE": data.batch_size, "AUGMENT": data.augment,
            "NUM_CLASSES": num_classes, "trainer.network.name": name,
            "trainer.network.blocks": json.dumps(blocks, sort_keys=True, default=repr)}


def _check_resumable(model_dir, settings):
    """Refuses to resume a phase with settings its checkpoints cannot carry; logs the carried changes.

    Raises:
      UserError: naming each setting that changed, its old and new value, and the two ways on.
    """
    import gin  # pylint: disable=import-outside-toplevel

    path = os.path.join(model_dir, SETTINGS_FILE)
    try:
        with tf.io.gfile.GFile(path) as f:
            saved = json.loads(f.read())
    except (tf.errors.NotFoundError, ValueError):
        saved = {}  # A model directory of an older version: the restore still checks the network's variables.
    changed = [k for k in settings if k in saved and saved[k] != settings[k]]
    if changed:
        def show(key, value):
            if key == "trainer.network.blocks":
                return "another block list"
            return repr(value)

        what = "; ".join(f"{k} was {show(k, saved[k])}, now {show(k, settings[k])}" for k in changed)
        raise UserError(f"Cannot resume {model_dir} with other settings ({what}): its checkpoints were trained "
                        f"with the old ones. Rerun with the old values to resume it, or train in a new --model_dir "
                        f"(start it from these weights with trainer.train.init_from = '{model_dir}').")
    try:
        with tf.io.gfile.GFile(os.path.join(model_dir, "config.gin")) as f:
            previous = f.read()
    except tf.errors.NotFoundError:
        return
    import difflib  # pylint: disable=import-outside-toplevel

    diff = [line for line in difflib.unified_diff(previous.splitlines(), gin.config_str().splitlines(),
                                                  lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---")) and line[1:].strip()
            and not line[1:].startswith("#")]
    if diff:
        logging.info("The gin configuration changed since the last run of this phase (the checkpoint carries "
                     "these changes; operative_config.gin is rewritten):\n  %s", "\n  ".join(diff))


def _scan_data(data, model_dir):
    """Reports the data before training: a summary line, a warning per problem, model_dir/data_report.json."""
    from trainer.data import tiny_imagenet  # pylint: disable=import-outside-toplevel

    report = tiny_imagenet.scan(data.reader)
    path = os.path.join(model_dir, "data_report.json")
    run_dir.write_text(path, json.dumps(report, indent=1) + "\n")
    cached = f"; cached in {report['cached']}" if report.get("cached") else ""
    logging.info("Data check: %s (details: %s%s).", tiny_imagenet.scan_summary(report), path, cached)
    for problem in report["problems"]:
        logging.warning("Data check: %s", problem)


def _makedirs(model_dir):
    try:
        tf.io.gfile.makedirs(model_dir)
    except (tf.errors.OpError, OSError) as err:
        reason = getattr(err, "message", None) or getattr(err, "strerror", None) or str(err)
        raise UserError(f"Cannot create the model directory {model_dir}: {reason}. Use a writable --model_dir.") \
            from None


_DISK_PROBLEMS = ("No space left on device", "Disk quota exceeded", "Read-only file system")


@contextlib.contextmanager
def _disk_errors(model_dir):
    """A full disk or a read-only model directory (a checkpoint, an event file, the CSV): one line, no leftovers.

    Raises:
      UserError: naming the model directory, the problem and the checkpoint the same command resumes from.
    """
    try:
        yield
    except (tf.errors.OpError, OSError) as err:
        text = getattr(err, "message", None) or str(err)
        problem = next((p for p in _DISK_PROBLEMS if p in text), None)
        if not problem:
            raise
        for directory in ("checkpoints", "best"):  # A save killed by the error leaves its ckpt-N_temp.
            for leftover in tf.io.gfile.glob(os.path.join(model_dir, directory, "*_temp*")):
                try:
                    tf.io.gfile.rmtree(leftover) if tf.io.gfile.isdir(leftover) else tf.io.gfile.remove(leftover)
                except tf.errors.OpError:
                    pass
        latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
        raise UserError(f"Cannot write to the model directory {model_dir}: {problem}. Free some space there (or use "
                        f"a writable --model_dir) and run the same command: it resumes from "
                        f"{latest or 'the start (no checkpoint was written)'}, which is intact.") from None


@contextlib.contextmanager
def _claimed(model_dir, distribution):
    """Holds the model directory's lock (chief) and the stop signals for the run's duration."""
    lock = run_dir.ModelDirLock(model_dir) if distribution.chief else None
    # Under MultiWorkerMirroredStrategy, the PreemptionCheckpointHandler takes SIGTERM.
    signals = run_dir.StopSignals([signal.SIGINT] if distribution.multi_worker else [signal.SIGINT, signal.SIGTERM])
    try:
        yield lock, signals
    finally:
        signals.immediate = False  # A signal now must not skip the lock's release.
        signals.restore()
        if lock:
            lock.release()


@contextlib.contextmanager
def _precision(policy):
    previous = keras.mixed_precision.global_policy()
    try:
        if policy:
            keras.mixed_precision.set_global_policy(policy)
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _check_output(model, num_classes):
    problem = builder.output_problem(model.output_shape, num_classes)
    if problem:
        raise UserError(problem)


def _available_memory():
    """(bytes available, where) for training, or (None, None) when unknown (accelerators: not checked)."""
    if tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"):
        return None, None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "host RAM available (/proc/meminfo)"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host RAM available"
    except (ValueError, OSError, AttributeError):
        return None, None


def _check_memory(network_plan, data, replicas):
    """Stops before the first step when the plan's memory estimate exceeds what is available; warns when close.

    Raises:
      UserError: naming the estimate, what is available and a batch size that fits.
    """
    available, where = _available_memory()
    if not available:
        return
    memory = plan.training_memory(network_plan)
    memory = plan.Memory(memory.per_image, memory.fixed * replicas)  # Every replica holds its copy here.
    need = memory.at(data.batch_size)
    estimate = (f"about {plan.format_bytes(need)} at BATCH_SIZE {data.batch_size} (estimate: "
                f"{plan.format_bytes(memory.per_image)} an image of activations kept for the backward pass, "
                f"{plan.format_bytes(memory.fixed)} of weights, gradients and optimizer state; "
                f"`python -m trainer.plan` shows it)")
    if need > available:
        fits = memory.largest_batch(available) // replicas * replicas
        fix = (f"use BATCH_SIZE = {fits} or less" if fits >= max(1, replicas) else
               "even the smallest batch does not fit: use a smaller IMAGE_SIZE or network")
        raise UserError(f"Training needs {estimate} but only {plan.format_bytes(available)} of {where} is free: "
                        f"{fix}. (trainer.train.check_memory = False skips this check.)")
    if need > 0.7 * available:
        logging.warning("Training needs %s, close to the %s of %s: it may run out of memory.", estimate,
                        plan.format_bytes(available), where)


def _network_summary(model, network_plan):
    totals = network_plan.totals
    return {"name": model.name, "params": totals.params, "macs": totals.macs, "rf": totals.rf}


def _step_offset(init_from, rows, first_epoch, steps_per_epoch):
    """The TensorBoard step of this phase's step 0, so the phases continue one axis."""
    if rows:
        return rows[0]["global_step"] - rows[0]["step"]
    if init_from:
        history = _history_of(init_from)
        if history:
            return history[-1]["global_step"]
    return (first_epoch - 1) * steps_per_epoch


def _history_of(checkpoint_path):
    try:
        return json.loads(tf.train.load_checkpoint(checkpoint_path).get_tensor(
            "history/.ATTRIBUTES/VARIABLE_VALUE").decode())
    except (tf.errors.OpError, ValueError, KeyError):
        return []


def _first_images(strategy, batch):
    """Up to 32 images and labels of this worker's first replica: what the augmentation does."""
    images, labels = (strategy.experimental_local_results(t)[0][:32] for t in batch)
    return images, labels


def _write_run_start(model_dir, writers, network_plan, global_step, preview, data):
    """Operative gin config, network plan, HParams, the scalar layout, run.json, labelled augmented images."""
    import gin  # pylint: disable=import-outside-toplevel

    from trainer.evaluation import figures  # pylint: disable=import-outside-toplevel

    operative = gin.operative_config_str()
    run_dir.write_text(os.path.join(model_dir, "operative_config.gin"), operative)
    run_dir.write_text(os.path.join(model_dir, "config.gin"), gin.config_str())
    writers.text("train", global_step, "config/operative_gin", summaries.markdown_code(operative))
    writers.text("train", global_step, "network/plan", summaries.markdown_code(plan.format_plan(network_plan)))
    summaries.hparams(model_dir, summaries.gin_hparams())
    summaries.scalar_layout(model_dir)
    totals = network_plan.totals
    run_dir.write_text(os.path.join(model_dir, "run.json"), json.dumps({
        "network": builder.declared()[0], "params": totals.params, "macs": totals.macs,
        "image_size": data.image_size, "batch_size": data.batch_size}))
    if preview is not None:
        images, labels = (np.asarray(t) for t in preview)
        if data.mean is not None:  # Back to [0, 1] to be seen.
            images = images * np.array(data.std) + np.array(data.mean)
        names = [data.reader.class_names[i] for i in labels.argmax(-1)]
        titles = [n if row.max() > 0.99 else f"{n} ({row.max():.0%})" for n, row in zip(names, labels)]  # Mixed.
        grid = figures.image_grid(images, titles, "augmented training images (label; share when mixed)", cols=8)
        writers.image("train", global_step, "augmented_inputs", tf.io.decode_png(grid))
    writers.flush()


def _row(epoch, step, offset, train_means, val, seconds, learning_rate):
    """One epoch's line of metrics.csv (and of the checkpoint's history)."""
    return {"epoch": epoch, "step": step, "global_step": offset + step, "time": round(seconds, 2),
            "learning_rate": learning_rate,
            **{f"train_{k}": v for k, v in (train_means or {}).items() if k != "count"},
            **{f"val_{k}": v for k, v in val.items()}}


def _commit(rows, row, history, checkpoints, writers, model_dir, chief, metric, plateau_rate, opt):
    """Commits an epoch: its row goes into the checkpoint's history (the commit), then the CSV, val points, best/.

    A crash before the checkpoint loses the epoch whole (the rerun trains it
    again); a crash after it loses nothing (`_republish` rewrites the CSV and best/).
    """
    if plateau_rate is not None:
        opt.learning_rate = plateau_rate  # The next epoch's rate; the plateau's state goes into this checkpoint.
    rows = [r for r in rows if r["step"] != row["step"]] + [row]
    history.assign(json.dumps(rows))
    checkpoints.save(row["step"], best=_best(rows, metric)["step"] == row["step"], rewrite=True)
    if chief:
        writers.scalars("train", row["global_step"], {"epoch_time": row["time"]})
        writers.scalars("val", row["global_step"], {k[4:]: v for k, v in row.items() if k.startswith("val_")})
        writers.flush()
        summaries.CsvLog(os.path.join(model_dir, "metrics.csv")).write(rows)
    return rows


def _republish(model_dir, rows, checkpoints, metric, writers=None):
    """After a crash: rewrites the CSV from the history, saves best/ again if its save was lost, and writes
    the val points (and epoch times) of committed epochs that TensorBoard lacks (a kill between the
    checkpoint and their write)."""
    if rows:
        summaries.CsvLog(os.path.join(model_dir, "metrics.csv")).write(rows)
        best = _best(rows, metric)
        if checkpoints.best_step() != best["step"] and checkpoints.latest_step() == best["step"]:
            checkpoints.save(best["step"], best=True)
        if writers is not None:
            written = _written_steps(os.path.join(model_dir, "val"), "top1")
            for row in rows:
                if row["global_step"] not in written:
                    logging.info("Writing the val points of epoch %d to TensorBoard (lost by a crash).", row["epoch"])
                    writers.scalars("train", row["global_step"], {"epoch_time": row["time"]})
                    writers.scalars("val", row["global_step"],
                                    {k[4:]: v for k, v in row.items() if k.startswith("val_")})
            writers.flush()


def _written_steps(log_dir, tag):
    """The steps at which `tag` was written in the event files of `log_dir` (a truncated last record is ignored)."""
    steps = set()
    for path in tf.io.gfile.glob(os.path.join(log_dir, "events.out.tfevents.*")):
        try:
            for record in tf.data.TFRecordDataset(path):
                event = tf.compat.v1.Event.FromString(record.numpy())
                if any(value.tag == tag for value in event.summary.value):
                    steps.add(event.step)
        except tf.errors.DataLossError:  # The writer was killed mid-record: what precedes it counts.
            pass
    return steps


def _best(rows, metric="val_top1"):
    """The best epoch's row (the earliest of equals), or None."""
    if not rows:
        return None
    sign = -1.0 if metric.endswith("loss") else 1.0
    return max(rows, key=lambda r: (sign * r[metric], -r["step"]))


def _steps_this_call(step, epoch_end, steps_per_execution, checkpoint_every_steps, stop_after_steps):
    """Steps of the next execution: at most `steps_per_execution`, never past an epoch end or a checkpoint."""
    n = min(steps_per_execution, epoch_end - step)
    if checkpoint_every_steps:
        n = min(n, checkpoint_every_steps - step % checkpoint_every_steps)
    if stop_after_steps is not None:
        n = min(n, max(1, stop_after_steps - step))
    return n


def _means(totals):
    totals = np.asarray(totals)
    count = max(float(totals[3]), 1.0)
    return {"loss": float(totals[0]) / count, "top1": float(totals[1]) / count, "top5": float(totals[2]) / count,
            "count": int(totals[3])}


def _check_finite(totals, step, num_steps, latest_checkpoint):
    if not np.all(np.isfinite(totals)):
        steps = f"at step {step}" if num_steps == 1 else f"in steps {step - num_steps + 1}-{step}"
        raise UserError(f"The training loss became {totals[0] / max(totals[3], 1.0)} (not finite) {steps}: the run "
                        f"stopped without saving. The last good checkpoint is kept: {latest_checkpoint or 'none yet'}. "
                        "Lower the learning rate (or check the data and augmentation) and run the same command to "
                        "resume from it.")


def _current_lr(optimizer):
    lr = optimizer.learning_rate
    return float(lr.numpy() if hasattr(lr, "numpy") else lr)


def _should_stop(signals, done, stop_after_steps):
    return bool(signals.received) or (stop_after_steps is not None and done >= stop_after_steps)


def _stop(signals, checkpoints, writers, done, epoch, model_dir):
    """Checkpoints (unless the preemption handler did) and stops: Interrupted after a signal, else returns."""
    if not signals.saved:
        checkpoints.save(done)
    writers.flush()
    if signals.received:
        raise Interrupted(f"{signals.name} at step {done} (epoch {epoch}), after a checkpoint in {model_dir}. "
                          "Run the same command to resume.", signals.received)
    logging.info("Stopped at step %d (stop_after_steps); the same command resumes.", done)
    return None


def _report_skipped(num_files, decoded, data_dir):
    """Logs the training images that could not be decoded (each file is decoded once, into memory)."""
    if 0 < decoded < num_files:
        logging.warning("%d of %d training images in %s could not be decoded and were skipped.",
                        num_files - decoded, num_files, data_dir)
