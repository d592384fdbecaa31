"""Runs a sweep declared in a gin file: `python -m trainer.sweep gin/sweeps/quickstart_lr_aug.gin`.

    python -m trainer.sweep SWEEP_FILE [--parallel=K] [--dry_run] [--sweep_dir=DIR]

A sweep file is gin syntax (read with gin's own parser) binding `sweep.*`:

    sweep.base = ['gin/quickstart.gin']          # gin files of every point (later files win)
    sweep.bindings = ['EPOCHS = 5']              # bindings of every point (optional)
    sweep.grid = {                               # every combination of these values (optional)
        'trainer.optim.constant.learning_rate': [3e-4, 1e-3, 3e-3],
        'AUGMENT': {'none': None, 'flip': 'flip(0.5)'},   # a dict names its values: 'augment=flip'
    }
    sweep.random = {                             # sweep.num_points draws from these (optional)
        'trainer.optim.constant.learning_rate': ('log_uniform', 1e-4, 1e-2),
        'BATCH_SIZE': [32, 64, 128],             # a list or a dict: a choice; also 'uniform', 'int_uniform'
    }
    sweep.num_points = 8                         # random draws (with a grid: each grid point x each draw)
    sweep.seed = 0                               # the same seed draws the same points
    sweep.metric = 'val_top1'                    # a metrics.csv column to rank by ('*loss*': lowest first)
    sweep.output = 'runs/sweeps/lr_aug'          # the sweep directory (or --sweep_dir)

A key is a macro (`AUGMENT`) or a binding (`selector.param`). Random floats are
rounded to 3 significant digits, so a point's name and its binding agree.

Each point is a normal training run, `python -m trainer.main --gin_file=... --gin_bindings=...
--model_dir=SWEEP_DIR/<name>` (printed as it starts), its name made of the
varied values (`learning_rate=0.001,augment=flip`; a random point's starts with
its number). Before any point trains, every point's configuration is checked
as the trainer checks it (gin names, macro types and ranges, required
bindings, the learning-rate schedule's arguments): an invalid point is
recorded as failed with its one-line error and the others run.

The sweep directory holds `sweep.json` (the points, their commands and state),
`logs/<name>.log` (each point's console output, a `=== start` line per
start), `report.md`, `report.json` and `plots/` (rewritten as points finish),
and the points' model directories (`tensorboard --logdir SWEEP_DIR`: the
HParams dashboard's parallel coordinates across the points).

Rerunning the same command skips finished points, resumes interrupted ones
from their checkpoints and retries failed ones. It is refused when the sweep
file changed in a way that alters a point already started (a changed base
file list, binding or value): those points are named. Adding values is fine.
SIGTERM or Ctrl-C stops the running points after their checkpoint.

Flags:
  --parallel  points trained at once, each its own process (default 1).
  --dry_run   print the points (name and command) and check them; train nothing, write nothing.
  --sweep_dir overrides sweep.output.
"""

import difflib
import json
import math
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time

from absl import flags

from trainer import cli
from trainer.errors import UserError

FLAGS = flags.FLAGS

FIELDS = ("base", "bindings", "grid", "random", "num_points", "seed", "metric", "output")
DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform")
STATE_FILE = "sweep.json"
# The metrics.csv columns a sweep can rank by ('loss' in the name: lowest first).
METRICS = ("val_top1", "val_top5", "val_loss", "train_top1", "train_top5", "train_loss")


class Sweep:
    """A sweep file, read: its fields (see the module docstring) and where it came from."""

    def __init__(self, path, fields):
        self.path = path
        self.base = list(fields["base"])
        self.bindings = list(fields.get("bindings") or [])
        self.grid = dict(fields.get("grid") or {})
        self.random = dict(fields.get("random") or {})
        self.num_points = fields.get("num_points")
        self.seed = fields.get("seed", 0)
        self.metric = fields.get("metric", "val_top1")
        self.output = fields.get("output")

    @property
    def keys(self):
        return list(self.grid) + [k for k in self.random if k not in self.grid]

    @property
    def lower_is_better(self):
        return "loss" in self.metric


