"""The trainer's compiled steps: a training execution of N steps and one evaluation pass, under any strategy."""

import numpy as np
import tensorflow as tf

from trainer import optim
from trainer.errors import UserError


def top_k(num_classes):
    """The k of the 'top5' metric: 5, or every class when there are fewer (every line then names it top-k)."""
    return min(5, num_classes)


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
      num_classes: number of classes (top-5 becomes top-k with k = `top_k(num_classes)`).
      per_example_loss: `fn(labels, logits, training) -> [batch]`; default plain cross-entropy.
      jit_compile: compile the forward and backward pass with XLA.

    Returns:
      `(train_steps, evaluate)`. `train_steps(iterator, n)` runs `n` (an int32
      scalar tensor) training steps and adds `n` to `step`; `evaluate(dataset)`
      makes one pass over a distributed dataset. Both return a float32 tensor
      summed over steps and replicas: loss sum, top-1 hits, top-5 hits,
      examples (rows with an all-zero label, the evaluation padding, count for
      nothing); `train_steps` [4], `evaluate` [4 + num_classes]: then the
      number of examples predicted as each class (see `collapse`).

    Raises:
      UserError: `jit_compile` with synchronized BatchNorm over several replicas.
    """
    per_example_loss = per_example_loss or optim.cross_entropy(num_classes)
    if jit_compile and strategy.num_replicas_in_sync > 1 and any(
            getattr(layer, "synchronized", False) for layer in model.layers):
        raise UserError("trainer.train.jit_compile = True cannot compile synchronized BatchNorm over "
                        f"{strategy.num_replicas_in_sync} replicas (its all-reduce would sit inside the XLA "
                        "function): turn one of them off.")

    def totals_and_loss(images, labels, training, predicted=False):
        logits = tf.cast(model(images, training=training), tf.float32)
        weight = tf.reduce_sum(labels, axis=-1)  # 0 for padding rows.
        per_example = per_example_loss(labels, logits, training=training)
        target = tf.argmax(labels, axis=-1)
        top1 = tf.cast(tf.equal(tf.argmax(logits, axis=-1), target), tf.float32)
        top5 = tf.cast(tf.math.in_top_k(target, logits, k=top_k(num_classes)), tf.float32)
        totals = tf.stack([tf.reduce_sum(per_example * weight), tf.reduce_sum(top1 * weight),
                           tf.reduce_sum(top5 * weight), tf.reduce_sum(weight)])
        loss = totals[0] / batch_size
        if model.losses:  # The blocks' L2 terms, once over all replicas.
            loss += tf.add_n(model.losses) / strategy.num_replicas_in_sync
        if predicted:  # How many examples each class was predicted for.
            counts = tf.one_hot(tf.argmax(logits, axis=-1), num_classes, dtype=tf.float32) * weight[:, None]
            totals = tf.concat([totals, tf.reduce_sum(counts, axis=0)], axis=0)
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
        return totals_and_loss(*batch, training=False, predicted=True)[0]

    @tf.function
    def train_steps(iterator, num_steps):
        totals = tf.zeros([4])
        for _ in tf.range(num_steps):
            totals += strategy.reduce("SUM", strategy.run(train_step, args=(next(iterator),)), axis=None)
        step.assign_add(tf.cast(num_steps, tf.int64))
        return totals

    @tf.function
    def evaluate(data):
        totals = tf.zeros([4 + num_classes])
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
    totals = np.asarray(totals)[:4]
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


# --- Precise BatchNorm and a collapsed evaluation -------------------------------------------------------------------

#: `precise_bn = 'auto'` turns precise BatchNorm on when, after one epoch, more than this share of the moving
#: statistics still comes from before the epoch (momentum ** steps_per_epoch, the largest momentum of the network).
UNSETTLED_SHARE = 0.05


def batch_norm_layers(model):
    """The model's BatchNormalization layers (Ghost and synchronized ones too), nested ones included."""
    import keras  # pylint: disable=import-outside-toplevel

    return [layer for layer in model._flatten_layers(include_self=False)  # pylint: disable=protected-access
            if isinstance(layer, keras.layers.BatchNormalization)]


