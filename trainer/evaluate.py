"""Evaluates a checkpoint of a training run: `python -m trainer.evaluate --model_dir=runs/quickstart`.

    python -m trainer.evaluate --model_dir=D [--gin_file=F ...] [--gin_bindings=B ...]
                               [--checkpoint=best|latest|PATH] [--split=val|train] [--output_dir=DIR]

Flags:
  --model_dir     the run's model directory (overrides the gin macro MODEL_DIR).
  --gin_file      the run's gin files, repeatable (default: <model_dir>/operative_config.gin).
  --gin_bindings  gin bindings, repeatable, e.g. "trainer.evaluate.tta_flip = True".
  --checkpoint    'best' (default), 'latest' or a checkpoint path.
  --split         'val' (default) or 'train'.
  --output_dir    where the evaluation goes (default: <model_dir>/eval), e.g. for a read-only model directory.

The network, the data (`trainer.data`: resolution, batch size, resize method,
standardisation), the strategy (`trainer.train.strategy`; a multi-worker
run is evaluated on one machine) and the mixed-precision policy come from the
run's gin configuration.

Writes <output_dir>/<checkpoint name>/: report.json, report.md,
predictions.csv and a TensorBoard event file (confusion matrix, misclassified
images, Grad-CAM, reliability diagram, per-class table). The switches
(flip TTA, the Grad-CAM layer, how many images to show) are gin parameters of
`trainer.evaluate` (trainer/evaluation/evaluator.py).

The library lives in `trainer.evaluation.evaluator`, not here: `python -m`
runs this file as `__main__`, and a second copy of its gin configurables
would clash with the one the trainer imports.
"""

import os

from absl import flags
from absl import logging

from trainer import cli
from trainer.errors import UserError

FLAGS = flags.FLAGS


def main(argv):
    """The command line (see the module docstring)."""
    cli.no_arguments(argv)
    gin_files = list(FLAGS.gin_file or [])
    if not gin_files:
        if not FLAGS.model_dir:
            raise UserError("Give the run to evaluate: --model_dir=DIR of a training run (its operative_config.gin "
                            "is read) or --gin_file=FILE of its configuration; got neither.")
        gin_files = [os.path.join(os.path.expanduser(FLAGS.model_dir), "operative_config.gin")]
        if not os.path.exists(gin_files[0]):
            raise UserError(f"--model_dir={FLAGS.model_dir}: expected a training run's directory holding "
                            f"operative_config.gin, but {gin_files[0]} does not exist. Give --gin_file too.")
    from trainer import config  # pylint: disable=import-outside-toplevel

    cli.register_configurables()
    from trainer.evaluation import evaluator  # pylint: disable=import-outside-toplevel  (registers trainer.evaluate)

    config.parse_gin(gin_files, FLAGS.gin_bindings, model_dir=FLAGS.model_dir)
    report = run_evaluation(evaluator, FLAGS.model_dir, FLAGS.checkpoint, FLAGS.split, FLAGS.output_dir)
    if report["data"]["num_skipped"]:  # The result and where the reports are: the evaluator's log line.
        logging.warning("%d images could not be decoded and were skipped (listed in %s).",
                        report["data"]["num_skipped"], os.path.join(report["out_dir"], "report.json"))


def run_evaluation(evaluator, model_dir, checkpoint, split, output_dir=None):
    """Evaluates with gin parsed: the run's strategy (on one machine) and mixed-precision policy.

    Args:
      evaluator: the `trainer.evaluation.evaluator` module.
      model_dir: the run's directory, or None for gin's `trainer.train.model_dir`.
      checkpoint: 'best', 'latest' or a path.
      split: 'val' or 'train'.
      output_dir: where the evaluation goes; None: <model_dir>/eval.

    Returns:
      The report dict.

    Raises:
      UserError: no such checkpoint; the output directory cannot be written (checked before anything starts).
    """
    import gin  # pylint: disable=import-outside-toplevel
    import keras  # pylint: disable=import-outside-toplevel

    from trainer import checkpoints  # pylint: disable=import-outside-toplevel
    from trainer.data import pipeline  # pylint: disable=import-outside-toplevel

    model_dir = model_dir or evaluator.gin_value("trainer.train.model_dir", None)
    if not model_dir:
        raise UserError("No model directory: pass --model_dir (or bind MODEL_DIR in the gin files).")
    checkpoints.find_checkpoint(model_dir, checkpoint)  # A missing checkpoint fails before anything starts.
    output_dir = os.path.expanduser(output_dir) if output_dir else os.path.join(os.path.expanduser(model_dir), "eval")
    _check_writable(output_dir)
    distribution = None
    reference = evaluator.gin_value("trainer.train.strategy", None)
    # One process evaluates: a multi-worker run's strategy cannot start here.
    if isinstance(reference, gin.config.ConfigurableReference) and \
            reference.configurable.selector != "trainer.strategy.multi_worker":
        distribution = reference.scoped_configurable_fn()  # First: logical CPUs are set up before TensorFlow runs.
    data = pipeline.data()
    policy = keras.mixed_precision.global_policy()
    mixed = evaluator.gin_value("trainer.train.mixed_precision", None)
    try:
        if mixed:
            keras.mixed_precision.set_global_policy(mixed)
        return evaluator.evaluate_model_dir(model_dir, checkpoint, split, data=data, strategy=distribution,
                                            eval_dir=output_dir)
    finally:
        keras.mixed_precision.set_global_policy(policy)


def _check_writable(directory):
    """A directory the evaluation cannot write is one line before the evaluation runs, not a traceback after it."""
    if "://" in directory:
        return
    import tempfile  # pylint: disable=import-outside-toplevel

    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise UserError(f"Cannot write the evaluation to {directory}: {err.strerror or err}. Give a writable "
                        "--output_dir (its reports go to <output_dir>/<checkpoint name>/).") from None


def run():
    """Runs the command; `--help` exits 0 (absl's help flags exit 1)."""
    cli.define_gin_flags()
    flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a checkpoint path.")
    flags.DEFINE_enum("split", "val", ["val", "train"], "The split to evaluate.")
    flags.DEFINE_string("output_dir", None, "Where the evaluation goes (default: <model_dir>/eval).")
    cli.run(main, usage=lambda: __doc__)


if __name__ == "__main__":
    run()