class Point:
    """One training run of a sweep: its name, varied values (key -> value) and labels (short name -> text)."""

    def __init__(self, values, labels, index=None):
        self.values = values
        self.labels = labels
        self.name = ",".join(f"{k}={v}" for k, v in labels.items())
        if index is not None:
            self.name = f"{index:03d}" + ("," + self.name if self.name else "")

    def bindings(self):
        return [f"{key} = {value!r}" for key, value in self.values.items()]


# --- The sweep file ----------------------------------------------------------------------------------------------

class _Delegate:
    """gin's parser delegate: a sweep file holds plain values only."""

    def __init__(self, source):
        self.source = source

    def configurable_reference(self, scoped_selector, evaluate):
        raise UserError(f"Invalid sweep file {self.source}: '@{scoped_selector}' is not a value; a sweep file "
                        "binds plain values (quote a gin reference inside a binding string).")

    def macro(self, name):
        raise UserError(f"Invalid sweep file {self.source}: '%{name}': a sweep file binds plain values.")


def read_sweep_file(path):
    """Reads and checks a sweep file (gin syntax binding `sweep.*`). Raises UserError naming the line."""
    from gin import config_parser  # pylint: disable=import-outside-toplevel

    from trainer import config  # pylint: disable=import-outside-toplevel

    resolved = config.resolve_gin_file(path)
    text = config._read(resolved)  # pylint: disable=protected-access
    fields = {}
    try:
        statements = list(config_parser.ConfigParser(text, _Delegate(path)))
    except SyntaxError as err:
        raise UserError(f"Invalid sweep file {path}, line {err.lineno}: {err.msg}: {(err.text or '').strip()}") \
            from None
    for statement in statements:
        where = f"{path}, line {statement.location.line_num}"
        if not isinstance(statement, config_parser.BindingStatement) or statement.selector != "sweep" \
                or statement.scope:
            raise UserError(f"Invalid sweep file {where}: '{statement.location.line_content.strip()}': a sweep "
                            f"file only binds sweep.<field> ({', '.join(FIELDS)}).")
        if statement.arg_name not in FIELDS:
            close = difflib.get_close_matches(statement.arg_name, FIELDS, n=1)
            hint = f" Did you mean 'sweep.{close[0]}'?" if close else ""
            raise UserError(f"Invalid sweep file {where}: no field 'sweep.{statement.arg_name}'.{hint} "
                            f"Fields: {', '.join(FIELDS)}.")
        fields[statement.arg_name] = statement.value
    _check_fields(path, fields)
    return Sweep(path, fields)


def _check_fields(path, fields):
    def fail(text):
        raise UserError(f"Invalid sweep file {path}: {text}")

    base = fields.get("base")
    if isinstance(base, str):
        fields["base"] = base = [base]
    if not base or not all(isinstance(f, str) for f in base):
        fail("sweep.base must name the gin files of every point, e.g. sweep.base = ['gin/quickstart.gin'].")
    if not all(isinstance(b, str) for b in fields.get("bindings") or []):
        fail("sweep.bindings must be a list of binding strings, e.g. ['EPOCHS = 5'].")
    grid, draws = fields.get("grid") or {}, fields.get("random") or {}
    for name, value in (("grid", grid), ("random", draws)):
        if not isinstance(value, dict):
            fail(f"sweep.{name} must be a dict: key (a MACRO or selector.param) -> values.")
    if not grid and not draws:
        fail("nothing varies: give sweep.grid or sweep.random.")
    for key in list(grid) + list(draws):
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][\w./]*", key):
            fail(f"{key!r} is not a macro or a binding (write 'AUGMENT' or 'trainer.optim.constant.learning_rate').")
    for key in set(grid) & set(draws):
        fail(f"{key} is both in sweep.grid and sweep.random.")
    for key, values in grid.items():
        if not isinstance(values, (list, tuple, dict)) or not values:
            fail(f"sweep.grid['{key}'] must be a non-empty list of values (or a dict: label -> value).")
    for key, spec in draws.items():
        if isinstance(spec, (list, dict)) and spec:
            continue
        if not (isinstance(spec, tuple) and len(spec) == 3 and spec[0] in DISTRIBUTIONS
                and all(isinstance(x, (int, float)) for x in spec[1:]) and spec[1] < spec[2]):
            fail(f"sweep.random['{key}'] must be a list or dict to choose from, or (kind, low, high) with low < high "
                 f"and kind one of {', '.join(DISTRIBUTIONS)}; got {spec!r}.")
        if spec[0] == "log_uniform" and spec[1] <= 0:
            fail(f"sweep.random['{key}']: a log-uniform range must be positive.")
    if draws and not (isinstance(fields.get("num_points"), int) and fields["num_points"] > 0):
        fail("sweep.random needs sweep.num_points, the number of points to draw.")
    if not isinstance(fields.get("seed", 0), int):
        fail("sweep.seed must be an integer.")
    if fields.get("metric", "val_top1") not in METRICS:
        fail(f"sweep.metric = {fields['metric']!r}: rank by one of the metrics.csv columns {', '.join(METRICS)}.")
    if fields.get("output") is not None and not isinstance(fields["output"], str):
        fail("sweep.output must be a directory path.")


