"""Exports a trained network for serving: `python -m trainer.export --model_dir=runs/x`.

An export directory (model_dir/export by default) holds:

    saved_model/   a SavedModel whose `serving_default` signature takes encoded
                   images (1-D tf.string: JPEG, PNG, GIF or BMP bytes of any size,
                   greyscale, RGBA and CMYK too) and returns `probabilities`
                   [N, C], `top_k_indices` [N, k] (int32), `top_k_probabilities`
                   [N, k], `top_k_wnids` and `top_k_names` [N, k] (tf.string).
                   Loading it needs TensorFlow only (`tf.saved_model.load`).
    model.keras    the Keras network (float32 [N, S, S, 3] images in [0, 1] ->
                   logits [N, C]); stock Keras layers only, so
                   `keras.saving.load_model` needs no custom objects.
    classes.json   {"wnids": [...], "names": [...]}: label i is wnids[i].
    export.json    everything a client needs to feed `model.keras` itself:
                   classes, image_size, input_scale (1/255), resize_method,
                   antialias, top_k, the signature, and `source` (the
                   checkpoint and step exported).

The signature prepares an image as training does (`trainer.data.pipeline.decode`):
decode to uint8 RGB, resize to image_size x image_size with antialiasing unless
it already has that size, round back to uint8, then scale by 1/255.

An export is written next to its destination (`<export_dir>.partial-<pid>`)
and swapped in whole: a failed export (a full disk) leaves the previous one
as it was. Flags:

  --model_dir   a run's model directory (holds operative_config.gin and checkpoints/, best/).
  --checkpoint  'best' (default: best val top-1), 'latest', or a checkpoint path.
  --export_dir  where to export (default: <model_dir>/export).
"""

import datetime
import inspect
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Keep TF's C++ start-up chatter off the console.

import gin  # pylint: disable=wrong-import-position
import keras  # pylint: disable=wrong-import-position
import tensorflow as tf  # pylint: disable=wrong-import-position
from absl import logging  # pylint: disable=wrong-import-position

from trainer.errors import UserError  # pylint: disable=wrong-import-position

SAVED_MODEL = "saved_model"
KERAS_MODEL = "model.keras"
CLASSES_FILE = "classes.json"
METADATA_FILE = "export.json"
SIGNATURE = "serving_default"
INPUT_SCALE = 1.0 / 255.0
DEFAULT_RESIZE_METHOD = "bilinear"
FORMAT_VERSION = 1
_PARTIAL = ".partial-"
_PREVIOUS = ".previous-"


class _Serving(tf.Module):
    """The SavedModel's root: the network's variables and the `serving_default` function."""

    def __init__(self, model, image_size, wnids, class_names, top_k, resize_method):
        super().__init__(name="serving")
        self.model_variables = list(model.variables)  # Tracked: saved with the SavedModel.
        self._forward = lambda images: model(images, training=False)  # A closure: the Keras object is not saved.
        self._size = image_size
        self._wnids = tf.constant(wnids, tf.string)
        self._names = tf.constant(class_names, tf.string)
        self._top_k = top_k
        self._resize_method = resize_method
        self.serve = tf.function(self._serve, input_signature=[tf.TensorSpec([None], tf.string, name="images")])

    def _prepare(self, encoded):
        """Encoded bytes -> uint8 [S, S, 3], exactly as `trainer.data.pipeline.decode` prepares training images."""
        image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
        image = tf.ensure_shape(image, [None, None, 3])

        def resize():
            resized = tf.image.resize(image, [self._size, self._size], method=self._resize_method, antialias=True)
            return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

        native = tf.reduce_all(tf.equal(tf.shape(image)[:2], self._size))
        return tf.ensure_shape(tf.cond(native, lambda: image, resize), [self._size, self._size, 3])

    def _serve(self, images):
        pixels = tf.map_fn(self._prepare, images, fn_output_signature=tf.TensorSpec(
            [self._size, self._size, 3], tf.uint8))
        logits = tf.cast(self._forward(tf.cast(pixels, tf.float32) * INPUT_SCALE), tf.float32)
        probabilities = tf.nn.softmax(logits, axis=-1)
        top_p, top_i = tf.math.top_k(probabilities, k=self._top_k)
        return {"probabilities": probabilities, "top_k_indices": top_i, "top_k_probabilities": top_p,
                "top_k_wnids": tf.gather(self._wnids, top_i), "top_k_names": tf.gather(self._names, top_i)}


