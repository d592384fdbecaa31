"""Exports a trained network for serving: `python -m trainer.export --model_dir=runs/x`.

An export directory (model_dir/export by default) holds:

    saved_model/   a SavedModel whose `serving_default` signature takes encoded
                   images (1-D tf.string: JPEG, PNG, GIF, BMP or WebP bytes of any size,
                   greyscale, RGBA and CMYK too) and returns `probabilities`
                   [N, C], `top_k_indices` [N, k] (int32), `top_k_probabilities`
                   [N, k], `top_k_wnids` and `top_k_names` [N, k] (tf.string), and
                   `valid` [N] (bool): an image that cannot be decoded is answered
                   with valid False, zeros, -1 and '' and does not fail the call.
                   Loading it needs TensorFlow only (`tf.saved_model.load`).
    model.keras    the Keras network (float32 [N, S, S, 3] images, prepared as
                   export.json says -> logits [N, C]); stock Keras layers only, so
                   `keras.saving.load_model` needs no custom objects.
    classes.json   {"wnids": [...], "names": [...]}: label i is wnids[i].
    export.json    everything a client needs to feed `model.keras` itself:
                   classes, image_size, input_scale (1/255), resize_method,
                   antialias, mean and std (standardisation after the scaling, or
                   null), top_k, the signature, and `source` (the checkpoint and
                   step exported).

The signature prepares an image with the run's own `Preprocessing`
(`trainer.data.preprocess`), the object training and evaluation use: decode
to uint8 RGB, take the centred square if the run set `crop='center'` (else the
whole image is stretched to a square), resize to image_size x image_size with
the run's resize method (antialiased unless 'nearest') unless it already has
that size, round back to uint8, scale by 1/255, then subtract `mean` and
divide by `std` when the run set them.

An export is written next to its destination (`partial.<name>-<pid>` beside
`<name>`; no staging name begins with the export's own, which object stores
and ram:// would take for the export itself)
and swapped in whole: a failed export (a full disk) leaves the previous one
as it was.

The trainer exports the best checkpoint at the end of a phase
(`export_trained(model_dir, data)`); the command line exports any checkpoint
of a run from its model directory alone:

  --model_dir   a run's model directory (holds operative_config.gin and checkpoints/, best/).
  --checkpoint  'best' (default: best val top-1), 'latest', or a checkpoint path.
  --export_dir  where to export (default: <model_dir>/export).
  --force       replace <model_dir>/export when it holds another checkpoint's export (refused otherwise:
                the trainer puts the best checkpoint's export there).
"""
if __name__ == "__main__":  # `--help` answers before TensorFlow loads.
    from trainer import cli as _cli

    _cli.fast_help(__doc__)


import datetime
import json
import os
import sys

import gin
import keras
import tensorflow as tf
from absl import logging

from trainer import checkpoints
from trainer import cli
from trainer import run_dir
from trainer.errors import UserError

SAVED_MODEL = "saved_model"
KERAS_MODEL = "model.keras"
CLASSES_FILE = "classes.json"
METADATA_FILE = "export.json"
README_FILE = "README.txt"
SIGNATURE = "serving_default"
FORMAT_VERSION = 1
_PARTIAL = "partial"
_PREVIOUS = "previous"