# --- Points ------------------------------------------------------------------------------------------------------

def short_names(keys):
    """key -> short column name: a macro in lower case, a binding by its parameter (more parts if ambiguous)."""
    def short(key, parts):
        pieces = re.split(r"[./]", key)
        return ".".join(pieces[-parts:]).lower()

    names = {}
    for key in keys:
        parts = 1
        while any(short(key, parts) == short(other, parts) for other in keys if other != key) \
                and parts < len(re.split(r"[./]", key)):
            parts += 1
        names[key] = short(key, parts)
    return names


def label(value):
    """A value as it appears in a point's name (no '/', ',' or spaces)."""
    if value is None or isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    text = re.sub(r"[^\w.+-]+", "_", str(value)).strip("_") or "_"
    if len(text) > 24:
        import hashlib  # pylint: disable=import-outside-toplevel

        text = text[:16] + "-" + hashlib.sha1(repr(value).encode()).hexdigest()[:6]
    return text


def _choices(values):
    """[(label, value)] of a grid entry or a random choice (a dict names its values)."""
    if isinstance(values, dict):
        return [(str(k), v) for k, v in values.items()]
    return [(label(v), v) for v in values]


def _draw(rng, spec):
    if isinstance(spec, (list, dict)):
        return rng.choice(_choices(spec))
    kind, low, high = spec
    if kind == "int_uniform":
        value = rng.randint(int(low), int(high))
    elif kind == "log_uniform":
        value = float(f"{math.exp(rng.uniform(math.log(low), math.log(high))):.3g}")
    else:
        value = float(f"{rng.uniform(low, high):.3g}")
    return label(value), value


def expand(sweep):
    """The sweep's points, in order: the grid's combinations (first key slowest), each with each random draw.

    Raises:
      UserError: two points with one name (two values of a key with one label).
    """
    names = short_names(sweep.keys)
    grid_points = [[]]
    for key, values in sweep.grid.items():
        grid_points = [p + [(key, choice)] for p in grid_points for choice in _choices(values)]
    draws = [None]
    if sweep.random:
        rng = random.Random(sweep.seed)
        draws = [[(key, _draw(rng, spec)) for key, spec in sweep.random.items()] for _ in range(sweep.num_points)]
    points = []
    for grid_point in grid_points:
        for index, draw in enumerate(draws):
            chosen = grid_point + (draw or [])
            points.append(Point({key: value for key, (_, value) in chosen},
                                {names[key]: text for key, (text, _) in chosen},
                                index=index if draw is not None else None))
    seen = {}
    for point in points:
        if point.name in seen:
            raise UserError(f"Invalid sweep file {sweep.path}: two points are named {point.name} ({point.values} and "
                            f"{seen[point.name].values}): give the values distinct labels (a dict: label -> value).")
        seen[point.name] = point
    return points


