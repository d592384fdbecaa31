"""Entry point: `python -m trainer.main --gin_file=gin/phase64_aug.gin`.

Flags:
  --gin_file      gin files, repeatable; later files win (default: gin/quickstart.gin).
  --gin_bindings  gin bindings, repeatable; applied after the files.
  --model_dir     overrides the gin macro MODEL_DIR.
"""

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Keep TF's C++ start-up chatter off the console.

from absl import app  # pylint: disable=wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position

from trainer import config  # pylint: disable=wrong-import-position

flags.DEFINE_multi_string("gin_file", ["gin/quickstart.gin"], "Gin files; later files win.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, applied after the files, e.g. \"EPOCHS = 3\".")
flags.DEFINE_string("model_dir", None, "Overrides the MODEL_DIR macro of the gin files.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config.parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.model_dir)
    _quiet_tensorflow_info()
    from trainer import train  # pylint: disable=import-outside-toplevel

    train.train()


def _quiet_tensorflow_info():
    """Drops TensorFlow's own INFO lines (checkpoint sharding, SavedModel export), keeps its warnings."""
    def keep(record):
        return record.levelno >= logging.WARNING or f"{os.sep}tensorflow{os.sep}" not in record.pathname

    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    logging.getLogger("absl").addFilter(keep)


def run():
    app.run(lambda argv: config.run_main(main, argv))


if __name__ == "__main__":
    run()