class _Serving(tf.Module):
    """The SavedModel's root: the network's variables and the `serving_default` function."""

    def __init__(self, model, metadata, preprocess):
        super().__init__(name="serving")
        self.model_variables = list(model.variables)  # Tracked: saved with the SavedModel.
        self._forward = lambda images: model(images, training=False)  # A closure: the Keras object is not saved.
        self._preprocess = preprocess
        self._wnids = tf.constant(metadata["wnids"], tf.string)
        self._names = tf.constant(metadata["names"], tf.string)
        self._top_k = metadata["top_k"]
        self.serve = tf.function(self._serve, input_signature=[tf.TensorSpec([None], tf.string, name="images")])

    def _serve(self, images):
        pixels, valid = self._decode(images)
        logits = tf.cond(  # An empty call skips the network (oneDNN's matmul fails on a batch of 0).
            tf.size(images) > 0, lambda: tf.cast(self._forward(self._preprocess.prepare(pixels)), tf.float32),
            lambda: tf.zeros([0, self._wnids.shape[0]]))
        probabilities = tf.where(valid[:, None], tf.nn.softmax(logits, axis=-1), 0.0)
        top_p, top_i = tf.math.top_k(probabilities, k=self._top_k)
        top_i = tf.where(valid[:, None], top_i, -1)
        return {"probabilities": probabilities, "top_k_indices": top_i, "top_k_probabilities": top_p,
                "top_k_wnids": self._names_of(self._wnids, top_i), "top_k_names": self._names_of(self._names, top_i),
                "valid": valid}

    def _decode(self, images):
        """uint8 [N, S, S, 3] and valid [N]: an image that cannot be decoded (or is too large) is a row of zeros
        flagged invalid instead of failing the call. tf.data's `ignore_errors` drops the failed ones; each
        decoded image carries its row back."""
        size, count = self._preprocess.image_size, tf.size(images)
        rows = tf.range(count)
        decoded = tf.data.Dataset.from_tensor_slices((rows, images)).map(
            lambda row, encoded: (row, self._preprocess.decode(encoded)), num_parallel_calls=tf.data.AUTOTUNE)
        sentinel = tf.data.Dataset.from_tensors((count, tf.zeros([size, size, 3], tf.uint8)))  # Never empty.
        rows, pixels = decoded.ignore_errors().concatenate(sentinel).batch(tf.cast(count, tf.int64) + 1) \
            .get_single_element()
        valid = tf.scatter_nd(rows[:, None], tf.ones_like(rows), [count + 1])[:count] > 0
        pixels = tf.scatter_nd(rows[:, None], tf.cast(pixels, tf.int32), [count + 1, size, size, 3])[:count]
        return tf.cast(pixels, tf.uint8), valid

    @staticmethod
    def _names_of(names, indices):
        return tf.where(indices >= 0, tf.gather(names, tf.maximum(indices, 0)), "")


