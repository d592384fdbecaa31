"""Compares training runs side by side: `python -m trainer.compare runs/*`.

    python -m trainer.compare DIR [DIR ...] [--sort=val_top1] [--reverse] [--markdown] [--output=FILE.md]

One row per run directory (a directory holding the trainer's metrics.csv or
operative_config.gin; a directory holding run directories stands for them):
the network, its parameters and multiply-accumulates per image at the run's
image size, the image size and global batch, the epochs done, the best
validation top-1 (and that epoch's top-5 and number), the mean epoch time and
the training throughput. Then, as columns, what differs between the compared
runs: for runs of a sweep (`python -m trainer.sweep`; its sweep.json beside
them) the sweep's varied values as the sweep names them, with a `sweep` column
when the runs come from several sweeps; then every gin macro and binding of
the runs' operative_config.gin whose value is not the same in all of them
(MODEL_DIR aside), e.g. AUGMENT or `optim.constant.learning_rate`; a binding
to the same `%MACRO` in exactly the runs that define that macro is left to the
macro's column.

Flags:
  --sort       the column to sort by: run, network, params, macs, image_size, batch_size, epochs, val_top1,
               val_top5, best_epoch, epoch_time, images_per_second (default val_top1). Names and networks sort
               A-Z, numbers from the largest down; runs without the value go last.
  --reverse    reverse the order.
  --markdown   print a markdown table instead of the aligned console table.
  --output     also write the markdown table to this file (long setting values in full; the console table
               shortens them to 30 characters).

Where the figures come from:
  - metrics.csv (one row per epoch): epochs done, best val top-1 (the
    earliest of equals), epoch times. The mean epoch time leaves out the
    phase's first epoch when there are others (it includes tracing the
    training step); images/s = global batch x steps / epoch time over the
    same epochs.
  - run.json beside metrics.csv, when the trainer wrote one: network, params,
    macs, image_size, batch_size.
  - otherwise operative_config.gin: the network name, IMAGE_SIZE and
    BATCH_SIZE are read with gin's parser; parameters and MACs are measured by
    building the declared network in a fresh gin state (graph only, as
    `python -m trainer.plan`), which takes a few seconds for a large network.
    This replaces the process's gin configuration.

A path that is not a run prints one `warning:` line and is skipped; no run at
all is an error (exit 1).
"""

import csv
import glob
import math
import os
import sys

from absl import flags

from trainer import cli
from trainer.errors import UserError

FLAGS = flags.FLAGS

# (key, header, alignment): the table's columns in order.
COLUMNS = (
    ("run", "run", "<"),
    ("network", "network", "<"),
    ("params", "params", ">"),
    ("macs", "MMACs/img", ">"),
    ("image_size", "px", ">"),
    ("batch_size", "batch", ">"),
    ("epochs", "epochs", ">"),
    ("val_top1", "best top-1", ">"),
    ("val_top5", "top-5", ">"),
    ("best_epoch", "best epoch", ">"),
    ("epoch_time", "epoch s", ">"),
    ("images_per_second", "img/s", ">"),
)
SORT_KEYS = tuple(key for key, _, _ in COLUMNS)
_TEXT_KEYS = ("run", "network")


def is_run(path):
    """Whether `path` is a training run's directory (the trainer wrote metrics.csv or operative_config.gin)."""
    return _isdir(path) and any(
        _isfile(os.path.join(path, name)) for name in ("metrics.csv", "operative_config.gin"))


