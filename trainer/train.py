"""The generic trainer: one custom loop under tf.distribute for every network, policy and strategy.

Read top to bottom, `train()` does:

  1. pick the strategy, claim the model directory (a lock), open the data;
  2. build the gin-declared network, optimizer and schedule under the strategy;
  3. resume from the model directory's last checkpoint, or start the phase
     from `init_from` (weights carried over by name, with a transfer report,
     then one evaluation of the carried weights, logged at step 0);
  4. loop over epochs: `steps_per_execution` steps per `tf.function` call
     (`build_steps`), checkpoints every `checkpoint_every_steps` and at each
     epoch end, an evaluation per epoch, TensorBoard scalars, a CSV row;
  5. export the final model (`.keras` and SavedModel).

A killed run loses at most one checkpoint interval: the same command resumes
it (step, epoch, optimizer state). SIGTERM and SIGINT make the run checkpoint
and stop with `TrainingInterrupted`; under MultiWorkerMirroredStrategy SIGTERM
goes through tf.distribute's PreemptionCheckpointHandler, which makes every
worker save at the same step. A non-finite loss stops the run before anything
more is saved.

Why a custom loop and not `model.fit`: DESIGN.md §3 (Keras 3 fit fails under
MultiWorkerMirroredStrategy; TPUs need several steps per call).
"""

import csv
import os
import signal
import socket
import sys
import time

import gin
import keras
import numpy as np
import tensorflow as tf
from absl import logging

from trainer.data import pipeline
from trainer.errors import UserError
from trainer.models import builder
from trainer.strategy import make_strategy

_METRICS = ("loss", "top1", "top5")


class TrainingInterrupted(UserError):
    """A signal (SIGTERM, SIGINT) stopped the run after a checkpoint; the same command resumes it."""


@gin.configurable
def make_optimizer(steps_per_epoch,
                   epochs,
                   name="adam",
                   learning_rate=1e-3,
                   schedule="constant",
                   warmup_epochs=0.0,
                   end_learning_rate_fraction=0.0,
                   weight_decay=0.0,
                   momentum=0.9,
                   nesterov=False,
                   epsilon=1e-8,
                   use_ema=False):
    """The optimizer and its learning-rate schedule.

    Args:
      steps_per_epoch: training steps in one epoch (from the data).
      epochs: epochs in this phase (for the schedule's length).
      name: 'adam' (the reference: TF1 AdamOptimizer, epsilon 1e-8), 'adamw' or 'sgd'.
      learning_rate: the peak learning rate.
      schedule: 'constant' or 'cosine' (linear warm-up, then cosine decay).
      warmup_epochs: warm-up length for 'cosine'.
      end_learning_rate_fraction: final learning rate of 'cosine' as a fraction of the peak.
      weight_decay: decoupled weight decay (adamw, sgd).
      momentum: SGD momentum.
      nesterov: SGD Nesterov momentum.
      epsilon: Adam epsilon.
      use_ema: keep an exponential moving average of the weights (Keras `use_ema`).

    Returns:
      A Keras 3 optimizer.

    Raises:
      UserError: an unknown optimizer or schedule name.
    """
    if schedule == "constant":
        lr = learning_rate
    elif schedule == "cosine":
        warmup = int(warmup_epochs * steps_per_epoch)
        lr = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup else learning_rate,
            decay_steps=max(1, epochs * steps_per_epoch - warmup),
            alpha=end_learning_rate_fraction,
            warmup_target=learning_rate if warmup else None,
            warmup_steps=warmup)
    else:
        raise UserError(f"make_optimizer.schedule must be 'constant' or 'cosine', got {schedule!r}.")
    if name == "adam":
        return keras.optimizers.Adam(lr, epsilon=epsilon, use_ema=use_ema)
    if name == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=weight_decay, epsilon=epsilon, use_ema=use_ema)
    if name == "sgd":
        return keras.optimizers.SGD(lr, momentum=momentum, nesterov=nesterov,
                                    weight_decay=weight_decay or None, use_ema=use_ema)
    raise UserError(f"make_optimizer.name must be 'adam', 'adamw' or 'sgd', got {name!r}.")