def precise_bn_decision(setting, model, steps_per_epoch):
    """Whether to recompute the BatchNorm statistics before evaluations, and why (one phrase).

    Args:
      setting: `trainer.train.precise_bn`: True, False or 'auto'.
      model: the network.
      steps_per_epoch: training steps per epoch.

    Returns:
      (on, reason). 'auto' is on when the largest BatchNorm momentum m leaves
      m ** steps_per_epoch > UNSETTLED_SHARE of the moving statistics from
      before the epoch: the moving averages have not forgotten the start of
      the epoch (nor the initial mean 0, variance 1 in the first epoch), while
      the weights they describe kept changing.

    Raises:
      UserError: a setting other than True, False or 'auto'.
    """
    if not (isinstance(setting, bool) or setting == "auto"):
        raise UserError(f"trainer.train.precise_bn must be True, False or 'auto', got {setting!r}.")
    layers = batch_norm_layers(model)
    if not layers:
        return False, "no BatchNorm layer"
    if setting == "auto":
        momentum = max(float(layer.momentum) for layer in layers)
        left = momentum ** steps_per_epoch
        on = left > UNSETTLED_SHARE
        return on, (f"auto: BatchNorm momentum {momentum:g} over {steps_per_epoch} steps an epoch keeps "
                    f"{left:.0%} of the statistics from before the epoch, {'more' if on else 'less'} than "
                    f"{UNSETTLED_SHARE:.0%}")
    return setting, "trainer.train.precise_bn = " + str(setting)


class PreciseBatchNorm:
    """Recomputes every BatchNorm layer's moving statistics from training batches (pycls's precise BN).

    Each batch runs forward in training mode with the layers' momentum at 0, so
    each layer's moving mean and variance become that batch's; the new moving
    mean is the mean of the batch means, the new moving variance the mean of
    the batch variances plus the variance of the batch means (the statistics
    of all the images together). No weight changes; the momentum is restored.
    """

    def __init__(self, strategy, model, num_batches):
        self.layers = batch_norm_layers(model)
        self.num_batches = num_batches

        def replica_forward(images, labels):
            del labels
            model(images, training=True)

        @tf.function
        def forward(iterator):
            strategy.run(replica_forward, args=next(iterator))

        self._forward = forward

    def __call__(self, iterator):
        """Takes `num_batches` batches from the (distributed) training iterator and sets the statistics."""
        momenta = [layer.momentum for layer in self.layers]
        means = [np.zeros(layer.moving_mean.shape, np.float64) for layer in self.layers]
        squares = [np.zeros_like(m) for m in means]
        variances = [np.zeros_like(m) for m in means]
        try:
            for layer in self.layers:
                layer.momentum = 0.0  # Read when the forward pass is traced: moving statistics = the batch's.
            for _ in range(self.num_batches):
                self._forward(iterator)
                for i, layer in enumerate(self.layers):
                    mean = np.asarray(layer.moving_mean.numpy(), np.float64)
                    means[i] += mean
                    squares[i] += mean ** 2
                    variances[i] += np.asarray(layer.moving_variance.numpy(), np.float64)
        finally:
            for layer, momentum in zip(self.layers, momenta):
                layer.momentum = momentum
        n = self.num_batches
        for i, layer in enumerate(self.layers):
            mean = means[i] / n
            layer.moving_mean.assign(mean.astype(np.float32))
            layer.moving_variance.assign((variances[i] / n + np.maximum(squares[i] / n - mean ** 2, 0.0))
                                         .astype(np.float32))


def collapse(val_totals, train_loss=None, num_classes=None):
    """Whether an evaluation collapsed, as a phrase (None if not).

    Collapsed: more than max(50%, 2.5 / classes) of the examples (at most 90%)
    predicted as one class, or a validation loss above both 5 x the training
    loss and ln(classes) (worse than predicting the uniform distribution).

    Args:
      val_totals: `evaluate`'s totals ([4 + classes]: the predicted-class counts last).
      train_loss: the epoch's mean training loss, or None.
      num_classes: the class count (default: from the totals).
    """
    totals = np.asarray(val_totals, np.float64)
    count = max(totals[3], 1.0)
    counts = totals[4:]
    num_classes = num_classes or len(counts)
    found = []
    if len(counts) and num_classes > 1:
        share = counts.max() / count
        if share > min(0.9, max(0.5, 2.5 / num_classes)):
            found.append(f"{share:.0%} of the images predicted as class {int(counts.argmax())}")
    loss = totals[0] / count
    if train_loss and num_classes and loss > 5 * train_loss and loss > np.log(max(num_classes, 2)):
        found.append(f"val loss {loss:.4g} is {loss / train_loss:.0f}x the training loss {train_loss:.4g}")
    return "; ".join(found) or None


def collapse_warning(what, precise_bn):
    """The one-line warning for a collapsed evaluation: what was seen, the likely cause, the gin setting."""
    if precise_bn:
        cause = ("the BatchNorm statistics were recomputed (precise BN), so the weights themselves are likely off: "
                 "a learning rate too high for this network, or too few steps yet; lower the optimizer's "
                 "learning_rate or train longer")
    else:
        cause = ("likely cause: BatchNorm moving statistics that have not settled (epochs too short for the "
                 "momentum); set trainer.train.precise_bn = True (or a lower trainer.blocks.batch_norm.momentum, "
                 "e.g. 0.9)")
    return f"Collapsed evaluation: {what}; {cause}."