def export_model(model, image_size, wnids, class_names, export_dir, source=None, top_k=5,
                 resize_method=DEFAULT_RESIZE_METHOD):
    """Writes a SavedModel, the `.keras` model and the class list to `export_dir`, replacing it atomically.

    Everything is written to `<export_dir>.partial-<pid>` first, then swapped in;
    leftovers of an export killed earlier are removed first.

    Args:
      model: a Keras model mapping float32 [N, image_size, image_size, 3] images in [0, 1] to logits [N, C].
      image_size: the side the network was trained at.
      wnids: the C class ids, in label order (wnids.txt order).
      class_names: a human-readable name per class, in the same order.
      export_dir: the export directory (created or replaced).
      source: a JSON-serialisable description of what was exported (e.g. the
        checkpoint path and step), recorded in export.json.
      top_k: classes returned by the signature's top-k outputs (at most C).
      resize_method: the `tf.image.resize` method training used (antialiased).

    Returns:
      The metadata written to export.json, as a dict.

    Raises:
      UserError: classes that do not match the network's outputs, or an export
        that could not be written (the previous export is then unchanged).
    """
    num_classes = int(model.output_shape[-1])
    if not len(wnids) == len(class_names) == num_classes:
        raise UserError(f"Cannot export {export_dir}: the network outputs {num_classes} classes but "
                        f"{len(wnids)} wnids and {len(class_names)} class names were given; expected "
                        f"{num_classes} of each.")
    if top_k < 1:
        raise UserError(f"Cannot export {export_dir}: top_k must be >= 1, got {top_k}.")
    export_dir = _local(export_dir).rstrip("/")
    metadata = {
        "format_version": FORMAT_VERSION,
        "wnids": list(wnids),
        "names": list(class_names),
        "num_classes": num_classes,
        "image_size": int(image_size),
        "input_scale": INPUT_SCALE,
        "input": "float32 RGB [N, image_size, image_size, 3] = uint8 pixels * input_scale",
        "resize_method": resize_method,
        "antialias": True,
        "resize_rule": "resized only when not already image_size x image_size, then rounded to uint8",
        "top_k": min(int(top_k), num_classes),
        "signature": {"name": SIGNATURE, "input": "images: 1-D tf.string of encoded images (JPEG, PNG, GIF, BMP)",
                      "outputs": ["probabilities", "top_k_indices", "top_k_probabilities", "top_k_wnids",
                                  "top_k_names"]},
        "saved_model": SAVED_MODEL,
        "keras_model": KERAS_MODEL,
        "source": source,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
    }
    _clean_leftovers(export_dir)
    partial = f"{export_dir}{_PARTIAL}{os.getpid()}"
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
    serving = _Serving(model, metadata["image_size"], metadata["wnids"], metadata["names"], metadata["top_k"],
                       metadata["resize_method"])
    tf.saved_model.save(serving, os.path.join(directory, SAVED_MODEL),
                        signatures={SIGNATURE: serving.serve.get_concrete_function()})
    model.save(os.path.join(directory, KERAS_MODEL))
    _write_json(os.path.join(directory, CLASSES_FILE), {"wnids": metadata["wnids"], "names": metadata["names"]})
    _write_json(os.path.join(directory, METADATA_FILE), metadata)


def _write_json(path, value):
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(json.dumps(value, indent=2) + "\n")