def find_runs(paths, warn=None):
    """The run directories among `paths`, in order; a directory of runs stands for its runs.

    Args:
      paths: directories (a pattern such as 'runs/*' that the shell did not expand is expanded here).
      warn: `warn(text)` for each path that is not a run; default: a `warning:` line on stderr.

    Returns:
      A list of paths, without duplicates.
    """
    warn = warn or _warn
    runs = []
    for path in paths:
        expanded = sorted(glob.glob(path)) if glob.has_magic(path) and not _exists(path) else [path]
        if not expanded:
            warn(f"{path} matches nothing: skipped.")
        for candidate in expanded:
            if is_run(candidate):
                found = [candidate]
            elif _isdir(candidate):
                found = [os.path.join(candidate, d) for d in sorted(_listdir(candidate))
                         if is_run(os.path.join(candidate, d))]
            else:
                found = []
            if not found:
                what = "does not exist" if not _exists(candidate) else "is not a training run"
                warn(f"{candidate} {what} (no metrics.csv or operative_config.gin): skipped.")
            runs += [r for r in found if os.path.normpath(r) not in {os.path.normpath(x) for x in runs}]
    return runs


def read_metrics(path):
    """The rows of a metrics.csv as dicts of numbers (cells that are not numbers stay strings)."""
    with _open(path) as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def read_settings(path):
    """Every macro and binding of a gin file, scoped ones included: 'NAME' or '[scope/]selector.param' -> value."""
    from gin import config_parser  # pylint: disable=import-outside-toplevel

    with _open(path) as f:
        text = f.read()
    settings = {}
    for statement in config_parser.ConfigParser(text, _Delegate()):
        if isinstance(statement, config_parser.BindingStatement):
            selector = f"{statement.scope}/{statement.selector}" if statement.scope else statement.selector
            settings[f"{selector}.{statement.arg_name}" if statement.arg_name else selector] = statement.value
    return settings


def read_operative_config(path):
    """The macros and bindings of a gin file, read with gin's parser (no configurable is imported).

    Returns:
      `(macros, bindings)`: macro name -> value, and 'selector.param' -> value
      as written (a macro reference is a `Macro`, a configurable reference its
      '@selector' text), both with plain Python values.
    """
    from gin import config_parser  # pylint: disable=import-outside-toplevel

    with _open(path) as f:
        text = f.read()
    macros, bindings = {}, {}
    for statement in config_parser.ConfigParser(text, _Delegate()):
        if not isinstance(statement, config_parser.BindingStatement):
            continue
        if not statement.arg_name and "." not in statement.selector and not statement.scope:
            macros[statement.selector] = statement.value
        elif not statement.scope:
            bindings[f"{statement.selector}.{statement.arg_name}"] = statement.value
    return macros, bindings


class Macro(str):
    """A `%MACRO` reference in a gin file (its name)."""


class _Delegate:
    """gin's parser delegate, turning references into plain markers (nothing needs to be registered)."""

    def configurable_reference(self, scoped_selector, evaluate):
        return "@" + scoped_selector + ("()" if evaluate else "")

    def macro(self, name):
        return Macro(name)


def _binding(macros, bindings, *keys):
    """The first of the `keys` ('selector.param', matched on its last dotted parts) that is bound, macros resolved."""
    for key in keys:
        for name, value in bindings.items():
            if name == key or name.endswith("." + key):
                while isinstance(value, Macro) and value in macros:
                    value = macros[value]
                return value
    return None