def export_model(model, preprocess, wnids, class_names, export_dir, source=None, top_k=5):
    """Writes a SavedModel, the `.keras` model and the class list to `export_dir`, replacing it atomically.

    Everything is written to `partial.<name>-<pid>` beside it first, then swapped in;
    leftovers of an export killed earlier are removed first.

    Args:
      model: a Keras model mapping float32 [N, S, S, 3] images, prepared by `preprocess`, to logits [N, C].
      preprocess: the run's `trainer.data.preprocess.Preprocessing` (the serving function calls it).
      wnids: the C class ids, in label order.
      class_names: a human-readable name per class, in the same order.
      export_dir: the export directory (created or replaced).
      source: a JSON-serialisable description of what was exported (e.g. the
        checkpoint path and step), recorded in export.json.
      top_k: classes returned by the signature's top-k outputs (at most C).

    Returns:
      The metadata written to export.json, as a dict.

    Raises:
      UserError: classes that do not match the network's outputs, a bad
        preprocessing setting, or an export that could not be written (the
        previous export is then unchanged).
    """
    num_classes = int(model.output_shape[-1])
    if not len(wnids) == len(class_names) == num_classes:
        raise UserError(f"Cannot export {export_dir}: the network outputs {num_classes} classes but "
                        f"{len(wnids)} wnids and {len(class_names)} class names were given; expected "
                        f"{num_classes} of each.")
    if top_k < 1:
        raise UserError(f"Cannot export {export_dir}: top_k must be >= 1, got {top_k}.")
    export_dir = _local(export_dir).rstrip("/")
    image_size, mean, std = preprocess.image_size, preprocess.mean, preprocess.std
    standardise = "" if mean is None else ", then (x - mean) / std"
    metadata = {
        "format_version": FORMAT_VERSION,
        "wnids": list(wnids),
        "names": list(class_names),
        "num_classes": num_classes,
        "image_size": int(image_size),
        "input_scale": preprocess.to_json()["input_scale"],
        "mean": None if mean is None else [float(v) for v in mean],
        "std": None if std is None else [float(v) for v in std],
        "input": f"float32 RGB [N, image_size, image_size, 3] = uint8 pixels * input_scale{standardise}",
        "resize_method": preprocess.resize,
        "antialias": preprocess.antialias,
        "crop": preprocess.crop,
        "resize_rule": ("the centred square is cut out first, then " if preprocess.crop == "center" else
                        "a non-square image is stretched to a square: ") +
                       "resized only when not already image_size x image_size, then rounded to uint8",
        "preprocessing": preprocess.to_json(),
        "top_k": min(int(top_k), num_classes),
        "signature": {"name": SIGNATURE, "input": "images: 1-D tf.string of encoded images (JPEG, PNG, GIF, BMP, WebP)",
                      "outputs": {"probabilities": "float32 [N, C]: softmax over the classes, label order",
                                  "top_k_indices": "int32 [N, k]: labels, most probable first",
                                  "top_k_probabilities": "float32 [N, k]",
                                  "top_k_wnids": "string [N, k]: class ids (classes.json 'wnids')",
                                  "top_k_names": "string [N, k]: class names (classes.json 'names')",
                                  "valid": "bool [N]: False for an image that could not be decoded (or declares "
                                           "more than max_pixels pixels): its row has probabilities 0, "
                                           "top_k_indices -1 and empty names; the other rows are answered"}},
        "keras_model_output": "logits float32 [N, C] (apply a softmax for probabilities)",
        "saved_model": SAVED_MODEL,
        "keras_model": KERAS_MODEL,
        "source": source,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
    }
    _clean_leftovers(export_dir)
    partial = _staging(export_dir, _PARTIAL)
    try:
        _remove(partial)
        tf.io.gfile.makedirs(partial)
        _write_export(model, metadata, partial)
        _swap_in(partial, export_dir)
    except (OSError, tf.errors.OpError) as err:
        _remove(partial, ignore_errors=True)
        reason = " ".join(str(err).split()) or type(err).__name__
        raise UserError(f"Could not export to {export_dir}: {reason}. The previous export there (if any) is "
                        "unchanged; free some disk space or choose another export directory, then run the "
                        "export again.") from None
    logging.info("Exported %s (%d classes, %d px, source: %s).", export_dir, num_classes, image_size,
                 _describe(source))
    return metadata


def _write_export(model, metadata, directory):
    """Writes the SavedModel, model.keras, classes.json and export.json into `directory`."""
    from trainer.data.preprocess import Preprocessing  # pylint: disable=import-outside-toplevel

    serving = _Serving(model, metadata, Preprocessing.from_json(metadata["preprocessing"]))
    tf.saved_model.save(serving, os.path.join(directory, SAVED_MODEL),
                        signatures={SIGNATURE: serving.serve.get_concrete_function()})
    model.save(os.path.join(directory, KERAS_MODEL))
    _write_json(os.path.join(directory, CLASSES_FILE), {"wnids": metadata["wnids"], "names": metadata["names"]})
    _write_json(os.path.join(directory, METADATA_FILE), metadata)
    with tf.io.gfile.GFile(os.path.join(directory, README_FILE), "w") as f:
        f.write(_readme(metadata))


