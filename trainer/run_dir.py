"""The model directory of a run: one run at a time (a lock with a heartbeat), signals, the operative config.

Two runs never write one model directory at once: the first takes `LOCK`
(host and pid, created with O_EXCL) and refreshes its modification time while
it trains. A second run is refused while the holder is alive; it takes over
a lock whose holder is provably gone: a dead process on this host, or a lock
on another host that has not been refreshed for `STALE_AFTER_SECONDS`.
"""

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import time

import tensorflow as tf
from absl import logging

from trainer import checkpoints
from trainer.errors import UserError

HEARTBEAT_SECONDS = 30
STALE_AFTER_SECONDS = 600  # 20 missed heartbeats.


class ModelDirLock:
    """A lock file that stops a second run from writing the same model directory.

    Local files only (`os.open` with O_EXCL, which tf.io.gfile lacks): on gs://
    the model directory is not locked.
    """

    def __init__(self, model_dir):
        self.path = os.path.join(model_dir, "LOCK")
        self._last_beat = 0.0
        self._held = False
        if "://" in self.path:
            logging.warning("Model directory %s is not locked against a second run (remote filesystem).",
                            model_dir)
            return
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                stale = self._stale()
                if stale:
                    logging.warning("Taking over the stale lock %s (%s).", self.path, stale)
                    try:
                        if os.path.isdir(self.path):
                            shutil.rmtree(self.path)
                        else:
                            os.remove(self.path)
                    except FileNotFoundError:  # Another run took it over first.
                        pass
                    continue
                raise UserError(self._in_use_message(model_dir)) from None
            except OSError as err:
                raise UserError(f"Cannot write the model directory {model_dir}: {err.strerror} ({self.path}). "
                                "Use a writable --model_dir.") from None
            os.write(fd, f"{socket.gethostname()} {os.getpid()}".encode())
            os.close(fd)
            self._held = True
            self._last_beat = time.time()
            return
        raise UserError(f"Could not take the lock {self.path}: another run keeps taking it.")

    def _in_use_message(self, model_dir):
        holder = self._holder()
        host = holder.split()[0] if holder.split() else "unknown"
        pid = holder.split()[1] if len(holder.split()) > 1 else "<pid>"
        if host == socket.gethostname():
            how = "that process is alive"
        else:
            age = self._age()
            how = (f"it runs on {host}: check there with `ps -p {pid}`; its lock was refreshed {age:.0f} s ago and "
                   f"is taken over automatically once {STALE_AFTER_SECONDS} s pass without a refresh")
        return (f"Model directory {model_dir} is in use by another run (host and pid: {holder}; {how}). "
                f"Wait for it or use another --model_dir.")

    def _holder(self):
        try:
            with open(self.path, "rb") as f:
                return f.read(200).decode("utf-8", "replace").strip()
        except OSError:
            return "unknown"

    def _age(self):
        try:
            return time.time() - os.path.getmtime(self.path)
        except OSError:
            return 0.0

    def _stale(self):
        """Why the lock is stale (its holder is provably gone, or it is no lock a run writes), or None."""
        if os.path.isdir(self.path):
            return "a directory, not a lock file"
        holder = self._holder()
        if len(holder.split()) != 2 or not holder.split()[1].isdigit() or not holder.isprintable():
            return f"garbled: {holder[:40]!r}, not 'host pid'"  # Or its writer died between creating and writing it.
        host, pid = holder.split()
        if host != socket.gethostname():  # Its heartbeat stopped?
            return f"{holder}: not refreshed for {self._age():.0f} s" if self._age() > STALE_AFTER_SECONDS else None
        return None if process_alive(pid) else f"{holder}: no such process"

    def heartbeat(self):
        """Refreshes the lock's modification time (at most every HEARTBEAT_SECONDS); checks the lock is still there.

        Raises:
          UserError: the lock vanished: the model directory was deleted or moved under the run (nothing more is
            written).
        """
        if self._held and not os.path.exists(self.path):
            self._held = False
            raise UserError(f"The model directory {os.path.dirname(self.path)} vanished under the run (its lock "
                            f"{self.path} is gone): stopped without writing anything more. Put it back and run the "
                            "same command to resume, or run it to start afresh.")
        now = time.time()
        if self._held and now - self._last_beat >= HEARTBEAT_SECONDS:
            try:
                os.utime(self.path)
            except OSError:
                pass
            self._last_beat = now

    def release(self):
        if self._held and self._holder() == f"{socket.gethostname()} {os.getpid()}":
            os.remove(self.path)
        self._held = False