def summarize(run, compute_plan=True, warn=None):
    """One run's row of the table (a dict over `SORT_KEYS`; None where unknown).

    Args:
      run: the run's directory.
      compute_plan: build the declared network for params and MACs when run.json does not give them.
      warn: `warn(text)` for figures that could not be read; default: a `warning:` line on stderr.

    Returns:
      The row, or None when the run's metrics.csv cannot be read (the run is skipped, with a warning).
    """
    warn = warn or _warn
    row = dict.fromkeys(SORT_KEYS)
    row["run"] = os.path.basename(os.path.normpath(run)) or run
    row["path"] = run
    macros, bindings = {}, {}
    operative = os.path.join(run, "operative_config.gin")
    if _isfile(operative):
        try:
            macros, bindings = read_operative_config(operative)
        except Exception as err:  # pylint: disable=broad-except  (a damaged file: the other figures still count)
            warn(f"{operative} could not be read ({err}).")
    row["network"] = _binding(macros, bindings, "network.name")
    row["image_size"] = _binding(macros, bindings, "data.image_size") or macros.get("IMAGE_SIZE")
    row["batch_size"] = _binding(macros, bindings, "data.batch_size") or macros.get("BATCH_SIZE")
    recorded = _read_run_json(os.path.join(run, "run.json"), warn)
    row.update({k: recorded[k] for k in ("network", "params", "macs", "image_size", "batch_size")
                if recorded.get(k) is not None})
    if row["params"] is None and compute_plan and _isfile(operative) and row["image_size"]:
        try:
            row["params"], row["macs"] = measure(operative, int(row["image_size"]))
        except Exception as err:  # pylint: disable=broad-except  (e.g. a network file that changed since)
            warn(f"{run}: parameters and MACs unknown: the network of {operative} does not build "
                 f"({str(err).splitlines()[0] if str(err) else type(err).__name__}).")

    metrics_path = os.path.join(run, "metrics.csv")
    try:
        rows = read_metrics(metrics_path) if _isfile(metrics_path) else []
        rows = [r for r in rows if isinstance(r.get("val_top1"), (int, float)) and not math.isnan(r["val_top1"])]
        row["epochs"] = len(rows)
        if rows:
            best = max(rows, key=lambda r: (r["val_top1"], -r.get("step", 0)))
            row["val_top1"], row["val_top5"], row["best_epoch"] = best["val_top1"], best.get("val_top5"), best["epoch"]
            row["epoch_time"], row["images_per_second"] = _speed(rows, row["batch_size"])
    except (OSError, ValueError, csv.Error, KeyError, TypeError) as err:  # (UnicodeDecodeError is a ValueError.)
        warn(f"{metrics_path} is not a metrics.csv the trainer writes ({' '.join(str(err).split())[:120]}): run "
             f"{run} skipped.")
        return None
    return row


def measure(operative_config, image_size):
    """(parameters, MACs per image) of the network an operative config declares, built at `image_size`.

    Parses the file in a fresh gin state (the process's gin configuration is
    cleared before and after) and builds the network as `trainer.plan` does.
    """
    import gin  # pylint: disable=import-outside-toplevel
    import keras  # pylint: disable=import-outside-toplevel

    from trainer import config  # pylint: disable=import-outside-toplevel

    cli.register_configurables()
    from trainer.models import plan  # pylint: disable=import-outside-toplevel

    gin.clear_config()
    try:
        config.parse_gin([operative_config])
        totals = plan.make_plan(image_size).totals
        return int(totals.params), int(totals.macs)
    finally:
        gin.clear_config()
        keras.backend.clear_session()


def compare(paths, sort="val_top1", reverse=False, compute_plan=True, warn=None):
    """The rows of the runs among `paths`, sorted.

    Raises:
      UserError: no run among `paths`, or an unknown sort key.
    """
    if sort not in SORT_KEYS:
        raise UserError(f"--sort={sort}: not a column; use one of {', '.join(SORT_KEYS)}.")
    runs = find_runs(paths, warn)
    if not runs:
        raise UserError(f"No training run among {' '.join(paths) or 'the arguments'}: give run directories (each "
                        "holds the metrics.csv and operative_config.gin the trainer writes), e.g. "
                        "`python -m trainer.compare runs/*`.")
    rows = [row for row in (summarize(run, compute_plan, warn) for run in runs) if row is not None]
    differing_settings(rows, warn)
    known = [r for r in rows if r[sort] is not None]
    unknown = [r for r in rows if r[sort] is None]
    if sort in _TEXT_KEYS:
        known.sort(key=lambda r: str(r[sort]).lower(), reverse=reverse)
    else:
        known.sort(key=lambda r: r[sort], reverse=not reverse)
    return known + unknown


