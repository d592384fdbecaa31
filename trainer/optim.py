"""Optimizers, learning-rate schedules and losses, each a gin configurable referenced from gin.

A runnable gin file picks them by reference, and sets their arguments:

    trainer.train.optimizer = @trainer.optim.adam
    trainer.train.schedule = @trainer.optim.cosine
    trainer.optim.cosine.learning_rate = 2e-3
    trainer.optim.cosine.warmup_epochs = 5

A schedule is called with the phase's length and returns a learning rate (a
float or a `keras.optimizers.schedules.LearningRateSchedule`); an optimizer
is called with that learning rate. Adding one is adding a function here.
"""

import math

import keras
import tensorflow as tf

from trainer.errors import UserError
from trainer.registry import configurable

# Variables that decoupled weight decay skips by default: BatchNorm's scale and
# offset and every bias (matched against the variable's name).
NO_DECAY = ("gamma", "beta", "bias")


def _positive(name, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or math.isinf(value):
        raise UserError(f"{name} must be a positive number, got {value!r}.")


# --- Schedules: fn(steps_per_epoch, epochs) -> learning rate ---------------------------------------------


@configurable("trainer.optim", denylist=["steps_per_epoch", "epochs"])
def constant(steps_per_epoch, epochs, learning_rate=1e-3):
    """A constant learning rate (the reference: 1e-3 in every phase).

    Args:
      steps_per_epoch: training steps in an epoch (from the data).
      epochs: epochs in the phase.
      learning_rate: the rate.

    Returns:
      The float `learning_rate`.
    """
    del steps_per_epoch, epochs
    _positive("trainer.optim.constant.learning_rate", learning_rate)
    return float(learning_rate)


@configurable("trainer.optim", denylist=["steps_per_epoch", "epochs"])
def step(steps_per_epoch, epochs, learning_rate=0.1, boundaries=(30, 60, 90), factor=0.1):
    """Piecewise constant: multiplied by `factor` at each boundary epoch.

    Args:
      steps_per_epoch: training steps in an epoch.
      epochs: epochs in the phase.
      learning_rate: the rate before the first boundary.
      boundaries: epochs (counted from the phase's start) at which the rate drops.
      factor: what each drop multiplies the rate by.

    Returns:
      A `PiecewiseConstantDecay` over steps.
    """
    del epochs
    _positive("trainer.optim.step.learning_rate", learning_rate)
    if list(boundaries) != sorted(boundaries) or any(b <= 0 for b in boundaries):
        raise UserError(f"trainer.optim.step.boundaries must be increasing positive epochs, got {boundaries!r}.")
    values = [float(learning_rate * factor**i) for i in range(len(boundaries) + 1)]
    # Keras keeps values[i] while step <= boundaries[i]: the drop lands on the boundary epoch's first step.
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        [int(b * steps_per_epoch) - 1 for b in boundaries], values)


@configurable("trainer.optim", denylist=["steps_per_epoch", "epochs"])
def exponential(steps_per_epoch, epochs, learning_rate=1e-3, decay_per_epoch=0.97, staircase=False):
    """Exponential decay: the rate is multiplied by `decay_per_epoch` every epoch.

    Args:
      steps_per_epoch: training steps in an epoch.
      epochs: epochs in the phase.
      learning_rate: the initial rate.
      decay_per_epoch: the factor per epoch, in (0, 1].
      staircase: drop once per epoch instead of smoothly.

    Returns:
      An `ExponentialDecay` over steps.
    """
    del epochs
    _positive("trainer.optim.exponential.learning_rate", learning_rate)
    if not 0 < decay_per_epoch <= 1:
        raise UserError(f"trainer.optim.exponential.decay_per_epoch must be in (0, 1], got {decay_per_epoch!r}.")
    return keras.optimizers.schedules.ExponentialDecay(
        learning_rate, decay_steps=steps_per_epoch, decay_rate=decay_per_epoch, staircase=staircase)


@configurable("trainer.optim", denylist=["steps_per_epoch", "epochs"])
def cosine(steps_per_epoch, epochs, learning_rate=1e-3, warmup_epochs=0.0, end_fraction=0.0):
    """Linear warm-up from 0, then cosine decay to `end_fraction` of the peak at the phase's end.

    Args:
      steps_per_epoch: training steps in an epoch.
      epochs: epochs in the phase.
      learning_rate: the peak rate.
      warmup_epochs: warm-up length in epochs (may be fractional).
      end_fraction: the final rate as a fraction of the peak.

    Returns:
      A `CosineDecay` over steps.
    """
    _positive("trainer.optim.cosine.learning_rate", learning_rate)
    warmup = int(warmup_epochs * steps_per_epoch)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else learning_rate,
        decay_steps=max(1, epochs * steps_per_epoch - warmup),
        alpha=end_fraction,
        warmup_target=learning_rate if warmup else None,
        warmup_steps=warmup)