def process_alive(pid):
    """True unless `pid` (an int or a string of digits) is provably not a live process on this host."""
    try:
        if int(pid) <= 0:
            return False  # (Not a process: kill(0) and kill(-1) signal groups.)
        os.kill(int(pid), 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: larger than any pid.
        return False
    except (PermissionError, ValueError):
        return True
    return True


def remove_dead_temps(model_dir):
    """Removes the `<file>.tmp-<pid>` a write killed midway left in the model directory (of dead pids only)."""
    if "://" in model_dir:
        return
    for path in tf.io.gfile.glob(os.path.join(model_dir, "*.tmp-*")):
        pid = path.rsplit("-", 1)[1]
        if pid.isdigit() and not process_alive(pid):
            logging.warning("Removing %s, left by a write that was killed midway.", path)
            os.remove(path)


class StopSignals:
    """SIGTERM (preemption) or SIGINT: the loop finishes its current execution, checkpoints and stops.

    Until the first training step has run (`immediate`: opening the data, the scan, decoding it into memory,
    tracing the step) there is nothing new to save: a signal stops the run at once (it raises `Interrupted`
    where the main thread is), so a stop is never delayed by that long first execution. A second signal
    stops at once (KeyboardInterrupt), without a checkpoint. `received` is the first signal's number, or None.
    """

    def __init__(self, signals):
        self.received = None
        self.saved = False  # True if tf.distribute's PreemptionCheckpointHandler already saved.
        self.immediate = True
        self.stage = "the first training step"  # What a signal stops at once, while `immediate`.
        self._previous = {}
        for sig, handler in [(s, self._handle) for s in signals] + [(signal.SIGALRM, self._retry)]:
            try:
                self._previous[sig] = signal.signal(sig, handler)
            except ValueError:  # Not the main thread (e.g. under a test runner thread).
                pass

    def _handle(self, signum, frame):
        if self.received:
            raise KeyboardInterrupt
        self.received = signum
        if self.immediate:
            self._raise_if_safe(frame)

    def _raise_if_safe(self, frame):
        """Raises `before_training()` unless the main thread is where an exception would be swallowed (a logging
        handler, a `__del__`): then tries again in 50 ms (SIGALRM)."""
        while frame is not None:
            if frame.f_code.co_name == "__del__" or f"{os.sep}logging{os.sep}" in frame.f_code.co_filename:
                signal.setitimer(signal.ITIMER_REAL, 0.05)
                return
            frame = frame.f_back
        # Code that catches every exception can swallow this one (autograph does while it converts a function,
        # then runs it unconverted): raised again in 0.5 s until the stop is under way (`immediate` off).
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        raise self.before_training()

    def _retry(self, signum, frame):
        del signum
        if self.received and self.immediate:
            self._raise_if_safe(frame)

    def before_training(self):
        """The `Interrupted` of a signal received before the first training step."""
        from trainer.cli import Interrupted  # pylint: disable=import-outside-toplevel

        if self.stage != "the first training step":
            return Interrupted(f"{self.name} during {self.stage}: every checkpoint is saved. Run the same command to "
                               "redo them.", self.received)
        return Interrupted(f"{self.name} before the first training step: nothing new to save, the model directory "
                           "holds what it held. Run the same command to start again.", self.received)

    def preempted(self):
        """Called by the PreemptionCheckpointHandler after it saved (multi-worker SIGTERM)."""
        self.received, self.saved = signal.SIGTERM, True

    @property
    def name(self):
        return signal.Signals(self.received).name if self.received else None

    def restore(self):
        if signal.SIGALRM in self._previous:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def write_text(path, text):
    """Writes a small file atomically: a temporary file, then renamed over `path` (gs:// and ram:// too)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    if "://" in path:  # (Some file systems' GFile(..., "w") appends to an existing file: ram:// does.)
        with tf.io.gfile.GFile(tmp, "w") as f:
            f.write(text)
        tf.io.gfile.rename(tmp, path, overwrite=True)
        return
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as err:
        raise UserError(f"Cannot write {path}: {err.strerror}. Free some space or use another --model_dir; "
                        "nothing else was changed.") from None
    finally:  # Also when a signal interrupts the write.
        if os.path.exists(tmp):
            os.remove(tmp)


# What a checkpoint cannot carry from one run of a phase to the next (model_dir/settings.json, written when the
# phase starts): resuming with another value is refused. Everything else (learning rate, epochs, ...) is carried,
# and the resumed run logs how its gin configuration differs from the previous run's (model_dir/config.gin).
SETTINGS_FILE = "settings.json"


def settings(data, num_classes):
    """What the checkpoints of this phase cannot carry to another value (see SETTINGS_FILE)."""
    from trainer.models import builder  # pylint: disable=import-outside-toplevel

    name, blocks = builder.declared()
    return {"IMAGE_SIZE": data.image_size, "BATCH_SIZE": data.batch_size, "AUGMENT": data.augment,
            "NUM_CLASSES": num_classes, "trainer.network.name": name,
            "trainer.network.blocks": json.dumps(blocks, sort_keys=True, default=repr),
            "classes": list(data.source.class_ids)}  # Another dataset at DATA_DIR: the head's outputs mean others.


# What evaluation, export, predict and compare need of a run's data, written when the run starts: the source, the
# classes and the preprocessing. Read in one place (`read_data_settings`), never re-derived from gin values.
DATA_FILE = "data.json"


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """A run's data as it recorded it: `source` (the source's describe()), classes, `preprocess`."""

    source: dict
    class_ids: list
    class_names: list
    preprocess: object  # trainer.data.preprocess.Preprocessing


def write_data_settings(model_dir, data):
    """Records the run's source, classes and preprocessing in model_dir/data.json."""
    write_text(os.path.join(model_dir, DATA_FILE), json.dumps({
        "source": data.source.describe(), "class_ids": list(data.source.class_ids),
        "class_names": list(data.source.class_names), "preprocessing": data.preprocess.to_json()}, indent=1) + "\n")


