"""Prints the plan of a declared network: `python -m trainer.plan --gin_file=gin/models/reference.gin`.

One row per block (output shape, stride and jump, receptive field,
parameters, MACs), then the totals. Takes a model file on its own
(NUM_CLASSES defaults to 200) or a full runnable file.

Flags:
  --gin_file      gin files, repeatable; later files win.
  --gin_bindings  gin bindings, repeatable; applied after the files.
  --image_size    input side in pixels (default: the IMAGE_SIZE macro if bound, else 64).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Keep TF's C++ start-up chatter off the console.

from absl import app  # pylint: disable=wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position

from trainer import config  # pylint: disable=wrong-import-position

flags.DEFINE_multi_string("gin_file", None, "Gin files declaring the network; later files win.",
                          required=True)
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, applied after the files.")
flags.DEFINE_integer("image_size", None,
                     "Input side in pixels (default: the IMAGE_SIZE macro if bound, else 64).",
                     lower_bound=1)
FLAGS = flags.FLAGS


def main(argv):
    """Parses the gin files and prints the plan of the declared network."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config.parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, defaults=["NUM_CLASSES = 200"])
    from trainer.models import plan  # pylint: disable=import-outside-toplevel

    print(plan.plan_text(FLAGS.image_size or plan.default_image_size()), end="")


def run():
    app.run(lambda argv: config.run_main(main, argv))


if __name__ == "__main__":
    run()