def _swap_in(partial, export_dir):
    """Replaces `export_dir` by `partial`: old away, new in, old deleted (restored if the new cannot go in)."""
    previous = f"{export_dir}{_PREVIOUS}{os.getpid()}"
    had_previous = tf.io.gfile.exists(export_dir)
    if had_previous:
        _remove(previous)
        tf.io.gfile.rename(export_dir, previous)
    try:
        tf.io.gfile.rename(partial, export_dir)
    except (OSError, tf.errors.OpError):
        if had_previous:
            tf.io.gfile.rename(previous, export_dir)
        raise
    if had_previous:
        _remove(previous, ignore_errors=True)


def _clean_leftovers(export_dir):
    """Removes `<export_dir>.partial-*` of dead exports; brings back a `.previous-*` a killed swap left alone."""
    for path in sorted(tf.io.gfile.glob(f"{export_dir}{_PARTIAL}*") + tf.io.gfile.glob(f"{export_dir}{_PREVIOUS}*")):
        path = path.rstrip("/")
        if _owner_alive(path):
            continue
        if _PREVIOUS in path[len(export_dir):] and not tf.io.gfile.exists(export_dir):
            logging.warning("Restoring %s: an export was killed while swapping it for a new one.", path)
            tf.io.gfile.rename(path, export_dir)
            continue
        logging.warning("Removing %s, left by an export that did not finish.", path)
        _remove(path, ignore_errors=True)


def _owner_alive(path):
    """True if `path` ends with the pid of another live process on this host (a concurrent export)."""
    pid = path.rsplit("-", 1)[-1]
    if not pid.isdigit() or int(pid) == os.getpid() or "://" in path:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _remove(path, ignore_errors=False):
    try:
        if tf.io.gfile.exists(path):
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


def weights_by_path(model):
    """The model's variables keyed by Keras path ('block/kernel'), as the trainer's checkpoints store them.

    Args:
      model: a Keras model.

    Returns:
      dict path -> variable.
    """
    return {w.path: w for w in model.weights}


def find_checkpoint(model_dir, checkpoint="best"):
    """The checkpoint path `checkpoint` names in a run's model directory.

    Args:
      model_dir: the run's model directory.
      checkpoint: 'best' (model_dir/best: best val top-1), 'latest' (model_dir/checkpoints),
        or a checkpoint path (a prefix such as .../ckpt-300, or a directory holding checkpoints).

    Returns:
      The checkpoint prefix.

    Raises:
      UserError: no such checkpoint.
    """
    if checkpoint in ("best", "latest"):
        directory = os.path.join(model_dir, "best" if checkpoint == "best" else "checkpoints")
        path = tf.train.latest_checkpoint(directory)
        if not path:
            other = "latest" if checkpoint == "best" else "best"
            why = ("best/ is written at the end of each epoch that improves val top-1" if checkpoint == "best"
                   else "none was saved yet")
            raise UserError(f"No {checkpoint!r} checkpoint in {directory} (expected a run's checkpoint there; "
                            f"{why}). Use --checkpoint={other} or --checkpoint=PATH.")
        return path
    path = _local(checkpoint)
    if tf.io.gfile.isdir(path):
        path = tf.train.latest_checkpoint(path) or path
    if not tf.io.gfile.exists(path + ".index"):
        raise UserError(f"--checkpoint={checkpoint!r} is neither 'best', 'latest' nor a checkpoint (expected a "
                        f"prefix such as {os.path.join(model_dir, 'checkpoints', 'ckpt-100')}, with its .index file).")
    return path


def restore_weights(model, checkpoint_path):
    """Loads a trainer checkpoint's weights (only) into `model`.

    Args:
      model: the network, built as the run built it.
      checkpoint_path: a checkpoint prefix written by the trainer.

    Returns:
      The checkpoint's training step (None if it holds no step).

    Raises:
      UserError: the checkpoint does not hold every weight of the network.
    """
    status = tf.train.Checkpoint(weights=weights_by_path(model)).restore(checkpoint_path)
    status.expect_partial()
    try:
        status.assert_existing_objects_matched()
    except (AssertionError, ValueError) as err:
        raise UserError(f"{checkpoint_path} does not hold the weights of this network (expected every variable "
                        f"of the network built from the run's operative_config.gin): "
                        f"{' '.join(str(err).split())[:300]}") from None
    reader = tf.train.load_checkpoint(checkpoint_path)
    key = "step/.ATTRIBUTES/VARIABLE_VALUE"
    return int(reader.get_tensor(key)) if reader.has_tensor(key) else None


