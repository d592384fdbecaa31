"""Prints the plan of a declared network: `python -m trainer.plan --gin_file=gin/models/reference.gin`.

One row per block (output shape, stride and jump, receptive field,
parameters, MACs), then the totals. Takes a model file on its own
(NUM_CLASSES defaults to 200) or a full runnable file.

Flags:
  --gin_file      gin files, repeatable; later files win.
  --gin_bindings  gin bindings, repeatable; applied after the files.
  --image_size    input side in pixels (default: the IMAGE_SIZE macro if bound, else 64).
"""

from absl import flags

from trainer import cli

cli.define_gin_flags(model_dir=False)
flags.DEFINE_integer("image_size", None, "Input side in pixels (default: the IMAGE_SIZE macro if bound, else 64).",
                     lower_bound=1)
flags.mark_flag_as_required("gin_file")
FLAGS = flags.FLAGS


def main(argv):
    """Parses the gin files and prints the plan of the declared network."""
    cli.no_arguments(argv)
    cli.parse_gin_flags(defaults=["NUM_CLASSES = 200"])
    from trainer.models import plan  # pylint: disable=import-outside-toplevel

    print(plan.plan_text(FLAGS.image_size or plan.default_image_size()), end="")


def run():
    """The command; its console script `tiny-plan` runs this module as `python -m` does (trainer.cli)."""
    cli.run(main)


if __name__ == "__main__":
    run()
