"""Images/s of the trainer's training step next to Keras `model.fit`, same network, same batch, one run.

    python benchmarks/train_step.py
    python benchmarks/train_step.py --models=gin/models/small.gin --image_size=64 --batch_size=64

For each gin model file, two copies of the network start from the same
weights: one trains with `trainer.steps.build_steps` (the trainer's compiled
step: `steps_per_execution` steps per `tf.function` call under the default
strategy, on a `distribute_datasets_from_function` iterator, as `train()` runs
it), the other with `model.fit` compiled with the same optimizer (Adam 1e-3,
epsilon 1e-8), the same loss and the same metrics (top-1, top-5), the same
`steps_per_execution`, `jit_compile=False`. Both read the same in-memory
batches. Timed rounds alternate between the two (one fit epoch, then the same
number of trainer steps, from a fit callback), so a change of machine load hits
both; the first round of each is warm-up (tracing) and is not counted. The
table shows the median images/s over the timed rounds and trainer / fit, the
median of the speed ratios of adjacent rounds (>= 1: the trainer is at least
as fast).
"""

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position

from trainer import cli, config  # pylint: disable=wrong-import-position

flags.DEFINE_list("models", ["gin/models/small.gin", "gin/models/resnet18.gin"], "Gin model files to compare.")
flags.DEFINE_integer("image_size", 32, "Input side in pixels.")
flags.DEFINE_integer("batch_size", 32, "Batch size (the same for both).")
flags.DEFINE_integer("num_classes", 200, "NUM_CLASSES for the model files.")
flags.DEFINE_integer("steps_per_execution", 10, "Training steps per tf.function call (both).")
flags.DEFINE_integer("steps_per_round", 0, "Steps per timed round (0: enough for about 2 s, at least "
                     "steps_per_execution); a multiple of steps_per_execution.")
flags.DEFINE_integer("rounds", 7, "Timed rounds of each, after one warm-up round.")
FLAGS = flags.FLAGS


def _build(model_gin):
    """Two copies of the declared network with the same initial weights."""
    import gin  # pylint: disable=import-outside-toplevel
    import keras  # pylint: disable=import-outside-toplevel

    from trainer.models import builder  # pylint: disable=import-outside-toplevel

    gin.clear_config()
    cli.register_configurables()
    config.parse_gin([model_gin], defaults=[f"NUM_CLASSES = {FLAGS.num_classes}"])
    models = []
    for _ in range(2):
        keras.utils.set_random_seed(0)
        models.append(builder.build_network(FLAGS.image_size))
    return models


def _data():
    """Eight distinct in-memory batches, repeated: (images in [0, 1], one-hot labels)."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    n = 8 * FLAGS.batch_size
    images = tf.random.uniform([n, FLAGS.image_size, FLAGS.image_size, 3], seed=1)
    labels = tf.one_hot(tf.random.uniform([n], maxval=FLAGS.num_classes, dtype=tf.int32, seed=2),
                        FLAGS.num_classes)
    return (tf.data.Dataset.from_tensor_slices((images, labels)).batch(FLAGS.batch_size, drop_remainder=True)
            .cache().repeat().prefetch(2))


def _steps_per_round(trainer_round):
    """Calibrates the round length to about 2 s on the trainer (after its warm-up call)."""
    spe = FLAGS.steps_per_execution
    if FLAGS.steps_per_round:
        return max(spe, FLAGS.steps_per_round // spe * spe)
    trainer_round(spe)  # Warm-up: tracing.
    seconds = trainer_round(spe)
    return spe * max(1, round(2.0 / max(seconds, 1e-6)))


def compare(model_gin):
    """Returns (parameters, steps a round, trainer images/s, fit images/s, trainer / fit) for one model file.

    The speeds are medians over the timed rounds; the ratio is the median of the
    ratios of adjacent rounds (a fit epoch and the trainer round right after it),
    which a change of machine load between rounds does not skew.
    """
    import keras  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    from trainer import steps  # pylint: disable=import-outside-toplevel

    ours, theirs = _build(model_gin)
    dataset = _data()
    strategy = tf.distribute.get_strategy()

    optimizer = keras.optimizers.Adam(1e-3, epsilon=1e-8)
    optimizer.build(ours.trainable_variables)
    step = tf.Variable(0, dtype=tf.int64)
    train_steps, _ = steps.build_steps(strategy, ours, optimizer, step, FLAGS.batch_size, FLAGS.num_classes)
    iterator = iter(strategy.distribute_datasets_from_function(lambda ctx: dataset))

    def trainer_round(num_steps):
        start = time.perf_counter()
        for _ in range(num_steps // FLAGS.steps_per_execution):
            train_steps(iterator, tf.constant(FLAGS.steps_per_execution, tf.int32)).numpy()
        return time.perf_counter() - start

    steps = _steps_per_round(trainer_round)
    theirs.compile(optimizer=keras.optimizers.Adam(1e-3, epsilon=1e-8),
                   loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                   metrics=["categorical_accuracy", keras.metrics.TopKCategoricalAccuracy(5)],
                   steps_per_execution=FLAGS.steps_per_execution, jit_compile=False)

    class Alternate(keras.callbacks.Callback):
        """Times each fit epoch, then runs and times a trainer round of the same length."""

        def __init__(self):
            super().__init__()
            self.fit_seconds, self.trainer_seconds, self._start = [], [], 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.fit_seconds.append(time.perf_counter() - self._start)
            self.trainer_seconds.append(trainer_round(steps))

    timer = Alternate()
    theirs.fit(dataset, epochs=FLAGS.rounds + 1, steps_per_epoch=steps, shuffle=False, verbose=0, callbacks=[timer])
    images = steps * FLAGS.batch_size
    trainer_rate = statistics.median(images / s for s in timer.trainer_seconds[1:])
    fit_rate = statistics.median(images / s for s in timer.fit_seconds[1:])
    ratio = statistics.median(f / t for f, t in zip(timer.fit_seconds[1:], timer.trainer_seconds[1:]))
    return ours.count_params(), steps, trainer_rate, fit_rate, ratio


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    rows = []
    for model_gin in FLAGS.models:
        params, steps, trainer_rate, fit_rate, ratio = compare(model_gin)
        rows.append((os.path.basename(model_gin), f"{params:,}", f"{steps}", f"{trainer_rate:.1f}",
                     f"{fit_rate:.1f}", f"{ratio:.3f}"))
    header = ("model", "params", "steps/round", "trainer img/s", "model.fit img/s", "trainer / fit")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    print(f"\nTraining step, {FLAGS.image_size} px, batch {FLAGS.batch_size}, steps_per_execution "
          f"{FLAGS.steps_per_execution}, medians of {FLAGS.rounds} alternating rounds after one warm-up "
          f"(TF {tf.__version__}, {os.cpu_count()} CPUs):\n")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


if __name__ == "__main__":
    cli.run(main)