def _readme(metadata):
    """README.txt: what the export holds, how to feed it, what comes out."""
    prep = metadata["preprocessing"]
    crop = ("the largest centred square is cut out first" if prep["crop"] == "center" else
            "a non-square image is stretched to a square (not cropped)")
    standardise = "" if metadata["mean"] is None else f", then (x - {metadata['mean']}) / {metadata['std']}"
    return f"""An image classifier exported by tiny-imagenet-trainer ({metadata['num_classes']} classes).
Exported from: {_describe(metadata.get("source"))}.

saved_model/  TensorFlow SavedModel; needs TensorFlow only:
                  serve = tf.saved_model.load("saved_model").signatures["{SIGNATURE}"]
                  out = serve(images=tf.constant([open("photo.jpg", "rb").read()]))
              Input: encoded image bytes (JPEG, PNG, GIF, BMP, WebP), any size, colour or greyscale.
              Outputs: probabilities [N, C], top_k_indices, top_k_probabilities, top_k_wnids, top_k_names
              (k = {metadata['top_k']}), valid [N]: an image that cannot be decoded gets valid False,
              probabilities 0, top_k_indices -1 and empty names; the other images of the call are answered.
model.keras   the Keras network: float32 images [N, {prep['image_size']}, {prep['image_size']}, 3] in, LOGITS out
              (no softmax). Prepare images as the signature does (below).
classes.json  label i is wnids[i], named names[i].
export.json   all of this, machine-readable.

How an image is prepared (exactly as in training): decoded to RGB; {crop};
resized to {prep['image_size']} x {prep['image_size']} with '{prep['resize']}' (antialias: {prep['antialias']}) unless
already that size, rounded to uint8; pixels / 255{standardise}.
"""


def _write_json(path, value):
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(json.dumps(value, indent=2) + "\n")


def _swap_in(partial, export_dir):
    """Replaces `export_dir` by `partial`: old away, new in, old deleted (restored if the new cannot go in).

    Locally on Linux the two directories are exchanged in one step (renameat2 RENAME_EXCHANGE), so `export_dir`
    is never missing, even to a kill midway; elsewhere the old one is moved aside first (a killed swap is undone
    by the next export, `_clean_leftovers`).
    """
    previous = _staging(export_dir, _PREVIOUS)
    had_previous = _present(export_dir)
    if had_previous and _exchange(partial, export_dir):
        _remove(partial, ignore_errors=True)  # Now the old export.
        return
    if had_previous:
        _remove(previous)
        _move(export_dir, previous)
    try:
        _move(partial, export_dir)
    except (OSError, tf.errors.OpError):
        if had_previous:
            _move(previous, export_dir)
        raise
    if had_previous:
        _remove(previous, ignore_errors=True)


def _staging(export_dir, kind, pid=None):
    """`<parent>/<kind>.<name>-<pid>`: where an export is staged (partial) or the old one waits (previous)."""
    parent, name = os.path.split(export_dir)
    return os.path.join(parent, f"{kind}.{name}-{os.getpid() if pid is None else pid}")


def _exchange(a, b):
    """Exchanges two local paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where that is unavailable."""
    if "://" in a or not sys.platform.startswith("linux"):
        return False
    import ctypes  # pylint: disable=import-outside-toplevel

    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    at_fdcwd, rename_exchange = -100, 2
    return bool(renameat2) and renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _clean_leftovers(export_dir):
    """Removes `partial.<name>-*` of dead exports; brings back a `previous.<name>-*` a killed swap left alone."""
    for path in sorted(tf.io.gfile.glob(_staging(export_dir, _PARTIAL, "*")) +
                       tf.io.gfile.glob(_staging(export_dir, _PREVIOUS, "*"))):
        path = path.rstrip("/")
        if _owner_alive(path):
            continue
        if os.path.basename(path).startswith(_PREVIOUS) and not _present(export_dir):
            logging.warning("Restoring %s: an export was killed while swapping it for a new one.", path)
            _move(path, export_dir)
            continue
        logging.warning("Removing %s, left by an export that did not finish.", path)
        _remove(path, ignore_errors=True)


def _owner_alive(path):
    """True if `path` ends with the pid of another live process on this host (a concurrent export)."""
    pid = path.rsplit("-", 1)[-1]
    if not pid.isdigit() or int(pid) == os.getpid() or "://" in path:
        return False
    return run_dir.process_alive(pid)


def _move(src, dst):
    """Renames the directory `src` to `dst`; on object stores (and ram://), file by file (no directory objects)."""
    if "://" not in src:
        tf.io.gfile.rename(src, dst)
        return
    for root, _, names in tf.io.gfile.walk(src):
        target = dst + root[len(src):]
        tf.io.gfile.makedirs(target)
        for name in names:
            tf.io.gfile.rename(os.path.join(root, name), os.path.join(target, name), overwrite=True)
    tf.io.gfile.rmtree(src)