def export_trained(model_dir, image_size, wnids, class_names, checkpoint="best", export_dir=None, top_k=5,
                   resize_method=DEFAULT_RESIZE_METHOD):
    """Builds the gin-declared network, loads a run's checkpoint into it and exports it.

    Uses the gin configuration in force (the trainer calls it at the end of a
    phase; `export_checkpoint` parses the run's operative config first). The
    network is built in float32, outside any distribution strategy.

    Args:
      model_dir: the run's model directory.
      image_size: the run's input side.
      wnids: class ids in label order.
      class_names: class names in label order.
      checkpoint: 'best', 'latest' or a checkpoint path (see `find_checkpoint`).
      export_dir: default <model_dir>/export.
      top_k: classes in the signature's top-k outputs.
      resize_method: the resize method training used.

    Returns:
      The export metadata (export.json) as a dict; `source` names the checkpoint and its step.

    Raises:
      UserError: no such checkpoint, a checkpoint of another network, a failed export.
    """
    from trainer.models import builder

    model_dir = _local(model_dir)
    export_dir = export_dir or os.path.join(model_dir, "export")
    path = find_checkpoint(model_dir, checkpoint)
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")  # Mixed-precision runs keep float32 weights.
    try:
        model = builder.build_network(image_size)
    finally:
        keras.mixed_precision.set_global_policy(policy)
    step = restore_weights(model, path)
    source = {"model_dir": model_dir, "checkpoint": path, "kind": checkpoint if checkpoint in ("best", "latest")
              else "path", "step": step, "best_top1": _best_top1(path)}
    logging.info("Exporting %s checkpoint %s (step %s) to %s.", source["kind"], path, step, export_dir)
    return export_model(model, image_size, wnids, class_names, export_dir, source=source, top_k=top_k,
                        resize_method=resize_method)


def _best_top1(path):
    reader = tf.train.load_checkpoint(path)
    key = "best_top1/.ATTRIBUTES/VARIABLE_VALUE"
    value = float(reader.get_tensor(key)) if reader.has_tensor(key) else None
    return value if value is not None and value >= 0 else None


def export_checkpoint(model_dir, checkpoint="best", export_dir=None, top_k=5):
    """Exports a run's checkpoint from its model directory alone (its operative_config.gin and checkpoints).

    The gin configuration in force is replaced by the run's operative config.

    The class list comes from the dataset bound in the run's gin config
    (`open_dataset.data_dir`), or, when that dataset is gone, from a previous
    export's classes.json.

    Args:
      model_dir: the run's model directory.
      checkpoint: 'best', 'latest' or a checkpoint path.
      export_dir: default <model_dir>/export.
      top_k: classes in the signature's top-k outputs.

    Returns:
      The export metadata (export.json) as a dict.

    Raises:
      UserError: no run in model_dir, no checkpoint, no class list, a failed export.
    """
    from trainer import config

    gin.clear_config()  # The run's configuration alone.
    model_dir = _local(model_dir)
    export_dir = _local(export_dir) if export_dir else os.path.join(model_dir, "export")
    operative = os.path.join(model_dir, "operative_config.gin")
    if not tf.io.gfile.exists(operative):
        raise UserError(f"No operative_config.gin in {model_dir}: expected the model directory of a run of "
                        "`python -m trainer.main` (it writes operative_config.gin when it starts).")
    find_checkpoint(model_dir, checkpoint)  # Fail early, before parsing.
    config.parse_gin([operative])
    image_size = _gin_value("%IMAGE_SIZE", "train.image_size")
    if not isinstance(image_size, int):
        raise UserError(f"{operative} binds no IMAGE_SIZE (nor train.image_size); expected an integer, "
                        f"got {image_size!r}.")
    wnids, names = _run_classes(_gin_value("open_dataset.data_dir", "%DATA_DIR"), export_dir)
    return export_trained(model_dir, image_size, wnids, names, checkpoint, export_dir, top_k,
                          resize_method=training_resize_method())


