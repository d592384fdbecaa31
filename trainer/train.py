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
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from trainer import checkpoints as checkpoints_lib
from trainer import epoch_log
from trainer import optim
from trainer import run_dir
from trainer import steps
from trainer import strategy as strategy_lib
from trainer import summaries
from trainer.cli import Interrupted
from trainer.errors import UserError
from trainer.models import blocks, builder, plan
from trainer.registry import configurable

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
          precise_bn="auto",
          precise_bn_images=1024,
          resume_from=None,
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
        cached per dataset, see `trainer.data.scan`).
      precise_bn: recompute every BatchNorm layer's moving statistics from training batches before each
        evaluation (pycls's precise BN; `steps.PreciseBatchNorm`), so the evaluated, checkpointed and exported
        weights carry them. True, False, or 'auto': on when an epoch is too short for the BatchNorm momentum m
        to settle, i.e. m ** steps_per_epoch > 5% (0.99 needs 300 steps an epoch; `steps.precise_bn_decision`).
      precise_bn_images: training images (augmented, from the training stream) the statistics are computed
        from, rounded up to whole batches and at most one epoch.
      resume_from: a checkpoint of this phase to resume from instead of the newest one (e.g. when
        checkpoints/checkpoint, the index, was lost: the refusal names the newest intact checkpoint).
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
    _check_run_settings(select_best_by, keep_checkpoints, early_stopping_patience)
    if not model_dir:
        raise UserError("No model directory: set MODEL_DIR in the gin file or pass --model_dir.")
    model_dir = os.path.expanduser(model_dir)
    resume_path = checkpoints_lib.resume_point(model_dir, resume_from)
    resuming = bool(resume_path)
    settings = run_dir.settings(data, num_classes)
    if resuming:
        run_dir.check_resumable(model_dir, settings)
    if init_from and not resuming:
        init_from = checkpoints_lib.find_init_checkpoint(os.path.expanduser(init_from), previous_phase)
    run_dir.makedirs(model_dir)
    with run_dir.disk_errors(model_dir), run_dir.claimed(model_dir, distribution) as (lock, signals), \
            _precision(mixed_precision):
        data.pin(model_dir)  # A source's own validation split stays the same when the run resumes.
        if distribution.chief:  # (Resuming, the check above found it equal.)
            run_dir.write_text(os.path.join(model_dir, run_dir.SETTINGS_FILE), json.dumps(settings, indent=1) + "\n")
            run_dir.write_data_settings(model_dir, data)
        network_plan = plan.make_plan(data.image_size)
        if check_memory:  # Before anything is decoded.
            plan.check_memory(network_plan, data, distribution.strategy.num_replicas_in_sync)
        report = None
        if distribution.chief and scan_data:
            report = summaries.data_report(data, model_dir, share_decode=not distribution.multi_worker)
        if seed is not None:
            keras.utils.set_random_seed(seed)
        if deterministic_ops:
            tf.config.experimental.enable_op_determinism()

        # --- 2. Network, optimizer, counters, under the strategy. -------------------------------------------------
        steps_per_epoch, total_steps = data.steps_per_epoch, epochs * data.steps_per_epoch
        with distribution.strategy.scope(), blocks.synchronized_batch_norm(distribution.synchronized_batch_norm):
            model = builder.build_network(data.image_size)
            _check_output(model, num_classes)
            if evaluate_best:
                _check_gradcam_layer(model)
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
        train_steps, evaluate = steps.build_steps(distribution.strategy, model, opt, step, data.batch_size, num_classes,
                                            loss(num_classes=num_classes), jit_compile)
        writers = summaries.Writers(model_dir, distribution.chief)
        precise, precise_reason = steps.precise_bn_decision(precise_bn, model, steps_per_epoch)
        if precise:
            precise_batches = min(steps_per_epoch, max(1, -(-precise_bn_images // data.batch_size)))
            recompute_bn = steps.PreciseBatchNorm(distribution.strategy, model, precise_batches)
            logging.info("Precise BatchNorm: on (%s): statistics recomputed from %d training batches before each "
                         "evaluation.", precise_reason, precise_batches)
        else:
            recompute_bn = None
            logging.info("Precise BatchNorm: off (%s).", precise_reason)

        # --- 3. Resume this phase, or start it from the previous one. ---------------------------------------------
        resumed_from = checkpoints.restore(resume_path)
        if plateau:
            opt.learning_rate = float(plateau.rate.numpy())  # Where the restored plateau had brought it.
        elif resumed_from and isinstance(learning_rate, float):
            opt.learning_rate = learning_rate  # A constant rate comes from gin: a rerun may lower it.
        done = int(step.numpy())  # Steps done in this phase (the host's copy of `step`).
        rows = json.loads(history.numpy().decode())
        offset = epoch_log.step_offset(init_from if not resumed_from else None, rows, first_epoch, steps_per_epoch)
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
        readable = report and report["splits"]["train"]["images"] - len(report["splits"]["train"]["unreadable"])
        summaries.banner(data, summaries.network_summary(model, network_plan), distribution, model_dir, epochs,
                         first_epoch, start, readable_train=readable)
        commit = functools.partial(epoch_log.commit, history=history, checkpoints=checkpoints, writers=writers,
                                   model_dir=model_dir, chief=distribution.chief, metric=select_best_by)
        if done % steps_per_epoch == 0 and 0 < done and not any(r["step"] == done for r in rows):
            # A checkpoint landed on an epoch's last step but the run died before the epoch was committed.
            if recompute_bn:  # As the epoch's end would have (a stream of its own: the training one starts below).
                recompute_bn(iter(distribution.strategy.distribute_datasets_from_function(
                    lambda ctx: data.train(ctx, resume_step=done))))
            row = epoch_log.new_row(first_epoch + done // steps_per_epoch - 1, done, offset, None,
                                    steps.means(evaluate(val_data)), 0.0, _current_lr(opt))
            rows = commit(rows, row, plateau_rate=plateau.update(row) if plateau else None, opt=opt)
        train_data = iter(distribution.strategy.distribute_datasets_from_function(
            lambda ctx: data.train(ctx, resume_step=done, decoded_counter=decoded))) if done < total_steps else None
        # At a phase's start, a batch shows what the augmentation does (every worker takes it; none trains on it).
        preview = summaries.first_images(distribution.strategy, next(train_data)) if done == 0 and train_data else None
        if distribution.chief:
            summaries.write_run_start(model_dir, writers, network_plan, offset + done, preview, data)
            epoch_log.republish(model_dir, rows, checkpoints, select_best_by, writers)  # After a crash.
        if init_from and not resumed_from and done == 0:
            carried = steps.means(evaluate(val_data))
            writers.scalars("val", offset, carried)
            logging.info("Carried-over weights at %d px, before training: val loss %.4f, top-1 %.4f, top-%d %.4f.",
                         data.image_size, carried["loss"], carried["top1"], steps.top_k(data.num_classes),
                         carried["top5"])
        # --- 4. The loop. ---------------------------------------------------------------------------------------
        compiled = False
        while done < total_steps:
            epoch = done // steps_per_epoch
            epoch_end = (epoch + 1) * steps_per_epoch
            epoch_start = time.time()
            progress = summaries.Progress(first_epoch + epoch, first_epoch + epochs - 1, steps_per_epoch,
                                          data.batch_size, log_every_steps, top_k=steps.top_k(data.num_classes))
            epoch_totals = np.zeros(4)
            while done < epoch_end:
                n = steps.steps_this_call(done, epoch_end, steps_per_execution, checkpoint_every_steps,
                                          stop_after_steps)
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
                    signals.immediate = False  # The stop is under way: no second raise during the save.
                    if int(step.numpy()) == done:
                        raise signals.before_training() from None  # While tracing: no step ran.
                    return _stop(signals, checkpoints, writers, int(step.numpy()), first_epoch + epoch, model_dir)
                signals.immediate = False  # From here on a signal stops after the current execution.
                images_per_second = n * data.batch_size / (time.time() - call_start) if compiled else None
                compiled = True
                done = int(step.numpy())
                steps.check_finite(totals, done, n, checkpoints.latest)
                checkpoints.save_if_preempted(done)
                if lock:
                    lock.heartbeat()
                epoch_totals += totals
                progress.update(done - epoch * steps_per_epoch, steps.means(epoch_totals), images_per_second)
                writers.scalars("train", offset + done, {**steps.means(totals), "learning_rate": _current_lr(opt),
                                                         **({"images_per_second": images_per_second}
                                                            if images_per_second else {})})
                if checkpoint_every_steps and done % checkpoint_every_steps == 0 and done < epoch_end:
                    checkpoints.save(done)  # (At an epoch's end the commit saves, with the epoch's row.)
                if done < epoch_end and _should_stop(signals, done, stop_after_steps):
                    return _stop(signals, checkpoints, writers, done, first_epoch + epoch, model_dir)
            # End of epoch: evaluate, then commit the epoch (checkpoint first, then what derives from it).
            if recompute_bn:
                recompute_bn(train_data)
            val_totals = evaluate(val_data).numpy()
            val = steps.means(val_totals)
            if lock:
                lock.heartbeat()  # (The model directory is still there.)
            row = epoch_log.new_row(first_epoch + epoch, done, offset, steps.means(epoch_totals), val,
                                    time.time() - epoch_start, _current_lr(opt))
            rows = commit(rows, row, plateau_rate=plateau.update(row) if plateau else None, opt=opt)
            progress.finish(steps.means(epoch_totals), val, time.time() - epoch_start)
            collapsed = steps.collapse(val_totals, steps.means(epoch_totals)["loss"], num_classes)
            if collapsed:
                logging.warning("%s", steps.collapse_warning(collapsed, bool(recompute_bn)))
            if first_epoch + epoch == first_epoch and not distribution.multi_worker and data.memory_mode()[0]:
                _report_skipped(data.num_train, int(decoded.numpy()), data.source.location, readable)
            if done < total_steps and _should_stop(signals, done, stop_after_steps):
                return _stop(signals, checkpoints, writers, done, first_epoch + epoch, model_dir)
            since_best = len(rows) - 1 - rows.index(epoch_log.best_row(rows, select_best_by))
            if early_stopping_patience and since_best >= early_stopping_patience:
                logging.info("Early stop: %d epochs without a better %s.", since_best, select_best_by)
                break

        # --- 5. The phase is done: export the best checkpoint and evaluate it in depth. -------------------------
        # Both derive from checkpoints: a signal now stops at once, and the next run redoes what is missing.
        signals.immediate, signals.stage = True, "the phase's export and evaluation"
        best = epoch_log.best_row(rows, select_best_by)
        exported = None
        if best and distribution.chief and (export or evaluate_best) and not checkpoints.best:
            logging.warning("No best checkpoint in %s/best (see above): the export and evaluation are skipped.",
                            model_dir)
            best = None
        try:
            if best and distribution.chief and export:
                exported = _export(model_dir, data, checkpoints.best)
            _raise_if_signalled(signals)
            if best and distribution.chief and evaluate_best:
                from trainer.evaluation import evaluator  # pylint: disable=import-outside-toplevel

                evaluator.evaluate_best_of_phase(model_dir, data, model=model, strategy=distribution)
            _raise_if_signalled(signals)
        except Exception:  # pylint: disable=broad-except
            _raise_if_signalled(signals)  # (Raised inside TensorFlow, which may have wrapped or swallowed it.)
            raise
        writers.flush()
        summaries.end_summary(model_dir, best, exported, top_k=steps.top_k(data.num_classes))
        return best


# --- Helpers, in the order `train` uses them ----------------------------------------------------------------------


def _check_settings(data, num_classes, distribution, steps_per_execution, checkpoint_every_steps):
    if data.num_classes != num_classes:
        raise UserError(f"NUM_CLASSES is {num_classes} but the {data.source.kind} dataset at {data.source.location} "
                        f"has {data.num_classes} classes: set NUM_CLASSES = {data.num_classes}.")
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


def _raise_if_signalled(signals):
    if signals.received:
        raise signals.before_training() from None


def _export(model_dir, data, best):
    """Exports `best` into model_dir/export, unless the export there is already of it (a finished phase's rerun)."""
    from trainer import export as export_lib  # pylint: disable=import-outside-toplevel

    export_dir = os.path.join(model_dir, "export")
    try:
        with open(os.path.join(export_dir, export_lib.METADATA_FILE), encoding="utf-8") as f:
            current = json.load(f)["source"]["checkpoint"] == best
    except (OSError, ValueError, KeyError, TypeError):
        current = False
    if current:
        logging.info("The export in %s is already of %s: not redone.", export_dir, best)
        return export_dir
    return export_lib.export_trained(model_dir, data)["export_dir"]


def _check_run_settings(select_best_by, keep_checkpoints, early_stopping_patience):
    if select_best_by not in epoch_log.VAL_METRICS:
        raise UserError(f"trainer.train.select_best_by is {select_best_by!r}: expected one of "
                        f"{', '.join(map(repr, epoch_log.VAL_METRICS))} (a val column of metrics.csv).")
    if not isinstance(keep_checkpoints, int) or keep_checkpoints < 1:
        raise UserError(f"trainer.train.keep_checkpoints is {keep_checkpoints!r}: expected an integer >= 1 (the "
                        "recent checkpoints kept; the best is kept apart, in best/).")
    if early_stopping_patience is not None and (not isinstance(early_stopping_patience, int)
                                                or early_stopping_patience < 0):
        raise UserError(f"trainer.train.early_stopping_patience is {early_stopping_patience!r}: expected None "
                        "(never stop early) or an integer >= 0 (epochs without a new best before the phase stops).")


def _check_gradcam_layer(model):
    """The end-of-phase evaluation's Grad-CAM block exists: checked before the first step, not after the phase."""
    from trainer.evaluation import evaluator, gradcam  # pylint: disable=import-outside-toplevel

    name = evaluator.gin_value("trainer.evaluate.gradcam_layer", None)
    if name is not None:
        gradcam.find_layer(model, name)


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


def _report_skipped(num_files, decoded, data_dir, readable=None):
    """Logs the training images of the first epoch that could not be read or decoded (and were skipped), unless
    the data check said so already (`readable`: the training images it could read)."""
    if 0 < decoded < num_files and decoded != readable:
        logging.warning("%d of %d training images in %s could not be read or decoded and were skipped.",
                        num_files - decoded, num_files, data_dir)
