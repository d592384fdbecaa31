"""The trainer's compiled steps: a training execution of N steps and one evaluation pass, under any strategy."""

import numpy as np
import tensorflow as tf

from trainer import optim
from trainer.errors import UserError


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


def steps_this_call(step, epoch_end, steps_per_execution, checkpoint_every_steps, stop_after_steps):
    """Steps of the next execution: at most `steps_per_execution`, never past an epoch end or a checkpoint."""
    n = min(steps_per_execution, epoch_end - step)
    if checkpoint_every_steps:
        n = min(n, checkpoint_every_steps - step % checkpoint_every_steps)
    if stop_after_steps is not None:
        n = min(n, max(1, stop_after_steps - step))
    return n


def means(totals):
    """The [loss sum, top-1 hits, top-5 hits, count] totals as means (and the count)."""
    totals = np.asarray(totals)
    count = max(float(totals[3]), 1.0)
    return {"loss": float(totals[0]) / count, "top1": float(totals[1]) / count, "top5": float(totals[2]) / count,
            "count": int(totals[3])}


def check_finite(totals, step, num_steps, latest_checkpoint):
    """Stops the run (nothing saved) when the training loss is not finite."""
    if not np.all(np.isfinite(totals)):
        steps = f"at step {step}" if num_steps == 1 else f"in steps {step - num_steps + 1}-{step}"
        raise UserError(f"The training loss became {totals[0] / max(totals[3], 1.0)} (not finite) {steps}: the run "
                        f"stopped without saving. The last good checkpoint is kept: {latest_checkpoint or 'none yet'}. "
                        "Lower the learning rate (or check the data and augmentation) and run the same command to "
                        "resume from it.")