def training_resize_method():
    """The resize method of the training pipeline: a gin binding if there is one, else decode's default."""
    from trainer.data import pipeline

    bound = _gin_value("decode.resize_method", "make_dataset.resize_method")
    if isinstance(bound, str):
        return bound
    for fn in (pipeline.decode, pipeline.make_dataset):
        parameter = inspect.signature(fn).parameters.get("resize_method")
        if parameter is not None and isinstance(parameter.default, str):
            return parameter.default
    return DEFAULT_RESIZE_METHOD


def _gin_value(*names):
    """The first of `names` bound in gin (macros resolved), else None."""
    for name in names:
        try:
            value = gin.query_parameter(name)
            while isinstance(value, gin.config.ConfigurableReference) and str(value).startswith("%"):
                value = gin.query_parameter(str(value))
            return value
        except ValueError:
            continue
    return None


def _run_classes(data_dir, export_dir):
    """(wnids, names) from the run's dataset, else from a previous export's classes.json."""
    from trainer.data.tiny_imagenet import TinyImageNet

    problem = "the run's gin config binds no open_dataset.data_dir"
    if isinstance(data_dir, str):
        try:
            dataset = TinyImageNet(data_dir)
            return dataset.wnids, dataset.class_names
        except UserError as err:
            problem = str(err).split(". ")[0]
    previous = os.path.join(export_dir, CLASSES_FILE)
    if tf.io.gfile.exists(previous):
        classes = read_classes(export_dir)
        logging.warning("%s; using the class list of the previous export, %s.", problem, previous)
        return classes["wnids"], classes["names"]
    raise UserError(f"Cannot tell the class names: {problem}, and there is no previous export's {previous}. "
                    "Restore the dataset at the run's DATA_DIR (its wnids.txt and words.txt are enough to "
                    "find the classes only with the full layout), or export with --export_dir pointing at an "
                    "export of this run that holds classes.json.")


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
    from absl import flags

    if len(argv) > 1:  # (Not app.UsageError: run_main would print it as a traceback.)
        raise UserError(f"Unexpected arguments: {' '.join(argv[1:])}; expected flags only (see --help).")
    logging.set_verbosity(logging.INFO)
    _quiet_tensorflow_info()
    flag_values = flags.FLAGS
    metadata = export_checkpoint(flag_values.model_dir, flag_values.checkpoint, flag_values.export_dir)
    source = metadata["source"]
    export_dir = flag_values.export_dir or os.path.join(flag_values.model_dir, "export")
    print(f"Exported the {source['kind']} checkpoint {source['checkpoint']} (step {source['step']}) to {export_dir}.")


def _quiet_tensorflow_info():
    """Drops TensorFlow's own INFO lines (SavedModel writing), keeps its warnings (as trainer.main does)."""
    import logging as std_logging

    def keep(record):
        return record.levelno >= std_logging.WARNING or f"{os.sep}tensorflow{os.sep}" not in record.pathname

    std_logging.getLogger("tensorflow").setLevel(std_logging.WARNING)
    std_logging.getLogger("absl").addFilter(keep)


def run():
    """`python -m trainer.export`: UserError -> one `error: ...` line on stderr, exit status 1."""
    from absl import app, flags

    from trainer import config

    flags.DEFINE_string("model_dir", None, "A run's model directory (operative_config.gin, checkpoints/, best/).",
                        required=True)
    flags.DEFINE_string("checkpoint", "best", "'best' (best val top-1), 'latest', or a checkpoint path.")
    flags.DEFINE_string("export_dir", None, "Where to export (default: <model_dir>/export).")
    if {"-h", "--help", "--helpshort"} & set(sys.argv[1:]):  # absl's own --help exits with status 1.
        flags.FLAGS.mark_as_parsed()
        app.usage(shorthelp=True, writeto_stdout=True)
        sys.exit(0)
    app.run(lambda argv: config.run_main(main, argv))


if __name__ == "__main__":
    run()