def sweep_dir(sweep):
    directory = FLAGS.sweep_dir if "sweep_dir" in FLAGS and FLAGS.sweep_dir else sweep.output
    if not directory:
        raise UserError(f"{sweep.path} names no output folder: set sweep.output or pass --sweep_dir.")
    return os.path.expanduser(directory)


def arguments(sweep, point, directory):
    """The `python -m trainer.main` arguments of a point (after the interpreter)."""
    return (["-m", "trainer.main"] + [f"--gin_file={f}" for f in sweep.base]
            + [f"--gin_bindings={b}" for b in sweep.bindings + point.bindings()]
            + [f"--model_dir={os.path.join(directory, point.name)}"])


def command_text(args):
    """The command as a shell line (`python -m trainer.main ...`), quoted as a person would."""
    return " ".join(_quote(a) for a in ["python"] + args)


def _quote(arg):
    if shlex.quote(arg) == arg or "'" not in arg:
        return shlex.quote(arg)
    if not any(c in arg for c in '"$`\\!'):
        return f'"{arg}"'
    return shlex.quote(arg)


# --- Checking every point before any trains ----------------------------------------------------------------------

def check_point(sweep, point, directory):
    """Parses a point's configuration as the trainer does. Returns its HParams values; raises UserError."""
    import gin  # pylint: disable=import-outside-toplevel

    from trainer import config, summaries  # pylint: disable=import-outside-toplevel

    gin.clear_config()
    try:
        config.parse_gin(sweep.base, sweep.bindings + point.bindings(),
                         model_dir=os.path.join(directory, point.name))
        config.require("trainer.train", "trainer.data")
        from trainer import optim  # pylint: disable=import-outside-toplevel

        schedule = gin.query_parameter("trainer.train.schedule") if _bound("trainer.train.schedule") \
            else optim.constant
        getattr(schedule, "scoped_configurable_fn", schedule)(steps_per_epoch=1, epochs=1)  # The rate's range.
        values = summaries.gin_hparams()
        names = short_names(list(point.values))
        for key, value in point.values.items():
            name = key if "." not in key else names[key]
            if values.get(name, object()) != summaries._hparam_value(value):  # pylint: disable=protected-access
                values[key if name in values else name] = value
        return values
    except UserError as err:
        raise UserError(one_line(err)) from None
    except Exception as err:  # pylint: disable=broad-except  (a configurable's own check)
        raise UserError(one_line(err) or type(err).__name__) from None
    finally:
        gin.clear_config()


def _bound(name):
    import gin  # pylint: disable=import-outside-toplevel

    try:
        gin.query_parameter(name)
        return True
    except ValueError:
        return False


def one_line(err):
    """An error's message on one line, without the "In call to configurable" lines gin appends."""
    text = cli._first_paragraph(err).strip()  # pylint: disable=protected-access
    return " ".join(line.strip() for line in text.splitlines())


# --- State: sweep.json --------------------------------------------------------------------------------------------

def read_state(directory):
    path = os.path.join(directory, STATE_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{path} cannot be read ({err}): move it away to start the sweep afresh.") from None


def write_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, default=repr)
        f.write("\n")
    os.replace(tmp, path)


def check_unchanged(state, points, sweep, directory):
    """Refuses a sweep file that alters points already started (their model directories were trained so)."""
    def settings(args):  # (The model directory is the point's name in this directory, however it is spelt.)
        return [a for a in args if not a.startswith("--model_dir=")]

    new = {p.name: settings(arguments(sweep, p, directory)) for p in points}
    changed = []
    for name, old in (state or {}).get("points", {}).items():
        if not old.get("starts"):
            continue
        if name not in new:
            changed.append(f"{name} (no longer a point of the sweep)")
        elif new[name] != settings(old["arguments"]):
            gone = [a for a in settings(old["arguments"]) if a not in new[name]]
            added = [a for a in new[name] if a not in settings(old["arguments"])]
            changed.append(f"{name} ({' '.join(gone)} -> {' '.join(added)})")
    if changed:
        raise UserError(f"The sweep file {sweep.path} changed since {directory} was run, and the change alters "
                        f"points already trained: {'; '.join(changed)}. Restore the file, or give the new sweep "
                        f"another output folder (sweep.output or --sweep_dir).")