def _present(path):
    """Whether `path` itself exists: some file systems (ram://) also say so for any longer name it begins."""
    parent, name = os.path.split(path.rstrip("/"))
    return tf.io.gfile.exists(path) and name in {n.rstrip("/") for n in tf.io.gfile.listdir(parent)}


def _remove(path, ignore_errors=False):
    try:
        if _present(path):
            tf.io.gfile.rmtree(path) if tf.io.gfile.isdir(path) else tf.io.gfile.remove(path)
    except (OSError, tf.errors.OpError):
        if not ignore_errors:
            raise


def _local(path):
    return path if "://" in path else os.path.expanduser(path)


def _describe(source):
    if not source:
        return "not recorded"
    if isinstance(source, dict) and "checkpoint" in source:
        return f"{source['checkpoint']} at step {source.get('step')}"
    return str(source)


# --- Exporting a run's checkpoint. ------------------------------------------------


def export_trained(model_dir, data, checkpoint="best", export_dir=None, top_k=5):
    """Builds the gin-declared network, loads a run's checkpoint into it and exports it: the trainer's phase-end call.

    Uses the gin configuration in force (the trainer's own; `export_checkpoint`
    parses a run's operative config first). The network is built afresh in
    float32, outside any distribution strategy, whatever policy the run trained under.

    Args:
      model_dir: the run's model directory.
      data: the phase's `trainer.data.pipeline.Data`: the classes (`data.source`) and the preprocessing.
      checkpoint: 'best', 'latest' or a checkpoint path (`checkpoints.find_checkpoint`).
      export_dir: default <model_dir>/export.
      top_k: classes in the signature's top-k outputs.

    Returns:
      The export metadata (export.json) as a dict, plus `export_dir`: where it went. Its `source` names
      the checkpoint, its step and epoch, the val top-1 training logged for that epoch and the best so far.

    Raises:
      UserError: no such checkpoint, a checkpoint of another network, a failed export.
    """
    return _export_run(model_dir, checkpoint, export_dir, top_k, data.preprocess, data.source.class_ids,
                       data.source.class_names)


def _export_run(model_dir, checkpoint, export_dir, top_k, preprocess, wnids, class_names):
    from trainer.models import builder  # pylint: disable=import-outside-toplevel

    model_dir = _local(model_dir)
    export_dir = _local(export_dir) if export_dir else os.path.join(model_dir, "export")
    path = checkpoints.find_checkpoint(model_dir, checkpoint)
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")  # Mixed-precision runs keep float32 weights.
    try:
        model = builder.build_network(preprocess.image_size)
    finally:
        keras.mixed_precision.set_global_policy(policy)
    checkpoints.restore_weights(model, path)
    info = checkpoints.describe_checkpoint(path)
    source = {"model_dir": model_dir, "checkpoint": path,
              "kind": checkpoint if checkpoint in checkpoints.CHECKPOINT_DIRS else "path", **info}
    logging.info("Exporting %s checkpoint %s (step %s) to %s.", source["kind"], path, info["step"], export_dir)
    metadata = export_model(model, preprocess, wnids, class_names, export_dir, source=source, top_k=top_k)
    return {**metadata, "export_dir": export_dir}


