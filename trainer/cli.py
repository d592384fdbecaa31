"""What every command-line entry point shares: a clean console, gin flags, one-line errors, exit codes.

    from trainer import cli
    cli.define_gin_flags()
    def main(argv): ...
    if __name__ == "__main__":
        cli.run(main)

Nothing here imports TensorFlow, so `--help` is fast (`trainer/__init__.py`
keeps TensorFlow's C++ start-up lines off the console). A `UserError` prints as
one `error: ...` paragraph and exits 1; a run stopped by a signal after its
checkpoint (`Interrupted`) exits 128 + the signal's number, as shells expect.
"""

import functools
import gc
import importlib
import logging
import os
import runpy
import sys
import traceback

# The modules that define gin configurables (`trainer.registry`), imported before gin files are read.
CONFIGURABLE_MODULES = ("trainer.train", "trainer.data.pipeline", "trainer.evaluation.evaluator")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from trainer.errors import UserError, data_error_line  # noqa: E402

FLAGS = flags.FLAGS


class Interrupted(UserError):
    """A signal stopped the run after a checkpoint; the same command resumes it."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


def define_gin_flags(default_files=None, model_dir=True):
    """Defines --gin_file (repeatable), --gin_bindings (repeatable) and optionally --model_dir."""
    flags.DEFINE_multi_string("gin_file", default_files, "Gin files, repeatable; later files win.")
    flags.DEFINE_multi_string("gin_bindings", [], 'Gin bindings, repeatable, applied after the files, e.g. '
                              '"EPOCHS = 3".')
    if model_dir:
        flags.DEFINE_string("model_dir", None, "Overrides the MODEL_DIR macro of the gin files.")


def register_configurables():
    """Imports every module that defines gin configurables (this imports TensorFlow); the first time, then
    freezes what the imports made (`_freeze_imports`)."""
    for module in CONFIGURABLE_MODULES:
        importlib.import_module(module)
    _freeze_imports()


@functools.cache
def _freeze_imports():
    """Moves every object alive now out of the garbage collector's walks (`gc.freeze`), once a process: the
    imports leave about 355,000 that each full collection of a run would walk again (BUILD_NOTES.md,
    "Start-up"). Not again later: garbage not yet collected would be kept for good."""
    gc.freeze()


def parse_gin_flags(defaults=(), model_dir=None):
    """Parses the --gin_file and --gin_bindings flags (see `trainer.config.parse_gin`)."""
    from trainer import config  # pylint: disable=import-outside-toplevel

    register_configurables()
    config.parse_gin(FLAGS.gin_file or [], FLAGS.gin_bindings, model_dir=model_dir, defaults=defaults)


def quiet_tensorflow():
    """Drops TensorFlow's own Python INFO lines (checkpoint sharding, SavedModel export), keeps its warnings;
    and matplotlib's ("generated new fontManager" the first time it runs on a machine)."""
    def keep(record):
        return record.levelno >= logging.WARNING or f"{os.sep}tensorflow{os.sep}" not in record.pathname

    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    logging.getLogger("absl").addFilter(keep)


class ConsoleFormatter(logging.Formatter):
    """'14:18:41 message', 'warning: ' or 'error: ' before the message at those levels."""

    def __init__(self):
        super().__init__("%(asctime)s %(message)s", datefmt="%H:%M:%S")

    def formatMessage(self, record):
        level = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "error: "}
        return f"{record.asctime} {level.get(record.levelno, '')}{record.message}"


def clean_console():
    """Console lines without absl's 'I1204 14:18:41.754869 139971503549312 file.py:88]' prefix, unless
    --verbosity asks for more (1 or above) or the lines go to a log file (absl's full format there)."""
    from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel

    handler = absl_logging.get_absl_handler().python_handler
    if FLAGS["verbosity"].value < 1 and handler.stream in (sys.stderr, sys.__stderr__):
        handler.setFormatter(ConsoleFormatter())


def run(main, usage=None):
    """Runs `main(argv)` as an absl program with the project's error handling.

    Args:
      main: `main(argv)`.
      usage: a function returning the text `--help` prints before the flags.
    """
    def wrapped(argv):
        quiet_tensorflow()
        clean_console()
        try:
            return main(argv)
        except app.UsageError as err:
            print(f"error: {err} (see --help)", file=sys.stderr)
            sys.exit(1)
        except Interrupted as err:
            print(f"stopped: {_first_paragraph(err)}", file=sys.stderr)
            sys.exit(128 + err.signum)
        except UserError as err:
            print(f"error: {_first_paragraph(err)}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print("stopped: interrupted (no checkpoint written)", file=sys.stderr)
            sys.exit(130)
        except Exception as err:  # pylint: disable=broad-except
            line = data_error_line(err)  # A data check inside a tf.data pipeline (a corrupt shard).
            if line:
                print(f"error: {line}", file=sys.stderr)
                sys.exit(1)
            traceback.print_exc()  # Unexpected: keep the full traceback.
            sys.exit(2)

    if any(a in HELP_FLAGS for a in sys.argv[1:]):
        print(help_text(main, usage))
        sys.exit(0)
    app.run(wrapped)


def help_text(main, usage=None):
    """What `--help` prints: `usage()` (if given), then the docstring of `main`'s module unless usage has it.

    The same text whether the program runs as `python -m trainer.x` (its module is `__main__`) or as its
    console script (`tiny-x`, which imports `trainer.x`); absl's own help would list the flags of the
    `__main__` module only, which a console script's wrapper does not define.
    """
    text = (usage() or "").strip() if usage else ""
    module = sys.modules.get(getattr(main, "__module__", None) or "")
    doc = ((module.__doc__ if module else None) or "").strip()
    if doc and doc not in text:
        text = f"{text}\n\n{doc}" if text else doc
    return text


HELP_FLAGS = ("--help", "-h", "--helpfull", "--helpshort", "-?")


def fast_help(doc):
    """For a `python -m` module whose imports are heavy: `--help` prints `doc` and exits 0 before they load.

    Call it at the top of the module, under `if __name__ == "__main__":`.
    """
    if any(a in HELP_FLAGS for a in sys.argv[1:]):
        print(doc.strip())
        sys.exit(0)


def _first_paragraph(err):
    """The error's message without the "In call to configurable ..." lines gin appends."""
    return str(err).split("\n  In call to configurable")[0]


def no_arguments(argv):
    """Rejects positional arguments (absl passes them through)."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")


# The console scripts of setup.py: `tiny-x` runs `python -m trainer.x` itself (runpy, as `python -m` does), so
# both take the same path, `--help` included, which answers before TensorFlow loads (`fast_help`). A wrapper
# that imported `trainer.x` and called its `run()` would load TensorFlow first: 4 s before the help.
def _console_script(module):
    def command():
        runpy.run_module(module, run_name="__main__", alter_sys=True)

    command.module = module
    command.__doc__ = f"Console script: python -m {module}."
    return command


tiny_train = _console_script("trainer.main")
tiny_plan = _console_script("trainer.plan")
tiny_evaluate = _console_script("trainer.evaluate")
tiny_predict = _console_script("trainer.predict")
tiny_export = _console_script("trainer.export")
tiny_compare = _console_script("trainer.compare")
tiny_sweep = _console_script("trainer.sweep")
tiny_preview = _console_script("trainer.data.preview")
tiny_synthetic = _console_script("trainer.data.synthetic")
tiny_download = _console_script("trainer.data.download")
tiny_convert = _console_script("trainer.data.convert")