def read_sweep(run):
    """(sweep name, its varied [{'key', 'name'}], the run's labels) if `run` is a point of a sweep, else None."""
    parent = os.path.dirname(os.path.normpath(run))
    path = os.path.join(parent, "sweep.json")
    if not _isfile(path):
        return None
    import json  # pylint: disable=import-outside-toplevel

    try:
        with _open(path) as f:
            state = json.load(f)
        entry = state["points"].get(os.path.basename(os.path.normpath(run)))
        if entry is None:
            return None
        return os.path.basename(parent) or parent, list(state.get("varied", [])), dict(entry.get("labels", {}))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def differing_settings(rows, warn=None):
    """Sets each row's `sweep` and `settings` (column -> text): what differs between the runs (module docstring)."""
    warn = warn or _warn
    sweeps = {id(r): read_sweep(r["path"]) for r in rows}
    names, varied_keys = [], set()
    for found in sweeps.values():
        for varied in (found[1] if found else []):
            names += [varied["name"]] if varied["name"] not in names else []
            varied_keys.add(varied["key"])
    several = len({found[0] for found in sweeps.values() if found}) > 1
    values = {}
    for r in rows:
        path = os.path.join(r["path"], "operative_config.gin")
        if _isfile(path):
            try:
                values[id(r)] = read_settings(path)
            except Exception:  # pylint: disable=broad-except  (summarize warned already)
                pass
    read = list(values.values())
    keys = sorted({k for v in read for k in v}, key=lambda k: ("." in k, k))

    def covered(key):  # A sweep's varied key, as the operative config writes it (shortest unique selector).
        return any(v == key or v.endswith("." + key) or key.endswith("." + v) for v in varied_keys)

    differing = [k for k in keys if k != "MODEL_DIR" and not covered(k) and len(read) > 1
                 and len({repr(v.get(k)) for v in read}) > 1]

    def said_by_its_macro(key):
        """Bound to one %MACRO in every run that defines that macro, and nowhere else: the macro's column says it."""
        macro = next(v[key] for v in read if key in v)
        return isinstance(macro, Macro) and macro in differing and all(
            (key in v) == (macro in v) and (key not in v or (isinstance(v[key], Macro) and v[key] == macro))
            for v in read)

    differing = [k for k in differing if not said_by_its_macro(k)]
    for r in rows:
        found = sweeps[id(r)]
        r["sweep"] = found[0] if found else None
        settings = {"sweep": r["sweep"] or "-"} if several else {}
        settings.update({n: (found[2].get(n, "-") if found else "-") for n in names})
        mine = values.get(id(r))
        settings.update({k: _setting_text(mine[k]) if mine is not None and k in mine else "-" for k in differing})
        r["settings"] = settings
    return rows


def _setting_text(value):
    if isinstance(value, Macro):
        return "%" + value
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return value
    return repr(value)


def _extra_columns(rows):
    """The settings' columns of a table (the same for every row): [(key, header)]."""
    return list(rows[0].get("settings", {})) if rows else []


def format_cells(row, extra=None):
    """A row's cells as text, in column order (then its `settings`, or the `extra` ones of a table)."""
    def fmt(key, value):
        if value is None:
            return "-"
        if key == "params":
            return f"{int(value):,}"
        if key == "macs":
            return f"{value / 1e6:,.1f}"
        if key in ("val_top1", "val_top5"):
            return f"{value:.4f}"
        if key == "epoch_time":
            return f"{value:.1f}"
        if key == "images_per_second":
            return f"{value:,.0f}"
        return str(value)

    settings = row.get("settings", {})
    return [fmt(key, row.get(key)) for key, _, _ in COLUMNS] + \
        [settings.get(k, "-") for k in (extra if extra is not None else settings)]