# --- Running ------------------------------------------------------------------------------------------------------

class Runner:
    """Runs the points K at a time as `python -m trainer.main` processes, recording their state."""

    def __init__(self, sweep, points, directory, parallel, state):
        self.sweep, self.points, self.directory, self.parallel = sweep, points, directory, max(1, parallel)
        old = (state or {}).get("points", {})
        names = short_names(sweep.keys)
        self.state = {
            "sweep_file": os.path.abspath(sweep.path) if os.path.exists(sweep.path) else sweep.path,
            "metric": sweep.metric,
            "varied": [{"key": k, "name": names[k], "log": _log_uniform(sweep.random.get(k))} for k in sweep.keys],
            "points": {},
        }
        for p in points:
            entry = dict(old.get(p.name, {}))
            entry.update({"arguments": arguments(sweep, p, directory), "labels": p.labels,
                          "values": {k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)
                                     for k, v in p.values.items()}})
            entry.setdefault("status", "pending")
            entry.setdefault("starts", 0)
            entry.setdefault("wall_time", 0.0)
            self.state["points"][p.name] = entry
        for name, entry in old.items():  # Points dropped from the file that never started are forgotten.
            if name not in self.state["points"] and entry.get("starts"):
                self.state["points"][name] = entry
        self.running = {}  # name -> (Popen, start time, log file)
        self.stop_signal = None

    def save(self):
        write_json(os.path.join(self.directory, STATE_FILE), self.state)

    def log(self, text):
        print(f"[sweep] {text}", flush=True)

    def fail(self, name, error):
        entry = self.state["points"][name]
        entry.update(status="failed", error=error)
        self.log(f"failed {name}: {error}")

    def run(self, hparams):
        """Trains every point not finished yet. Returns the number of failed points."""
        from trainer import sweep_report as report  # pylint: disable=import-outside-toplevel

        os.makedirs(os.path.join(self.directory, "logs"), exist_ok=True)
        todo = []
        for p in self.points:
            entry = self.state["points"][p.name]
            model_dir = os.path.join(self.directory, p.name)
            if p.name not in hparams:
                continue  # Failed its check: recorded already.
            if entry["status"] == "finished" and os.path.isdir(model_dir):
                self.log(f"skip {p.name}: finished")
                continue
            todo.append(p)
        self.save()
        report.write(self.directory, self.state)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while (todo or self.running) and not (self.stop_signal and not self.running):
                while todo and len(self.running) < self.parallel and not self.stop_signal:
                    self._start(todo.pop(0), hparams)
                time.sleep(0.2)
                for name in list(self.running):
                    if self.running[name][0].poll() is not None:
                        self._finish(name)
                        report.write(self.directory, self.state)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.save()
        report.write(self.directory, self.state)
        if self.stop_signal:
            raise cli.Interrupted(f"the sweep stopped; the same command resumes it ({self.directory}).",
                                  self.stop_signal)
        return sum(e["status"] == "failed" for e in self.state["points"].values())

    def _on_signal(self, signum, frame):  # pylint: disable=unused-argument
        if self.stop_signal:
            return
        self.stop_signal = signum
        self.log(f"stopping: signal {signum} passed to {len(self.running)} running point(s), which checkpoint")
        for proc, _, _ in self.running.values():
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _start(self, point, hparams):
        from trainer import summaries  # pylint: disable=import-outside-toplevel

        entry = self.state["points"][point.name]
        model_dir = os.path.join(self.directory, point.name)
        if not entry["starts"] and not os.path.isdir(model_dir):
            # HParams first: TensorBoard keeps a run's first session, so the varied values show beside the
            # trainer's own (which it writes again at every start).
            summaries.hparams(model_dir, hparams[point.name])
        args = entry["arguments"]
        log_path = os.path.join(self.directory, "logs", point.name + ".log")
        log = open(log_path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
        log.write(f"=== start {time.strftime('%Y-%m-%d %H:%M:%S')}: {command_text(args)}\n")
        log.flush()
        proc = subprocess.Popen([sys.executable] + args, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        entry.update(status="running", starts=entry["starts"] + 1, pid=proc.pid, error=None)
        self.running[point.name] = (proc, time.time(), log)
        self.save()
        self.log(f"start {point.name}: {command_text(args)}")

    def _finish(self, name):
        proc, started, log = self.running.pop(name)
        log.close()
        entry = self.state["points"][name]
        entry["wall_time"] = entry.get("wall_time", 0.0) + time.time() - started
        entry["returncode"] = proc.returncode
        entry.pop("pid", None)
        if proc.returncode == 0:
            entry["status"] = "finished"
            self.log(f"finished {name} ({entry['wall_time']:.0f} s)")
        elif self.stop_signal and proc.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM, -signal.SIGINT,
                                                      128 + signal.SIGINT):
            entry["status"] = "interrupted"
            self.log(f"interrupted {name}")
        else:
            self.fail(name, last_error_line(os.path.join(self.directory, "logs", name + ".log"))
                      or f"exit code {proc.returncode}")
        self.save()


def _log_uniform(spec):
    return isinstance(spec, tuple) and spec[0] == "log_uniform"


def last_error_line(log_path):
    """The last `error:` (or `stopped:`) line of a point's log since its last start, else its last line."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            lines = f.read().split("=== start ")[-1].splitlines()[1:]
    except OSError:
        return None
    lines = [line.strip() for line in lines if line.strip()]
    for line in reversed(lines):
        if line.startswith(("error:", "stopped:")):
            return line
    return lines[-1] if lines else None


def main(argv):
    if len(argv) != 2:
        raise UserError("Give one sweep file: `python -m trainer.sweep gin/sweeps/quickstart_lr_aug.gin`.")
    if FLAGS.parallel < 1:
        raise UserError(f"--parallel={FLAGS.parallel}: give 1 or more points at once.")
    sweep = read_sweep_file(argv[1])
    points = expand(sweep)
    directory = sweep_dir(sweep)
    state = read_state(directory)
    check_unchanged(state, points, sweep, directory)
    print(f"Sweep {sweep.path}: {len(points)} points, ranked by {sweep.metric}, in {directory}", flush=True)
    for point in points:
        print(f"  {point.name}\n    {command_text(arguments(sweep, point, directory))}", flush=True)
    cli.register_configurables()
    hparams, invalid = {}, {}
    for point in points:
        try:
            hparams[point.name] = check_point(sweep, point, directory)
        except UserError as err:
            invalid[point.name] = one_line(err)
    if FLAGS.dry_run:
        for name, error in invalid.items():
            print(f"invalid {name}: {error}")
        print(f"Dry run: {len(points) - len(invalid)} valid points, {len(invalid)} invalid; nothing trained.")
        return
    os.makedirs(directory, exist_ok=True)
    runner = Runner(sweep, points, directory, FLAGS.parallel, state)
    for name, error in invalid.items():
        runner.fail(name, error)
    failed = runner.run(hparams)
    print(f"Report: {os.path.join(directory, 'report.md')}", flush=True)
    if failed:
        raise UserError(f"{failed} of {len(points)} points failed (their errors are in the report); the others "
                        "finished. Fix them and rerun the same command: finished points are skipped.")


def run():
    """The command; its console script `tiny-sweep` runs this module as `python -m` does (trainer.cli)."""
    flags.DEFINE_integer("parallel", 1, "Points trained at once, each its own process.")
    flags.DEFINE_bool("dry_run", False, "Print and check the points; train nothing.")
    flags.DEFINE_string("sweep_dir", None, "Overrides sweep.output (the sweep directory).")
    cli.run(main, usage=lambda: __doc__)


if __name__ == "__main__":
    cli.fast_help(__doc__)
    run()