def export_checkpoint(model_dir, checkpoint="best", export_dir=None, top_k=5, force=False):
    """Exports a run's checkpoint from its model directory alone: no dataset needed.

    The network comes from the run's operative_config.gin (the gin configuration
    in force is replaced by it); the classes and the preprocessing from what the
    run recorded when it started (`run_dir.read_data_settings`: model_dir/data.json).

    Args:
      model_dir: the run's model directory.
      checkpoint: 'best', 'latest' or a checkpoint path.
      export_dir: default <model_dir>/export.
      top_k: classes in the signature's top-k outputs.
      force: replace the run's export/ even when it holds another checkpoint's export.

    Returns:
      The export metadata (export.json) as a dict, plus `export_dir`.

    Raises:
      UserError: no run in model_dir, no checkpoint, no data settings, an export of another checkpoint in
        the default export directory (without `force`), a failed export.
    """
    from trainer import config  # pylint: disable=import-outside-toplevel

    gin.clear_config()  # The run's configuration alone.
    model_dir = _local(model_dir)
    operative = os.path.join(model_dir, "operative_config.gin")
    if not tf.io.gfile.exists(operative):
        raise UserError(f"No operative_config.gin in {model_dir}: expected the model directory of a run of "
                        "`python -m trainer.main` (it writes operative_config.gin when it starts).")
    path = checkpoints.find_checkpoint(model_dir, checkpoint)  # Fail early, before parsing.
    if not export_dir and not force:
        _refuse_replacing(os.path.join(model_dir, "export"), path)
    settings = run_dir.read_data_settings(model_dir)
    cli.register_configurables()
    config.parse_gin([operative])
    return _export_run(model_dir, checkpoint, export_dir, top_k, settings.preprocess, settings.class_ids,
                       settings.class_names)


def _refuse_replacing(export_dir, path):
    """Raises UserError if `export_dir` holds the export of a checkpoint other than `path` (the trainer's best)."""
    try:
        with tf.io.gfile.GFile(os.path.join(export_dir, METADATA_FILE)) as f:
            previous = (json.load(f).get("source") or {}).get("checkpoint")
    except (OSError, ValueError, AttributeError, tf.errors.OpError):
        return  # No readable export there: nothing to lose.
    def within_run(checkpoint):  # 'best/ckpt-40': the same after the run directory was moved.
        return os.path.normpath(checkpoint).split(os.sep)[-2:]

    if previous and within_run(previous) != within_run(path):
        raise UserError(f"{export_dir} holds the export of {previous}; exporting {path} there would replace it. "
                        "Export elsewhere with --export_dir=DIR, or replace it with --force.")


def read_classes(export_dir):
    """An export's class list: {'wnids': [...], 'names': [...]} from its classes.json.

    Raises:
      UserError: no readable classes.json.
    """
    path = os.path.join(export_dir, CLASSES_FILE)
    try:
        with tf.io.gfile.GFile(path) as f:
            classes = json.load(f)
        if len(classes["wnids"]) != len(classes["names"]):
            raise ValueError("wnids and names differ in length")
        return classes
    except (OSError, tf.errors.OpError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"Cannot read the class list {path} (expected JSON {{'wnids': [...], 'names': [...]}} "
                        f"written by trainer.export): {err}") from None


def main(argv):
    """The command line: exports --checkpoint of --model_dir."""
    from absl import flags  # pylint: disable=import-outside-toplevel

    cli.no_arguments(argv)
    logging.set_verbosity(logging.INFO)
    flag_values = flags.FLAGS
    metadata = export_checkpoint(flag_values.model_dir, flag_values.checkpoint, flag_values.export_dir,
                                 force=flag_values.force)
    source = metadata["source"]
    print(f"Exported the {source['kind']} checkpoint {source['checkpoint']} (step {source['step']}) to "
          f"{metadata['export_dir']}.")


def run():
    """`python -m trainer.export`: UserError -> one `error: ...` line on stderr, exit status 1."""
    from absl import flags  # pylint: disable=import-outside-toplevel

    flags.DEFINE_string("model_dir", None, "A run's model directory (operative_config.gin, checkpoints/, best/).",
                        required=True)
    flags.DEFINE_string("checkpoint", "best", "'best' (best val top-1), 'latest', or a checkpoint path.")
    flags.DEFINE_string("export_dir", None, "Where to export (default: <model_dir>/export).")
    flags.DEFINE_boolean("force", False, "Replace <model_dir>/export even if it holds another checkpoint's export.")
    cli.run(main, usage=lambda: __doc__)


if __name__ == "__main__":
    run()