def format_table(rows):
    """An aligned console table: a header, a rule, a line per run."""
    extra = _extra_columns(rows)
    aligns = [align for _, _, align in COLUMNS] + ["<"] * len(extra)
    table = [[header for _, header, _ in COLUMNS] + extra] + [
        [_shorten(c) if i >= len(COLUMNS) else c for i, c in enumerate(format_cells(r, extra))] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(aligns))]
    lines = ["  ".join(f"{cell:{align}{width}}" for cell, width, align in zip(line, widths, aligns))
             .rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def format_markdown(rows):
    """A markdown (GitHub) table, numbers right-aligned."""
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    extra = _extra_columns(rows)
    aligns = [align for _, _, align in COLUMNS] + ["<"] * len(extra)
    out = [line([header for _, header, _ in COLUMNS] + extra),
           "|" + "|".join(":---" if align == "<" else "---:" for align in aligns) + "|"]
    out += [line(format_cells(r, extra)) for r in rows]
    return "\n".join(out) + "\n"


# --- Files: local ones with the standard library (no TensorFlow import), URLs (gs://...) with tf.io.gfile. ------


def _gfile():
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    return tf.io.gfile


def _exists(path):
    return _gfile().exists(path) if "://" in path else os.path.exists(path)


def _isdir(path):
    return _gfile().isdir(path) if "://" in path else os.path.isdir(path)


def _isfile(path):
    return _exists(path) and not _isdir(path) if "://" in path else os.path.isfile(path)


def _listdir(path):
    return [n.rstrip("/") for n in _gfile().listdir(path)] if "://" in path else os.listdir(path)


def _open(path, mode="r"):
    return _gfile().GFile(path, mode) if "://" in path else open(path, mode, encoding="utf-8", newline="")


def main(argv):
    """The command line (see the module docstring)."""
    paths = argv[1:]
    if not paths:
        raise UserError("Give the runs to compare: `python -m trainer.compare runs/*` (run directories, or a "
                        "directory of runs).")
    rows = compare(paths, sort=FLAGS.sort, reverse=FLAGS.reverse)
    print(format_markdown(rows) if FLAGS.markdown else format_table(rows), end="")
    if FLAGS.output:
        try:
            with _open(FLAGS.output, "w") as f:
                f.write(format_markdown(rows))
        except OSError as err:
            raise UserError(f"--output={FLAGS.output}: cannot write it: {err.strerror or err}.") from None
        print(f"Markdown table: {FLAGS.output}")


def run():
    """The command; its console script `tiny-compare` runs this module as `python -m` does (trainer.cli)."""
    flags.DEFINE_enum("sort", "val_top1", list(SORT_KEYS), "The column to sort by (numbers: largest first).")
    flags.DEFINE_bool("reverse", False, "Reverse the order.")
    flags.DEFINE_bool("markdown", False, "Print a markdown table instead of the aligned console table.")
    flags.DEFINE_string("output", None, "Also write the markdown table to this file.")
    cli.run(main, usage=lambda: __doc__)


def _speed(rows, batch_size):
    """(mean epoch time, images per second) over the epochs after the phase's first (all, if only one)."""
    steps = [r["step"] - (rows[i - 1]["step"] if i else 0) for i, r in enumerate(rows)]
    timed = [(s, r["time"]) for s, r in zip(steps, rows) if isinstance(r.get("time"), (int, float)) and r["time"] > 0]
    if len(timed) > 1:
        timed = timed[1:]
    if not timed:
        return None, None
    seconds = sum(t for _, t in timed)
    mean = seconds / len(timed)
    if not batch_size or not isinstance(batch_size, int):
        return mean, None
    return mean, batch_size * sum(s for s, _ in timed) / seconds


def _read_run_json(path, warn):
    if not _isfile(path):
        return {}
    import json  # pylint: disable=import-outside-toplevel

    try:
        with _open(path) as f:
            recorded = json.load(f)
        return recorded if isinstance(recorded, dict) else {}
    except (OSError, ValueError) as err:
        warn(f"{path} could not be read ({err}): ignored.")
        return {}


def _shorten(text, width=30):
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def _number(text):
    for kind in (int, float):
        try:
            return kind(text)
        except (TypeError, ValueError):
            pass
    return text


def _warn(text):
    print(f"warning: {text}", file=sys.stderr)


if __name__ == "__main__":
    run()
