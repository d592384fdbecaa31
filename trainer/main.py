"""Trains one phase: `python -m trainer.main --gin_file=gin/phase64_aug.gin`.

Flags:
  --gin_file      gin files, repeatable; later files win (default: gin/quickstart.gin).
  --gin_bindings  gin bindings, repeatable; applied after the files, e.g. --gin_bindings="EPOCHS = 3".
  --model_dir     overrides the gin macro MODEL_DIR.
"""

from absl import flags

from trainer import cli, config

cli.define_gin_flags(default_files=["gin/quickstart.gin"])
FLAGS = flags.FLAGS


def _help():
    runnable = [f for f in config.available_gin_files()
                if (f.count("/") == 1 and not f.endswith("common.gin")) or f.startswith("gin/recipes/")]
    files = "\n".join(f"  {f}" for f in runnable)
    return (f"Runnable gin files:\n{files}\n\nMacros users edit (set them with --gin_bindings):\n"
            f"{config.describe_macros()}\n")


def main(argv):
    cli.no_arguments(argv)
    cli.parse_gin_flags(model_dir=FLAGS.model_dir)
    config.require("trainer.train", "trainer.data")
    from trainer import train  # pylint: disable=import-outside-toplevel

    train.train()


def run():
    """The command; its console script `tiny-train` runs this module as `python -m` does (trainer.cli)."""
    cli.run(main, usage=_help)


if __name__ == "__main__":
    run()
