"""Gin plumbing shared by every entry point: finding gin files, parsing, clean errors.

`--gin_file=gin/x.gin` and `include 'gin/models/y.gin'` resolve, in order,
against the path as given (absolute, relative to the working directory, or
`gs://...`), the repository checkout this package was imported from, and the
copy of `gin/` installed inside the package by setup.py.
"""

import difflib
import importlib
import os
import re
import sys
import traceback

import gin

from trainer.errors import UserError

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_DIR = os.path.dirname(_PACKAGE_DIR)


def search_roots():
    """Directories that `gin/...` paths are resolved against, most specific first."""
    roots = [os.getcwd()]
    for root in (_REPO_DIR, _PACKAGE_DIR):
        # common.gin marks the project's gin/ (site-packages/gin is gin-config itself).
        if os.path.isfile(os.path.join(root, "gin", "common.gin")) and root not in roots:
            roots.append(root)
    return roots


def available_gin_files():
    """Runnable and includable gin files that ship with the project, as `gin/...` paths."""
    found = set()
    for root in search_roots():
        gin_dir = os.path.join(root, "gin")
        for dirpath, _, files in os.walk(gin_dir):
            for f in files:
                if f.endswith(".gin"):
                    found.add(os.path.relpath(os.path.join(dirpath, f), root))
    return sorted(found)


def resolve_gin_file(path):
    """Returns a readable path for `path`, or raises UserError naming the candidates."""
    import tensorflow as tf  # Deferred: `--help` should not pay for importing TF.

    if tf.io.gfile.exists(path):
        return path
    if not os.path.isabs(path) and "://" not in path:
        for root in search_roots():
            candidate = os.path.join(root, path)
            if os.path.exists(candidate):
                return candidate
    known = available_gin_files()
    close = difflib.get_close_matches(path, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise UserError(
        f"Gin file '{path}' not found (looked in: {', '.join(search_roots())}).{hint} "
        f"Gin files shipped with the project: {', '.join(known) or 'none'}.")


def _known_names():
    """Every configurable name and every `configurable.parameter` gin knows about."""
    import inspect

    names = set()
    for selector, configurable in gin.config._REGISTRY.items():  # pylint: disable=protected-access
        short = selector.split(".")[-1]
        names.update({selector, short})
        try:
            params = inspect.signature(configurable.wrapped).parameters
        except (TypeError, ValueError):
            continue
        for p in params:
            names.update({f"{selector}.{p}", f"{short}.{p}"})
    return sorted(names)


def _explain_gin_error(err):
    """Turns a gin parse error into a one-paragraph message with the nearest known name."""
    message = str(err).strip()
    bad = None
    m = re.search(r"No configurable matching '([^']+)'", message)
    if m:
        bad = m.group(1)
    m = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", message)
    if m:
        bad = f"{m.group(1)}.{m.group(2)}"
    if bad:
        close = difflib.get_close_matches(bad, _known_names(), n=1, cutoff=0.6)
        if close:
            message += f"\nDid you mean '{close[0]}'?"
    return f"Invalid gin configuration: {message}"


# Modules that register gin configurables; imported before any gin file is parsed.
CONFIGURABLE_MODULES = (
    "trainer.strategy",
    "trainer.data.pipeline",
    "trainer.data.augment",
    "trainer.models.blocks",
    "trainer.models.builder",
    "trainer.train",
)


def register_configurables():
    """Imports every module that defines gin configurables (this imports TensorFlow)."""
    for module in CONFIGURABLE_MODULES:
        importlib.import_module(module)


def _use_gfile_reader():
    """Gin reads files through tf.io.gfile (gs:// works), and only so.

    Gin's fallback reader looks for files inside Python packages and logs an
    ERROR for every search path an include does not match; the search roots
    above already cover the installed package.
    """
    import tensorflow as tf

    gin.config._FILE_READERS[:] = [(tf.io.gfile.GFile, tf.io.gfile.exists)]  # pylint: disable=protected-access


def parse_gin(gin_files, gin_bindings=(), model_dir=None, defaults=()):
    """Parses gin files then bindings (later wins); `model_dir` overrides MODEL_DIR.

    Args:
      gin_files: gin file paths (see module docstring for how they resolve).
      gin_bindings: extra bindings, applied after the files.
      model_dir: if set, binds the `MODEL_DIR` macro after everything else.
      defaults: bindings applied *before* the files (e.g. a default
        `NUM_CLASSES` for tools that read a model file on its own).

    Raises:
      UserError: a missing file, a syntax error or an unknown name, with the
        file, the line and the nearest known name.
    """
    register_configurables()
    _use_gfile_reader()
    for root in search_roots():
        gin.add_config_file_search_path(root)
    files = [resolve_gin_file(f) for f in gin_files]
    bindings = list(gin_bindings)
    if model_dir:
        bindings.append(f"MODEL_DIR = {model_dir!r}")
    try:
        for binding in defaults:
            gin.parse_config(binding)
        gin.parse_config_files_and_bindings(files, bindings, finalize_config=False)
    except IOError as err:
        raise UserError(f"Invalid gin configuration: {err}") from None
    except (ValueError, SyntaxError, TypeError) as err:
        raise UserError(_explain_gin_error(err)) from None
    except Exception as err:  # tokenize.TokenError and friends: report, don't trace.
        if type(err).__module__.startswith(("gin", "tokenize")):
            raise UserError(_explain_gin_error(err)) from None
        raise


def explain_missing_value(err):
    """A UserError for gin's "No values supplied" TypeError (undefined macro, missing REQUIRED), else None."""
    message = str(err)
    if "No values supplied by Gin or caller" not in message:
        return None
    macro = re.search(r"configurable 'macro' .* in scope '([^']+)'", message)
    if macro:
        defined = [scope for scope, selector in gin.config._CONFIG if selector == "gin.macro"]  # pylint: disable=protected-access
        close = difflib.get_close_matches(macro.group(1), defined, n=1)
        hint = f" Did you mean '%{close[0]}'?" if close else ""
        return UserError(f"Invalid gin configuration: the macro %{macro.group(1)} is used but never defined.{hint}")
    missing = re.search(r"No values supplied by Gin or caller for arguments: (\[[^\]]*\])", message)
    where = re.search(r"In call to configurable '([^']+)'", message)
    return UserError(f"Invalid gin configuration: {where.group(1) if where else 'a configurable'} needs a value for "
                     f"{missing.group(1) if missing else 'a required argument'}; bind it in a gin file or with --gin_bindings.")


def run_main(main_fn, argv):
    """Runs an absl main, printing UserError as one paragraph and exiting 1."""
    try:
        try:
            return main_fn(argv)
        except TypeError as err:
            raise explain_missing_value(err) or err
    except UserError as err:
        # Gin appends "In call to configurable ..." to exceptions raised inside configurables.
        message = str(err).split("\n  In call to configurable")[0]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    except Exception:  # pragma: no cover - unexpected: keep the full traceback.
        traceback.print_exc()
        sys.exit(2)