@gin.configurable(denylist=["stop_after_steps"])
def train(model_dir=gin.REQUIRED,
          image_size=gin.REQUIRED,
          batch_size=gin.REQUIRED,
          num_classes=gin.REQUIRED,
          epochs=gin.REQUIRED,
          first_epoch=1,
          init_from=None,
          previous_phase=None,
          allow_partial_init=False,
          label_smoothing=0.0,
          steps_per_execution=10,
          checkpoint_every_steps=0,
          keep_checkpoints=3,
          mixed_precision=None,
          jit_compile=False,
          seed=None,
          log_every_steps=50,
          export=True,
          stop_after_steps=None):
    """Trains one phase. Every argument is set in gin (see gin/*.gin).

    Args:
      model_dir: where checkpoints, TensorBoard logs, the CSV log and exports go.
      image_size: input resolution of this phase.
      batch_size: global batch size (split over replicas; the loss is averaged over it).
      num_classes: must match the dataset's class count.
      epochs: epochs in this phase.
      first_epoch: number shown for this phase's first epoch (the reference
        counted 1-230 across three phases).
      init_from: a previous phase's model directory or checkpoint path, whose
        weights start this phase (ignored when resuming this phase).
      previous_phase: the gin file that writes `init_from`, named in the error
        when it does not exist.
      allow_partial_init: accept an `init_from` checkpoint that does not
        cover every variable (otherwise an error).
      label_smoothing: label smoothing of the training cross-entropy.
      steps_per_execution: training steps per `tf.function` call.
      checkpoint_every_steps: extra checkpoints between epoch ends (0 = only at epoch ends).
      keep_checkpoints: how many recent checkpoints to keep (the best by
        val top-1 is kept apart, in `best/`).
      mixed_precision: None, 'mixed_float16' or 'mixed_bfloat16'.
      jit_compile: compile the forward and backward pass with XLA (off on CPU: DESIGN §3).
      seed: seeds the weight initialisation (`keras.utils.set_random_seed`); None = random.
      log_every_steps: console progress interval when stdout is not a terminal.
      export: export the final model as `.keras` and SavedModel.
      stop_after_steps: checkpoint and return at this global step; for tests.

    Returns:
      The final validation metrics, a dict with 'loss', 'top1', 'top5'.

    Raises:
      UserError: bad configuration, missing data, a non-finite loss, a model
        directory in use by another run.
      TrainingInterrupted: SIGTERM or SIGINT, after a checkpoint.
    """
    args = dict(locals())
    del args["mixed_precision"], args["seed"]  # Applied here.
    if steps_per_execution < 1 or checkpoint_every_steps < 0:
        raise UserError(f"train.steps_per_execution must be >= 1 (got {steps_per_execution}) and "
                        f"train.checkpoint_every_steps >= 0 (got {checkpoint_every_steps}).")
    # A missing dataset, a missing previous phase or a strategy that cannot start
    # (no TPU) fail here, before anything is written.
    strategy = make_strategy()  # First: logical CPU devices must be set up before TF runs anything.
    pipeline.open_dataset()
    args["model_dir"] = model_dir = os.path.expanduser(model_dir)
    if init_from:
        args["init_from"] = init_from = os.path.expanduser(init_from)
    if init_from and not tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints")):
        find_init_checkpoint(init_from, previous_phase)
    tf.io.gfile.makedirs(model_dir)
    chief = _is_chief(strategy)
    lock = _ModelDirLock(model_dir) if chief else None
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    policy = keras.mixed_precision.global_policy()
    # Under MultiWorkerMirroredStrategy, the PreemptionCheckpointHandler takes SIGTERM.
    stopper = _StopOnSignal([signal.SIGINT] if multi_worker else [signal.SIGINT, signal.SIGTERM])
    try:
        if mixed_precision:
            keras.mixed_precision.set_global_policy(mixed_precision)
        if seed is not None:
            keras.utils.set_random_seed(seed)
        return _train(strategy, chief, stopper, **args)
    finally:
        stopper.restore()
        keras.mixed_precision.set_global_policy(policy)
        if lock:
            lock.release()