class Plateau(tf.Module):
    """A learning rate lowered when a validation metric stops improving; its state is checkpointed.

    The trainer calls `update(row)` with each epoch's metrics (before the epoch's
    checkpoint, which holds this object), and sets the optimizer's rate to the result.
    """

    def __init__(self, learning_rate, metric, factor, patience, min_delta, cooldown, min_learning_rate):
        super().__init__(name="plateau")
        self.metric, self.factor, self.patience = metric, factor, patience
        self.min_delta, self.cooldown, self.min_learning_rate = min_delta, cooldown, min_learning_rate
        self.maximise = not metric.endswith("loss")
        self.rate = tf.Variable(float(learning_rate), trainable=False, name="rate")
        self.best = tf.Variable(-math.inf if self.maximise else math.inf, trainable=False, name="best")
        self.wait = tf.Variable(0, trainable=False, name="wait")
        self.cooling = tf.Variable(0, trainable=False, name="cooling")

    def update(self, row):
        """Takes an epoch's metrics row; returns the learning rate for the next epoch."""
        if self.metric not in row:
            raise UserError(f"trainer.optim.reduce_on_plateau.metric is {self.metric!r}, but an epoch's metrics are "
                            f"{', '.join(sorted(row))}.")
        value, best = float(row[self.metric]), float(self.best.numpy())
        improved = value > best + self.min_delta if self.maximise else value < best - self.min_delta
        if int(self.cooling.numpy()) > 0:  # Keras's ReduceLROnPlateau, step by step.
            self.cooling.assign_sub(1)
            self.wait.assign(0)
        if improved:
            self.best.assign(value)
            self.wait.assign(0)
        elif int(self.cooling.numpy()) == 0:
            self.wait.assign_add(1)
            if int(self.wait.numpy()) >= self.patience:
                self.rate.assign(max(float(self.rate.numpy()) * self.factor, self.min_learning_rate))
                self.wait.assign(0)
                self.cooling.assign(self.cooldown)
        return float(self.rate.numpy())


@configurable("trainer.optim", denylist=["steps_per_epoch", "epochs"])
def reduce_on_plateau(steps_per_epoch, epochs, learning_rate=1e-3, metric="val_loss", factor=0.1, patience=10,
                      min_delta=1e-4, cooldown=0, min_learning_rate=0.0):
    """Keras's ReduceLROnPlateau as a schedule: the rate drops by `factor` after `patience` epochs without progress.

    The same rules as `keras.callbacks.ReduceLROnPlateau`, applied at each epoch end.

    Args:
      steps_per_epoch: training steps in an epoch.
      epochs: epochs in the phase.
      learning_rate: the initial rate.
      metric: an epoch metric of metrics.csv: 'val_loss' (lower is better), 'val_top1', 'val_top5'.
      factor: what each drop multiplies the rate by, in (0, 1).
      patience: epochs without an improvement larger than `min_delta` before a drop.
      min_delta: the smallest change that counts as an improvement.
      cooldown: epochs after a drop during which no epoch counts against patience.
      min_learning_rate: the rate never drops below this.

    Returns:
      A `Plateau` (the trainer checkpoints its state, so a resumed run continues it).
    """
    del steps_per_epoch, epochs
    _positive("trainer.optim.reduce_on_plateau.learning_rate", learning_rate)
    if metric not in ("val_loss", "val_top1", "val_top5"):
        raise UserError(f"trainer.optim.reduce_on_plateau.metric is {metric!r}: expected 'val_loss', 'val_top1' or "
                        "'val_top5' (a val column of metrics.csv).")
    if not 0 < factor < 1 or patience < 1:
        raise UserError(f"trainer.optim.reduce_on_plateau needs 0 < factor < 1 and patience >= 1, got factor "
                        f"{factor!r}, patience {patience!r}.")
    return Plateau(learning_rate, metric, factor, patience, min_delta, cooldown, min_learning_rate)


# --- Optimizers: fn(learning_rate) -> keras optimizer ---------------------------------------------------


def _decay(optimizer, weight_decay, skip):
    if weight_decay and skip:
        optimizer.exclude_from_weight_decay(var_names=list(skip))
    return optimizer


@configurable("trainer.optim", denylist=["learning_rate"])
def adam(learning_rate, beta_1=0.9, beta_2=0.999, epsilon=1e-8, amsgrad=False, use_ema=False,
         clipnorm=None):
    """Adam (the reference's: TF1 AdamOptimizer, epsilon 1e-8).

    Args:
      learning_rate: from the schedule.
      beta_1: first-moment decay.
      beta_2: second-moment decay.
      epsilon: added to the denominator (TF1's default 1e-8; Keras's is 1e-7).
      amsgrad: use AMSGrad.
      use_ema: keep an exponential moving average of the weights.
      clipnorm: clip each gradient to this norm (None: no clipping).

    Returns:
      A `keras.optimizers.Adam`.
    """
    return keras.optimizers.Adam(learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, amsgrad=amsgrad,
                                 use_ema=use_ema, clipnorm=clipnorm)