def read_data_settings(model_dir):
    """A run's `DataSettings` from model_dir/data.json.

    Raises:
      UserError: the file is missing or damaged (naming it and what was expected).
    """
    from trainer.data.preprocess import Preprocessing  # pylint: disable=import-outside-toplevel

    path = os.path.join(model_dir, DATA_FILE)
    try:
        with tf.io.gfile.GFile(path) as f:
            value = json.loads(f.read())
        settings = DataSettings(dict(value["source"]), list(value["class_ids"]), list(value["class_names"]),
                                Preprocessing.from_json(value["preprocessing"]))
        if len(settings.class_ids) != len(settings.class_names):
            raise ValueError("class_ids and class_names differ in length")
        return settings
    except tf.errors.NotFoundError:
        raise UserError(f"No {DATA_FILE} in {model_dir}: expected the model directory of a run of "
                        "`python -m trainer.main` (it records its classes and preprocessing there when it "
                        "starts).") from None
    except (ValueError, KeyError, TypeError, AttributeError, tf.errors.OpError) as err:
        raise UserError(f"Cannot read {path} ({err}): it is damaged. Rerun the same training command to write "
                        "it again (it resumes the run).") from None


def check_resumable(model_dir, settings):
    """Refuses to resume a phase with settings its checkpoints cannot carry; logs the carried changes.

    Raises:
      UserError: naming each setting that changed, its old and new value, and the two ways on.
    """
    import gin  # pylint: disable=import-outside-toplevel

    path = os.path.join(model_dir, SETTINGS_FILE)
    try:
        with tf.io.gfile.GFile(path) as f:
            saved = json.loads(f.read())
        if not isinstance(saved, dict):
            raise ValueError(f"a JSON {type(saved).__name__}, not an object")
    except tf.errors.NotFoundError:
        saved = {}  # A model directory of an older version: the restore still checks the network's variables.
    except (ValueError, UnicodeDecodeError) as err:  # Empty, truncated, garbage: never taken as permissive.
        raise UserError(f"Cannot resume {model_dir}: its {SETTINGS_FILE} is damaged ({str(err)[:100] or 'empty'}), "
                        "so the settings its checkpoints were trained with cannot be checked. Restore that file, or "
                        "delete it to resume without the check, or train in a new --model_dir.") from None
    changed = [k for k in settings if k in saved and saved[k] != settings[k]]
    if changed:
        def show(key, old, new):
            if key == "trainer.network.blocks":
                return f"{key} was another block list"
            if key == "classes":  # The first that differs.
                i = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
                return (f"the dataset's classes differ: class {i} was {old[i] if i < len(old) else None!r}, now "
                        f"{new[i] if i < len(new) else None!r}")
            return f"{key} was {old!r}, now {new!r}"

        what = "; ".join(show(k, saved[k], settings[k]) for k in changed)
        raise UserError(f"Cannot resume {model_dir} with other settings ({what}): its checkpoints were trained "
                        f"with the old ones. Rerun with the old values to resume it, or train in a new --model_dir "
                        f"(start it from these weights with trainer.train.init_from = '{model_dir}').")
    try:
        with tf.io.gfile.GFile(os.path.join(model_dir, "config.gin")) as f:
            previous = f.read()
    except tf.errors.NotFoundError:
        return
    import difflib  # pylint: disable=import-outside-toplevel

    diff = [line for line in difflib.unified_diff(previous.splitlines(), gin.config_str().splitlines(),
                                                  lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---")) and line[1:].strip()
            and not line[1:].startswith("#")]
    if diff:
        logging.info("The gin configuration changed since the last run of this phase (the checkpoint carries "
                     "these changes; operative_config.gin is rewritten):\n  %s", "\n  ".join(diff))


def makedirs(model_dir):
    """Creates the model directory; an unwritable one is a one-line UserError."""
    try:
        tf.io.gfile.makedirs(model_dir)
    except (tf.errors.OpError, OSError) as err:
        reason = getattr(err, "message", None) or getattr(err, "strerror", None) or str(err)
        raise UserError(f"Cannot create the model directory {model_dir}: {reason}. Use a writable --model_dir.") \
            from None


_DISK_PROBLEMS = ("No space left on device", "Disk quota exceeded", "Read-only file system")


@contextlib.contextmanager
def disk_errors(model_dir):
    """A full disk or a read-only model directory (a checkpoint, an event file, the CSV): one line, no leftovers.

    Raises:
      UserError: naming the model directory, the problem and the checkpoint the same command resumes from.
    """
    try:
        yield
    except (tf.errors.OpError, OSError) as err:
        text = getattr(err, "message", None) or str(err)
        problem = next((p for p in _DISK_PROBLEMS if p in text), None)
        if not problem:
            raise
        checkpoints.remove_partial_saves(model_dir, ignore_errors=True)  # The save the error killed.
        latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
        raise UserError(f"Cannot write to the model directory {model_dir}: {problem}. Free some space there (or use "
                        f"a writable --model_dir) and run the same command: it resumes from "
                        f"{latest or 'the start (no checkpoint was written)'}, which is intact.") from None


@contextlib.contextmanager
def claimed(model_dir, distribution):
    """Holds the model directory's lock (chief) and the stop signals for the run's duration."""
    lock = ModelDirLock(model_dir) if distribution.chief else None
    if lock:
        remove_dead_temps(model_dir)
    # Under MultiWorkerMirroredStrategy, the PreemptionCheckpointHandler takes SIGTERM.
    signals = StopSignals([signal.SIGINT] if distribution.multi_worker else [signal.SIGINT, signal.SIGTERM])
    try:
        yield lock, signals
    except Exception as err:  # pylint: disable=broad-except
        if signals.received and signals.immediate and not isinstance(err, UserError):
            # The stop raised inside TensorFlow's tracing (a tf.data function, a tf.function): it arrives wrapped
            # (autograph's StagingError); it is the same stop.
            raise signals.before_training() from None
        raise
    finally:
        signals.immediate = False  # A signal now must not skip the lock's release.
        signals.restore()
        if lock:
            lock.release()