def _train(strategy, chief, stopper, model_dir, image_size, batch_size, num_classes, epochs, first_epoch,
           init_from, previous_phase, allow_partial_init, label_smoothing, steps_per_execution,
           checkpoint_every_steps, keep_checkpoints, jit_compile, log_every_steps, export, stop_after_steps):
    # --- 1. Data. -----------------------------------------------------------------
    dataset = pipeline.open_dataset()
    if dataset.num_classes != num_classes:
        raise UserError(f"NUM_CLASSES is {num_classes} but the dataset at {dataset.data_dir} has "
                        f"{dataset.num_classes} classes (wnids.txt): set NUM_CLASSES = {dataset.num_classes}.")
    num_train = len(dataset.files("train")[0])
    steps_per_epoch = num_train // batch_size
    if steps_per_epoch < 1:
        raise UserError(f"BATCH_SIZE {batch_size} is larger than the training set ({num_train} images).")
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise UserError(f"BATCH_SIZE {batch_size} does not split evenly over {replicas} replicas: use a "
                        f"multiple of {replicas}, e.g. {batch_size // replicas * replicas} or "
                        f"{(batch_size // replicas + 1) * replicas}.")

    # --- 2. Network, optimizer, counters (under the strategy), checkpoints. ----------
    with strategy.scope():
        model = builder.build_network(image_size)
        optimizer = make_optimizer(steps_per_epoch, epochs)
        if keras.mixed_precision.global_policy().name == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        best_top1 = tf.Variable(-1.0, dtype=tf.float32, trainable=False, name="best_top1")
    weights = _weights_by_path(model)
    checkpoint = tf.train.Checkpoint(weights=weights, optimizer=optimizer, step=step, best_top1=best_top1)
    train_steps, evaluate = build_steps(strategy, model, optimizer, step, batch_size, num_classes,
                                        label_smoothing, jit_compile)
    writers = _Writers(model_dir, chief)

    # --- 3. Resume this phase, or start it from the previous one; the data. ----------
    checkpoints = _Checkpoints(checkpoint, model, optimizer, model_dir, keep_checkpoints, strategy, chief, stopper)
    done = int(step.numpy())  # Steps done in this phase (the host's copy of `step`).
    decoded = tf.Variable(0, dtype=tf.int64, trainable=False)  # Counts decoded images (corrupt ones are skipped).
    sizes = {"image_size": image_size, "batch_size": batch_size}
    train_data = strategy.distribute_datasets_from_function(lambda ctx: pipeline.make_dataset(
        "train", training=True, input_context=ctx, decoded_counter=decoded, resume_step=done, **sizes))
    val_data = strategy.distribute_datasets_from_function(
        lambda ctx: pipeline.make_dataset("val", training=False, input_context=ctx, **sizes))
    if checkpoints.resumed_from:
        logging.info("Resumed from %s at step %d (epoch %d).", checkpoints.resumed_from, done,
                     first_epoch + done // steps_per_epoch)
    elif init_from:
        logging.info("%s", transfer_weights(weights, init_from, previous_phase, allow_partial_init))
        carried = _means(evaluate(val_data).numpy())
        writers.scalars("val", 0, carried)
        logging.info("Carried-over weights at %d px, before training: val loss %.4f, top-1 %.4f, top-5 %.4f.",
                     image_size, carried["loss"], carried["top1"], carried["top5"])

    # --- 4. Logging set-up: operative config, plan, augmented images; CSV. -----------
    iterator = iter(train_data)
    # At a phase's start, every worker takes a batch to show what the augmentation does (not trained on).
    preview = strategy.experimental_local_results(next(iterator)[0])[0][:32] if done == 0 else None
    if chief:
        _log_run_start(model_dir, writers, image_size, done, strategy, preview)
    csv_log = _CsvLog(os.path.join(model_dir, "metrics.csv")) if chief else None

    # --- 5. The loop. ---------------------------------------------------------------
    def stop_requested(done, epoch):
        """After a signal or at `stop_after_steps`: checkpoints and returns True, or raises TrainingInterrupted."""
        if not stopper.requested and (stop_after_steps is None or done < stop_after_steps):
            return False
        if not stopper.saved:  # (The PreemptionCheckpointHandler saved already.)
            checkpoints.save(done)
        writers.flush()
        if stopper.requested:
            raise TrainingInterrupted(f"Stopped by {stopper.requested} at step {done} (epoch {first_epoch + epoch}) "
                                      f"after a checkpoint in {model_dir}. Run the same command to resume.")
        logging.info("Stopped at step %d (stop_after_steps); the same command resumes.", done)
        return True

    total_steps = epochs * steps_per_epoch
    last_val = None
    epochs_this_run = 0
    while done < total_steps:
        epoch = done // steps_per_epoch
        epoch_end = (epoch + 1) * steps_per_epoch
        epoch_start_time = time.time()
        progress = _Progress(first_epoch + epoch, steps_per_epoch, batch_size, log_every_steps)
        epoch_totals = np.zeros(4)
        while done < epoch_end:
            n = _steps_this_call(done, epoch_end, steps_per_execution, checkpoint_every_steps, stop_after_steps)
            start = time.time()
            totals = train_steps(iterator, tf.constant(n, tf.int32)).numpy()
            images_per_second = n * batch_size / (time.time() - start)
            done = int(step.numpy())
            _check_finite(totals, done, n, checkpoints.latest)
            checkpoints.save_if_preempted(done)
            epoch_totals += totals
            progress.update(done - epoch * steps_per_epoch, _means(epoch_totals), images_per_second)
            writers.scalars("train", done, {**_means(totals), "learning_rate": _current_lr(optimizer),
                                            "images_per_second": images_per_second})
            if checkpoint_every_steps and done % checkpoint_every_steps == 0:
                checkpoints.save(done)
                writers.flush()
            if done < epoch_end and stop_requested(done, epoch):
                return last_val
        # End of epoch: evaluate, log, checkpoint (and keep the best apart).
        epoch_time = time.time() - epoch_start_time
        last_val = _means(evaluate(val_data).numpy())
        train_means = _means(epoch_totals)
        epochs_this_run += 1
        if epochs_this_run == 2 and not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            # With a cache, the first pass over the files is complete by now and decoded each file once.
            _report_skipped(num_train, int(decoded.numpy()), dataset.data_dir)
        writers.scalars("train", done, {"epoch_time": epoch_time})
        writers.scalars("val", done, last_val)
        progress.finish(train_means, last_val, epoch_time)
        if csv_log:
            csv_log.write({"epoch": first_epoch + epoch, "step": done, "time": round(epoch_time, 2),
                           "learning_rate": _current_lr(optimizer),
                           **{f"train_{k}": v for k, v in train_means.items()},
                           **{f"val_{k}": v for k, v in last_val.items()}})
        is_best = last_val["top1"] > float(best_top1.numpy())
        if is_best:
            best_top1.assign(last_val["top1"])
        checkpoints.save(done, best=is_best)
        writers.flush()
        if done < total_steps and stop_requested(done, epoch):
            return last_val

    if last_val is None:  # Resumed a finished phase: report its final evaluation.
        last_val = _means(evaluate(val_data).numpy())
    if export and chief:
        _export(model, model_dir)
    writers.flush()
    logging.info("Phase done: val loss %.4f, top-1 %.4f, top-5 %.4f.",
                 last_val["loss"], last_val["top1"], last_val["top5"])
    return last_val


def build_steps(strategy, model, optimizer, step, batch_size, num_classes, label_smoothing=0.0,
                jit_compile=False):
    """The trainer's two compiled functions (`benchmarks/train_step.py` times `train_steps`).

    The loss is the cross-entropy summed over each replica's examples and divided
    by the global batch size, plus the blocks' L2 terms once over all replicas:
    the gradients, summed over replicas by the optimizer, are those of the mean
    loss over the global batch.

    Args:
      strategy: the `tf.distribute.Strategy` the model and optimizer were built under.
      model: a Keras model mapping images to logits.
      optimizer: a built Keras 3 optimizer (a LossScaleOptimizer under mixed_float16).
      step: an int64 variable, advanced by `train_steps`.
      batch_size: the global batch size.
      num_classes: number of classes (top-5 becomes top-k with k = min(5, num_classes)).
      label_smoothing: label smoothing of the training cross-entropy.
      jit_compile: compile the forward and backward pass with XLA.

    Returns:
      `(train_steps, evaluate)`. `train_steps(iterator, n)` runs `n` (an int32
      scalar tensor) training steps on batches from a distributed iterator and
      adds `n` to `step`; `evaluate(dataset)` makes one pass over a distributed
      dataset. Both return a float32 [4] tensor summed over steps and replicas:
      loss sum, top-1 hits, top-5 hits, examples (rows with an all-zero label,
      the evaluation padding, count for nothing).

    Raises:
      UserError: `jit_compile` with synchronized BatchNorm over several replicas
        (its all-reduce cannot sit inside the XLA-compiled function).
    """
    if jit_compile and strategy.num_replicas_in_sync > 1 and any(
            getattr(layer, "synchronized", False) for layer in model.layers):
        raise UserError("train.jit_compile = True cannot compile synchronized BatchNorm over "
                        f"{strategy.num_replicas_in_sync} replicas (its all-reduce would sit inside the XLA "
                        "function): set train.jit_compile = False or batch_norm.synchronized = False.")

    def totals_and_loss(images, labels, training):
        logits = tf.cast(model(images, training=training), tf.float32)
        weight = tf.reduce_sum(labels, axis=-1)  # 0 for padding rows.
        per_example = keras.losses.categorical_crossentropy(
            labels, logits, from_logits=True, label_smoothing=label_smoothing if training else 0.0)
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


# --- Helpers, in the order `train` and `_train` use them. -------------------------


def _is_chief(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type or isinstance(strategy, tf.distribute.TPUStrategy):
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0
                                             and "chief" not in resolver.cluster_spec().as_dict())


def _task_id(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    return getattr(resolver, "task_id", 0) or 0


class _ModelDirLock:
    """A lock file that stops a second run from writing the same model directory.

    A lock left by a run on this host whose process is gone (killed) is stale
    and taken over; a live one is an error. Local files only (`os.open` with
    O_EXCL, which tf.io.gfile lacks): on gs:// the model directory is not locked.
    """

    def __init__(self, model_dir):
        self.path = os.path.join(model_dir, "LOCK")
        if "://" in self.path:
            logging.warning("Model directory %s is not locked against a second run (remote filesystem).",
                            model_dir)
            return
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self._stale():
                    logging.warning("Taking over the stale lock %s (%s).", self.path, self._holder())
                    try:
                        os.remove(self.path)
                    except FileNotFoundError:  # Another run took it over first.
                        pass
                    continue
                raise UserError(f"Model directory {model_dir} is in use by another run (host and pid: "
                                f"{self._holder()}). Wait for it, use another --model_dir, or delete "
                                f"{self.path} if that run is gone.") from None
            os.write(fd, f"{socket.gethostname()} {os.getpid()}".encode())
            os.close(fd)
            return
        raise UserError(f"Could not take the lock {self.path}: another run keeps taking it.")

    def _holder(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                return f.read().strip()
        except OSError:
            return "unknown"

    def _stale(self):
        try:
            host, pid = self._holder().split()
        except ValueError:
            return True  # Empty or garbled: its writer died between creating and writing it.
        if host != socket.gethostname():
            return False  # Cannot tell: assume it is alive.
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def release(self):
        if "://" not in self.path and self._holder() == f"{socket.gethostname()} {os.getpid()}":
            os.remove(self.path)


class _StopOnSignal:
    """SIGTERM (preemption) or SIGINT: finish the current execution, checkpoint, stop.

    A second signal stops at once (KeyboardInterrupt), without a checkpoint.
    """

    def __init__(self, signals):
        self.requested = None  # The signal's name once one came.
        self.saved = False  # True if the PreemptionCheckpointHandler already saved.
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # Not the main thread (e.g. under a test runner thread).
                pass

    def _handle(self, signum, frame):
        del frame
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def stop(self, name, saved):
        self.requested, self.saved = name, saved

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _weights_by_path(model):
    """The model's variables keyed by their Keras path ('block/kernel'), which names them in checkpoints.

    Paths come from the gin declaration's block names, so they survive a change
    of resolution and let `transfer_weights` match variables by name.
    """
    weights = {}
    for w in model.weights:
        if w.path in weights:
            raise UserError(f"Two variables of the network share the path {w.path!r}: give its blocks unique names.")
        weights[w.path] = w
    return weights


class _Writers:
    """TensorBoard writers for model_dir/train and model_dir/val (no-ops on workers other than the chief)."""

    def __init__(self, log_dir, chief):
        self._writers = {k: tf.summary.create_file_writer(os.path.join(log_dir, k)) if chief
                         else tf.summary.create_noop_writer() for k in ("train", "val")}

    def scalars(self, split, step, values):
        with self._writers[split].as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(name, value)

    def text(self, split, step, name, text):
        with self._writers[split].as_default(step=step):
            tf.summary.text(name, text)

    def image(self, split, step, name, grid):
        with self._writers[split].as_default(step=step):
            tf.summary.image(name, grid[None], max_outputs=1)

    def flush(self):
        for w in self._writers.values():
            w.flush()


class _Checkpoints:
    """The phase's checkpoints: the last `keep` in model_dir/checkpoints, the best by val top-1 in best/.

    Every worker of a MultiWorkerMirroredStrategy has to save; the chief's
    copies are the model directory's, the others go to model_dir/workertemp_<id>
    (one kept). Every worker resumes from the chief's copies. Under
    MultiWorkerMirroredStrategy, SIGTERM goes through tf.distribute's
    PreemptionCheckpointHandler, which makes every worker save at the same step.

    Creating it restores the latest checkpoint, if there is one (`resumed_from`).
    A constant learning rate comes from gin, not from the checkpoint: a rerun
    with a lower rate after a non-finite loss trains with the lower rate.
    """

    def __init__(self, checkpoint, model, optimizer, model_dir, keep, strategy, chief, stopper):
        directory = os.path.join(model_dir, "checkpoints")
        write_dir = model_dir if chief else os.path.join(model_dir, f"workertemp_{_task_id(strategy)}")
        self._latest = tf.train.CheckpointManager(checkpoint, os.path.join(write_dir, "checkpoints"),
                                                  keep if chief else 1)
        self._best = tf.train.CheckpointManager(checkpoint, os.path.join(write_dir, "best"), 1)
        self._model = model
        self._saved_step = None
        self.resumed_from = tf.train.latest_checkpoint(directory)
        learning_rate = _constant_learning_rate(optimizer)
        if self.resumed_from:
            try:
                checkpoint.restore(self.resumed_from).assert_existing_objects_matched()
            except (ValueError, AssertionError, tf.errors.OpError) as err:
                raise UserError(
                    f"{model_dir} holds checkpoints of another network or optimizer ({self.resumed_from}: "
                    f"{str(err).splitlines()[0][:300]}). Use a new --model_dir, or start from those weights "
                    "with train.init_from (and train.allow_partial_init = True).") from None
        self._preemption = None
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            # It restores the same checkpoint again and adds its run counter to `checkpoint`.
            self._preemption = tf.distribute.experimental.PreemptionCheckpointHandler(
                strategy.cluster_resolver, checkpoint, checkpoint_dir=directory,
                termination_config=tf.distribute.experimental.TerminationConfig(
                    exit_fn=lambda: stopper.stop("SIGTERM", saved=True)))
        if self.resumed_from and learning_rate is not None:
            optimizer.learning_rate = learning_rate

    @property
    def latest(self):
        return self._latest.latest_checkpoint

    def save(self, step, best=False):
        """Saves `step` (and as the best so far if `best`), after checking the weights are finite."""
        bad = [w.path for w in self._model.weights if not np.all(np.isfinite(w.numpy()))]
        if bad:
            raise UserError(f"The weights became non-finite ({', '.join(bad[:3])}, ...) by step {step}: "
                            f"the run stopped without saving them. The last good checkpoint is kept: "
                            f"{self.latest or 'none yet'}. Lower the learning rate and run the same command.")
        if step != self._saved_step:
            self._latest.save(checkpoint_number=step)
            self._saved_step = step
        if best:
            self._best.save(checkpoint_number=step)

    def save_if_preempted(self, step):
        """MultiWorkerMirroredStrategy: saves at the step the workers agreed on after a SIGTERM."""
        if self._preemption:
            self._preemption.save_checkpoint_if_preempted(checkpoint_number=step)


def _constant_learning_rate(optimizer):
    """The optimizer's learning rate if it is a constant (not a schedule), else None."""
    lr = getattr(optimizer, "inner_optimizer", optimizer).get_config()["learning_rate"]
    return lr if isinstance(lr, float) else None


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
        raise UserError(f"init_from = {init_from!r} holds no checkpoint to start this phase from.{run_first} "
                        "Or set train.init_from = None to start from scratch.")
    return path


def transfer_weights(weights, init_from, previous_phase=None, allow_partial=False):
    """Loads a previous phase's weights by name and returns a transfer report.

    Args:
      weights: {path: variable} of the model being trained (`_weights_by_path`).
      init_from: a model directory (its latest checkpoint) or a checkpoint path.
      previous_phase: gin file of the phase that writes `init_from` (for the error).
      allow_partial: accept variables missing from the checkpoint or of another shape.

    Returns:
      A multi-line report: variables restored, missing, shape mismatches, unused.

    Raises:
      UserError: no checkpoint at `init_from`, or a partial load not allowed.
    """
    path = find_init_checkpoint(init_from, previous_phase)
    reader = tf.train.load_checkpoint(path)
    stored = reader.get_variable_to_shape_map()
    key = lambda name: "weights/" + name.replace(".", "..").replace("/", ".S") + "/.ATTRIBUTES/VARIABLE_VALUE"
    restored, missing, mismatched = [], [], []
    for name, var in weights.items():
        k = key(name)
        if k not in stored:
            missing.append(name)
        elif list(stored[k]) != list(var.shape):
            mismatched.append(f"{name} {list(stored[k])} -> {list(var.shape)}")
        else:
            var.assign(reader.get_tensor(k))
            restored.append(name)
    used = {key(n) for n in restored}
    unused = [k for k in stored if k.startswith("weights/") and k not in used]
    report = (f"Transfer from {path}: {len(restored)} of {len(weights)} variables restored, "
              f"{len(missing)} missing from the checkpoint, {len(mismatched)} of another shape, "
              f"{len(unused)} checkpoint variables unused.")
    details = "".join(f"\n  missing: {n}" for n in missing[:20]) + "".join(f"\n  shape: {m}" for m in mismatched[:20])
    if (missing or mismatched) and not allow_partial:
        raise UserError(report + details
                        + "\nRefusing a partial load: set train.allow_partial_init = True to accept it.")
    return report + details


def _log_run_start(model_dir, writers, image_size, step, strategy, preview):
    """Operative gin config (file + TensorBoard text), network plan, a grid of augmented images."""
    from trainer.data import preview as preview_lib
    from trainer.models import plan

    config = gin.operative_config_str()
    with tf.io.gfile.GFile(os.path.join(model_dir, "operative_config.gin"), "w") as f:
        f.write(config)
    with tf.io.gfile.GFile(os.path.join(model_dir, "config.gin"), "w") as f:
        f.write(gin.config_str())
    writers.text("train", step, "config/operative_gin", _markdown_code(config))
    writers.text("train", step, "network/plan", _markdown_code(plan.plan_text(image_size)))
    logging.info("Replicas: %d (%s).", strategy.num_replicas_in_sync, type(strategy).__name__)
    if preview is not None:
        writers.image("train", step, "augmented_inputs", preview_lib.make_grid(preview))
    writers.flush()


def _markdown_code(text):
    return "\n".join("    " + line for line in text.splitlines())


class _CsvLog:
    """Appends one row of epoch metrics to model_dir/metrics.csv (as the reference's CSVLogger)."""

    def __init__(self, path):
        self.path = path

    def write(self, row):
        new = not tf.io.gfile.exists(self.path)
        with tf.io.gfile.GFile(self.path, "a") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()})


class _Progress:
    """A console progress line per epoch: a bar with ETA on a terminal, log lines otherwise."""

    def __init__(self, epoch, steps, batch_size, log_every_steps):
        self.epoch, self.steps, self.batch_size, self.log_every = epoch, steps, batch_size, log_every_steps
        self.tty = sys.stdout.isatty()
        self.last_logged = 0

    def update(self, done, means, images_per_second):
        eta = (self.steps - done) * self.batch_size / max(images_per_second, 1e-9)
        text = (f"epoch {self.epoch} {done}/{self.steps} loss {means['loss']:.4f} top1 {means['top1']:.4f} "
                f"{images_per_second:.0f} img/s ETA {eta:.0f}s")
        if self.tty:
            width = 30
            bar = "=" * int(width * done / self.steps)
            sys.stdout.write(f"\r[{bar:<{width}}] {text}")
            sys.stdout.flush()
        elif done - self.last_logged >= self.log_every or done == self.steps:
            self.last_logged = done
            logging.info("%s", text)

    def finish(self, train_means, val_means, seconds):
        if self.tty:
            sys.stdout.write("\n")
        logging.info("epoch %d done in %.1fs: train loss %.4f top1 %.4f | val loss %.4f top1 %.4f top5 %.4f",
                     self.epoch, seconds, train_means["loss"], train_means["top1"],
                     val_means["loss"], val_means["top1"], val_means["top5"])


def _steps_this_call(step, epoch_end, steps_per_execution, checkpoint_every_steps, stop_after_steps):
    """Steps of the next execution: at most `steps_per_execution`, never past an epoch end or a checkpoint."""
    n = min(steps_per_execution, epoch_end - step)
    if checkpoint_every_steps:
        n = min(n, checkpoint_every_steps - step % checkpoint_every_steps)
    if stop_after_steps is not None:
        n = min(n, max(1, stop_after_steps - step))
    return n


def _means(totals):
    count = max(float(totals[3]), 1.0)
    return {name: float(totals[i]) / count for i, name in enumerate(_METRICS)}


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


def _report_skipped(num_files, decoded, data_dir):
    """Logs the corrupt training images, when the count says so: one cached pass decoded each file once.

    (Without a cache the counter grows every epoch; a cache file from an earlier
    run leaves it at 0: then nothing can be said.)
    """
    if 0 < decoded < num_files:
        logging.warning("%d training images in %s could not be decoded and were skipped.",
                        num_files - decoded, data_dir)


def _export(model, model_dir):
    """The final model as model_dir/export/model.keras and a SavedModel in model_dir/export/saved_model."""
    export_dir = os.path.join(model_dir, "export")
    tf.io.gfile.makedirs(export_dir)
    model.save(os.path.join(export_dir, "model.keras"))
    model.export(os.path.join(export_dir, "saved_model"), verbose=False)
    logging.info("Exported %s/model.keras and %s/saved_model.", export_dir, export_dir)