@configurable("trainer.optim", denylist=["learning_rate"])
def adamw(learning_rate, weight_decay=0.05, beta_1=0.9, beta_2=0.999, epsilon=1e-8, amsgrad=False,
          skip_decay=NO_DECAY, use_ema=False, clipnorm=None):
    """AdamW: Adam with decoupled weight decay.

    Args:
      learning_rate: from the schedule.
      weight_decay: decoupled weight decay.
      beta_1: first-moment decay.
      beta_2: second-moment decay.
      epsilon: added to the denominator.
      amsgrad: use AMSGrad.
      skip_decay: variable-name substrings weight decay skips (default: BatchNorm's and biases).
      use_ema: keep an exponential moving average of the weights.
      clipnorm: clip each gradient to this norm.

    Returns:
      A `keras.optimizers.AdamW`.
    """
    return _decay(keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay, beta_1=beta_1, beta_2=beta_2,
                                         epsilon=epsilon, amsgrad=amsgrad, use_ema=use_ema, clipnorm=clipnorm),
                  weight_decay, skip_decay)


@configurable("trainer.optim", denylist=["learning_rate"])
def sgd(learning_rate, momentum=0.9, nesterov=False, weight_decay=0.0, skip_decay=NO_DECAY, use_ema=False,
        clipnorm=None):
    """SGD with momentum and optional decoupled weight decay.

    Args:
      learning_rate: from the schedule.
      momentum: momentum.
      nesterov: Nesterov momentum.
      weight_decay: decoupled weight decay (0: none).
      skip_decay: variable-name substrings weight decay skips.
      use_ema: keep an exponential moving average of the weights.
      clipnorm: clip each gradient to this norm.

    Returns:
      A `keras.optimizers.SGD`.
    """
    return _decay(keras.optimizers.SGD(learning_rate, momentum=momentum, nesterov=nesterov,
                                       weight_decay=weight_decay or None, use_ema=use_ema, clipnorm=clipnorm),
                  weight_decay, skip_decay)


# --- Losses: fn(num_classes) -> per_example(labels, logits) ----------------------------------------------


@configurable("trainer.optim", denylist=["num_classes"])
def cross_entropy(num_classes, label_smoothing=0.0, class_weights=None):
    """Softmax cross-entropy per example, optionally smoothed and class-weighted.

    Args:
      num_classes: classes of the dataset.
      label_smoothing: in [0, 1).
      class_weights: None; one weight per class (in wnids.txt order) that
        multiplies the loss of that class's examples; or the path of a previous
        run's evaluation report (model_dir/eval/<checkpoint>/report.json), whose
        per-class validation accuracy sets the weights (`weights_from_report`).

    Returns:
      `per_example(labels, logits) -> [batch]` for one-hot (or mixed) labels.
    """
    if not 0 <= label_smoothing < 1:
        raise UserError(f"trainer.optim.cross_entropy.label_smoothing must be in [0, 1), got {label_smoothing!r}.")
    weights = None
    if isinstance(class_weights, str):
        class_weights = weights_from_report(class_weights, num_classes)
    if class_weights is not None:
        if len(class_weights) != num_classes:
            raise UserError(f"trainer.optim.cross_entropy.class_weights has {len(class_weights)} weights for "
                            f"{num_classes} classes.")
        weights = tf.constant(class_weights, tf.float32)

    def per_example(labels, logits, training=True):
        loss = keras.losses.categorical_crossentropy(
            labels, logits, from_logits=True, label_smoothing=label_smoothing if training else 0.0)
        if weights is not None and training:
            loss *= tf.linalg.matvec(labels, weights)
        return loss

    return per_example


def weights_from_report(path, num_classes):
    """Class weights from an evaluation report: the classes a previous run got wrong weigh more.

    The weight of class c is 2 - accuracy_c, divided by the mean over classes
    (so the mean weight is 1): a class never recognised weighs twice as much as
    one always recognised.

    Args:
      path: a report.json written by `python -m trainer.evaluate` (or at a phase's end).
      num_classes: classes of the dataset (the report must have as many).

    Returns:
      A list of `num_classes` weights.

    Raises:
      UserError: the report is missing, unreadable or of another class count.
    """
    import json  # pylint: disable=import-outside-toplevel

    try:
        with tf.io.gfile.GFile(path) as f:
            per_class = json.load(f)["per_class"]
        accuracy = [float(row["accuracy"]) for row in sorted(per_class, key=lambda row: row["index"])]
    except (tf.errors.OpError, OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"trainer.optim.cross_entropy.class_weights = {path!r}: expected the report.json of "
                        f"python -m trainer.evaluate, could not read its per-class accuracy ({err}).") from None
    if len(accuracy) != num_classes:
        raise UserError(f"{path} has per-class accuracy for {len(accuracy)} classes; this dataset has {num_classes}.")
    raw = [2.0 - a for a in accuracy]
    mean = sum(raw) / len(raw)
    return [w / mean for w in raw]
