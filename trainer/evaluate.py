"""Evaluates a checkpoint of a training run: `python -m trainer.evaluate --model_dir=runs/quickstart`.

Flags:
  --gin_file      the run's gin files, repeatable (default: <model_dir>/operative_config.gin).
  --gin_bindings  gin bindings, repeatable, e.g. "evaluate_checkpoint.tta_flip = True".
  --model_dir     the run's model directory (overrides the gin macro MODEL_DIR).
  --checkpoint    'best' (default), 'latest' or a checkpoint path.
  --split         'val' (default) or 'train'.

Writes <model_dir>/eval/<checkpoint name>/: report.json, report.md,
predictions.csv and a TensorBoard event file (confusion matrix, misclassified
images, Grad-CAM, reliability diagram, per-class table). The switches
(flip TTA, the Grad-CAM layer, how many images to show) are gin parameters of
`evaluate_checkpoint` (trainer/evaluation/evaluator.py).

The library lives in `trainer.evaluation.evaluator`, not here: `python -m`
runs this file as `__main__`, and a second copy of its gin configurables
would clash with the one the trainer imports.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Keep TF's C++ start-up chatter off the console.

from absl import app  # pylint: disable=wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position

from trainer import config  # pylint: disable=wrong-import-position
from trainer.errors import UserError  # pylint: disable=wrong-import-position

flags.DEFINE_multi_string("gin_file", [], "The run's gin files (default: <model_dir>/operative_config.gin).")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, applied after the files.")
flags.DEFINE_string("model_dir", None, "The run's model directory (overrides the MODEL_DIR macro).")
flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a checkpoint path.")
flags.DEFINE_enum("split", "val", ["val", "train"], "The split to evaluate.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    gin_files = list(FLAGS.gin_file)
    if not gin_files:
        if not FLAGS.model_dir:
            raise UserError("Give the run to evaluate: --model_dir=DIR of a training run (its operative_config.gin "
                            "is read) or --gin_file=FILE of its configuration; got neither.")
        gin_files = [os.path.join(os.path.expanduser(FLAGS.model_dir), "operative_config.gin")]
        if not os.path.exists(gin_files[0]):
            raise UserError(f"--model_dir={FLAGS.model_dir}: expected a training run's directory holding "
                            f"operative_config.gin, but {gin_files[0]} does not exist. Give --gin_file too.")
    from trainer.evaluation import evaluator  # pylint: disable=import-outside-toplevel  (registers its gin names)

    config.parse_gin(gin_files, FLAGS.gin_bindings, FLAGS.model_dir)
    report = run_evaluation(evaluator, FLAGS.model_dir, FLAGS.checkpoint, FLAGS.split)
    m = report["metrics"]
    print(f"{report['checkpoint_name']} on {report['split']}: {report['data']['num_scored']} images, "
          f"loss {m['loss']:.4f}, top-1 {m['top1']:.4f}, top-{m['top_k']} {m['top5']:.4f}, ECE {m['ece']:.4f}")
    if report["data"]["num_skipped"]:
        print(f"{report['data']['num_skipped']} images could not be decoded and were skipped.")
    print(f"Reports: {report['out_dir']}")


def run_evaluation(evaluator, model_dir, checkpoint, split):
    """Evaluates with gin parsed: the run's strategy (one machine) and mixed-precision policy.

    Args:
      evaluator: the `trainer.evaluation.evaluator` module.
      model_dir: the run's directory, or None for gin's `train.model_dir`.
      checkpoint: 'best', 'latest' or a path.
      split: 'val' or 'train'.

    Returns:
      The report dict.
    """
    import keras  # pylint: disable=import-outside-toplevel

    from trainer import strategy as strategy_lib  # pylint: disable=import-outside-toplevel

    model_dir = model_dir or evaluator.gin_value("train.model_dir")
    evaluator.find_checkpoint(model_dir, checkpoint)  # A missing checkpoint fails before anything starts.
    kind = evaluator.gin_value("make_strategy.kind", "default")
    # One process evaluates: a multi-worker run's strategy cannot start here.
    strategy = strategy_lib.make_strategy() if kind != "multi_worker" else None
    policy = keras.mixed_precision.global_policy()
    mixed = evaluator.gin_value("train.mixed_precision", None)
    try:
        if mixed:
            keras.mixed_precision.set_global_policy(mixed)
        return evaluator.evaluate_model_dir(model_dir, checkpoint, split, strategy=strategy)
    finally:
        keras.mixed_precision.set_global_policy(policy)


_HELP_FLAGS = {"--help", "--helpshort", "--helpfull", "-?"}


def run():
    """Runs the command; `--help` exits 0 (absl's help flags exit 1)."""
    try:
        app.run(lambda argv: config.run_main(main, argv))
    except SystemExit as exit_:
        if exit_.code == 1 and _HELP_FLAGS & set(sys.argv[1:]):
            raise SystemExit(0) from None
        raise


if __name__ == "__main__":
    run()
