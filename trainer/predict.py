"""Classifies image files with an exported network: `python -m trainer.predict --model_dir=runs/x a.jpg dir/`.

Works from the export directory alone (`<model_dir>/export`, or `--model_dir`
itself when it holds `saved_model/`): it loads the SavedModel written by
`trainer.export` with TensorFlow and reads its classes.json; it never builds
the network, reads gin files or opens the dataset.

Images are files or directories (directories searched recursively for
.jpg, .jpeg, .png, .gif, .bmp and .webp, any case; symlinked directories,
and hidden files and folders, named '.*', are left out). A file named
explicitly is tried whatever its suffix; TIFF and HEIC are not decodable by
TensorFlow (`tf.io.decode_image`) and get an error line. Each image's top-k
classes are printed, one line per image:

    images/cat.jpg: tabby 0.8123, "tiger cat" 0.1002, ...

A file or class name containing a space, comma, colon or quote is written in
double quotes (JSON string escapes), so every line splits unambiguously.

A file that cannot be read or decoded gets one `error:` line on stderr naming
it; every other image is still classified, and the exit status is 1 (0 when
every image was classified).

`--format` chooses what is written: `text` (the lines above), `csv` (a header,
then one row per image: file, then wnid_i, name_i, probability_i for ranks
i = 1..k) or `json` ({"predictions": [{"file", "top_k": [{"wnid", "name",
"probability"}, ...]}, ...], "errors": [{"file", "reason"}, ...]}). It goes to
stdout, or to `--output=FILE` (then the text lines are still printed; the
format defaults to the file's suffix: .json, .txt, else CSV); `--output=-`
is stdout.

`--split=NAME` classifies every image of a split of a dataset, of any source
(Tiny ImageNet, class folders, TFRecord shards): the run's own dataset when
--model_dir is a run's model directory (its data.json), or --data_dir (its
layout recognised). In text it writes one `name class_id` line per image,
sorted (the name is the file name, or the example id when file names repeat):
for `--split=test` on Tiny ImageNet that is the test-set predictions file. It
goes to --output, by default `<model_dir>/predictions_<split>.txt` (.csv,
.json with --format).

Flags:
  --model_dir   a run's model directory (uses its export/) or an export directory.
  --top_k       classes shown per image (default 5).
  --format      text, csv or json (default: text on stdout; else the --output file's suffix).
  --output      where the predictions go: a file, or - for stdout.
  --split       predict this split of the dataset ('test', 'val', ...).
  --data_dir    the dataset directory, for --split (default: the run's).
  --batch_size  images per call of the SavedModel (default 32).
"""
if __name__ == "__main__":  # `--help` answers before TensorFlow loads.
    from trainer import cli as _cli

    _cli.fast_help(__doc__)


import csv
import dataclasses
import io
import json
import os
import re
import sys

import numpy as np
import tensorflow as tf

from trainer.data.preprocess import IMAGE_SUFFIXES
from trainer.errors import UserError

# The layout trainer.export writes.
SAVED_MODEL = "saved_model"
CLASSES_FILE = "classes.json"
SIGNATURE = "serving_default"
SPLIT_PREDICTIONS = "predictions_{split}.txt"


@dataclasses.dataclass
class Prediction:
    """The top-k classes of one image.

    Attributes:
      file: the image path as found.
      wnids: class ids, most probable first.
      names: their names.
      probabilities: their probabilities.
    """

    file: str
    wnids: list
    names: list
    probabilities: list


def find_export(model_dir):
    """The export directory of `model_dir`: `model_dir` itself if it holds saved_model/, else model_dir/export.

    Raises:
      UserError: neither holds an export.
    """
    model_dir = model_dir if "://" in model_dir else os.path.expanduser(model_dir)
    for candidate in (model_dir, os.path.join(model_dir, "export")):
        if tf.io.gfile.isdir(os.path.join(candidate, SAVED_MODEL)):
            return candidate
    raise UserError(f"No export in {model_dir}: expected {os.path.join(model_dir, 'export', SAVED_MODEL)} (or "
                    f"--model_dir pointing at an export directory holding {SAVED_MODEL}/). Export the run first: "
                    f"python -m trainer.export --model_dir={model_dir}")


class Predictor:
    """An exported network, loaded with TensorFlow alone.

    Attributes:
      export_dir: the export directory.
      wnids: class ids in label order.
      names: class names in label order.
      flags_invalid: the signature answers a call with an undecodable image (its `valid` output flags that
        row); an older export's fails the whole call.
    """

    def __init__(self, export_dir):
        """Loads export_dir/saved_model and export_dir/classes.json.

        Raises:
          UserError: a missing or unreadable export.
        """
        self.export_dir = export_dir
        path = os.path.join(export_dir, SAVED_MODEL)
        try:
            self._serve = tf.saved_model.load(path).signatures[SIGNATURE]
        except (OSError, KeyError, ValueError, tf.errors.OpError) as err:
            raise UserError(f"Cannot load the SavedModel {path} (expected one written by trainer.export, with a "
                            f"{SIGNATURE!r} signature): {_reason(err)}") from None
        self.flags_invalid = "valid" in self._serve.structured_outputs
        classes_path = os.path.join(export_dir, CLASSES_FILE)
        try:
            with tf.io.gfile.GFile(classes_path) as f:
                classes = json.load(f)
            self.wnids, self.names = list(classes["wnids"]), list(classes["names"])
        except (OSError, ValueError, KeyError, TypeError, tf.errors.OpError) as err:
            raise UserError(f"Cannot read {classes_path} (expected JSON {{'wnids': [...], 'names': [...]}} written "
                            f"by trainer.export): {_reason(err)}") from None
        self.preprocess = None  # What the signature does to an image first (export.json), for `check`.
        try:
            from trainer.data.preprocess import Preprocessing  # pylint: disable=import-outside-toplevel

            with tf.io.gfile.GFile(os.path.join(export_dir, "export.json")) as f:
                self.preprocess = Preprocessing.from_json(json.load(f)["preprocessing"])
        except (OSError, ValueError, KeyError, TypeError, UserError, tf.errors.OpError):
            pass  # An older export: `check` decodes as the signature's first step did.

    def check(self, encoded):
        """Raises tf.errors.OpError if the signature could not prepare this image (undecodable, too large)."""
        if self.preprocess is None:
            tf.io.decode_image(encoded, channels=3, expand_animations=False)
        else:
            self.preprocess.decode(tf.constant(encoded))

    def reason(self, encoded):
        """Why the signature could not prepare this image: the decode's error, in one line."""
        try:
            self.check(encoded)
        except tf.errors.OpError as err:
            return _reason(err)
        return "the export's signature could not prepare it"

    def answers(self, encoded):
        """(probabilities float32 [N, C], valid bool [N]) of encoded images (JPEG, PNG, ...).

        Raises:
          tf.errors.OpError: an image could not be decoded and the export does not flag invalid rows.
        """
        if not encoded:
            return np.zeros([0, len(self.wnids)], np.float32), np.zeros([0], bool)
        out = self._serve(images=tf.constant(encoded, tf.string))
        valid = out["valid"].numpy() if self.flags_invalid else np.ones([len(encoded)], bool)
        return out["probabilities"].numpy(), valid

    def probabilities(self, encoded):
        """Class probabilities float32 [N, C] of encoded images, each decodable."""
        return self.answers(encoded)[0]

    def top_k(self, probabilities, k):
        """(wnids, names, probabilities) of the k most probable classes of one image, most probable first."""
        order = np.argsort(-probabilities, kind="stable")[:k]
        return ([self.wnids[i] for i in order], [self.names[i] for i in order],
                [float(probabilities[i]) for i in order])


def list_images(paths):
    """Expands files and directories (recursively, not into symlinked directories: IMAGE_SUFFIXES, any case) into
    image paths.

    Args:
      paths: file and directory paths.

    Returns:
      (images, problems): image paths (each directory's sorted), and (path, reason) for paths that do not exist
      or directories without images.
    """
    images, problems = [], []
    for path in paths:
        if tf.io.gfile.isdir(path):
            # Locally, symlinked directories are not followed (out of `path`, or round in a cycle like `up -> ..`).
            walk = tf.io.gfile.walk(path) if "://" in path else os.walk(path, followlinks=False)
            found = []
            for root, dirs, names in walk:  # Hidden files and folders left out (.DS_Store, macOS's ._x.jpg).
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                found += [os.path.join(root, n) for n in names if not n.startswith(".")
                          and n.lower().endswith(IMAGE_SUFFIXES)]
            found.sort()
            if not found:
                problems.append((path, f"no {', '.join(IMAGE_SUFFIXES)} images in this directory"))
            images += found
        elif tf.io.gfile.exists(path):
            images.append(path)  # Named explicitly: tried whatever its suffix.
        else:
            problems.append((path, "no such file or directory"))
    return images, problems


def predict_files(predictor, files, top_k=5, batch_size=32):
    """Classifies image files; one that cannot be read or decoded fails alone (see `predict_encoded`).

    Returns:
      (predictions, failures): a `Prediction` per classified image, in the order of `files`, and
      (file, reason) for each file that could not be read or decoded.
    """
    failures = []

    def read():
        for file in files:
            try:
                with tf.io.gfile.GFile(file, "rb") as f:
                    yield file, f.read()
            except (OSError, tf.errors.OpError) as err:
                failures.append((file, _reason(err)))

    predictions, bad = predict_encoded(predictor, read(), top_k, batch_size)
    return predictions, failures + bad


def predict_encoded(predictor, named, top_k=5, batch_size=32):
    """Classifies encoded images; one bad image fails alone (the signature flags it; with an older export that
    fails the whole call, each image is checked on its own first).

    Args:
      predictor: a `Predictor`.
      named: (name, encoded bytes) pairs.
      top_k: classes kept per image.
      batch_size: images per call of the SavedModel.

    Returns:
      (predictions, failures): a `Prediction` per classified image, in order, and (name, reason) for each
      image that could not be decoded.
    """
    predictions, failures = [], []
    batch = []

    def answer(images):
        try:
            return predictor.answers(images)
        except tf.errors.OpError:  # Not after the check: one image at a time.
            if len(images) == 1:
                return [None], [False]
            rows = [answer([image]) for image in images]
            return [row[0][0] for row in rows], [row[1][0] for row in rows]

    def flush():
        rows, valid = answer([data for _, data in batch])
        for (name, data), row, ok in zip(batch, rows, valid):
            if ok:
                predictions.append(Prediction(name, *predictor.top_k(row, top_k)))
            else:
                failures.append((name, predictor.reason(data)))  # Decoded once more, for its message.
        batch.clear()

    for name, data in named:
        if not predictor.flags_invalid:  # An older export: a bad image would fail the whole call.
            try:
                predictor.check(data)
            except tf.errors.OpError as err:
                failures.append((name, _reason(err)))
                continue
        batch.append((name, data))
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return predictions, failures


def format_prediction(prediction):
    """One line: `file: name probability, name probability, ...` (names with spaces or commas quoted)."""
    return f"{quote(prediction.file)}: " + ", ".join(
        f"{quote(name)} {p:.4f}" for name, p in zip(prediction.names, prediction.probabilities))


def quote(text):
    """`text` as it is, or as a JSON string when a space, comma, colon or quote would make a line ambiguous."""
    return json.dumps(text, ensure_ascii=False) if not text or re.search(r"[\s,:\"']", text) else text


FORMATS = ("text", "csv", "json")


def format_predictions(predictions, failures, fmt):
    """The predictions as `fmt` ('text', 'csv' or 'json') text."""
    if fmt == "text":
        return "".join(format_prediction(p) + "\n" for p in predictions)
    if fmt == "json":
        return json.dumps({"predictions": [{"file": p.file, "top_k": [
            {"wnid": w, "name": n, "probability": round(float(q), 6)} for w, n, q in zip(p.wnids, p.names,
                                                                                        p.probabilities)]}
            for p in predictions], "errors": [{"file": f, "reason": r} for f, r in failures]}, indent=1) + "\n"
    k = max((len(p.wnids) for p in predictions), default=0)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["file"] + [f"{field}_{i}" for i in range(1, k + 1) for field in ("wnid", "name", "probability")])
    for p in predictions:
        writer.writerow([p.file] + [v for triple in zip(p.wnids, p.names, p.probabilities)
                                    for v in (triple[0], triple[1], f"{triple[2]:.6f}")])
    return buffer.getvalue()


def output_format(fmt, output):
    """The format to write: `fmt` if given, else from the --output file's suffix (text on stdout)."""
    if fmt:
        return fmt
    if not output or output == "-":
        return "text"
    return {".json": "json", ".txt": "text"}.get(os.path.splitext(output)[1].lower(), "csv")


def open_split_source(model_dir, data_dir=None):
    """The dataset to predict a split of: the run's (model_dir/data.json), at `data_dir` if given.

    Raises:
      UserError: no dataset named, or none found there.
    """
    from trainer import cli, run_dir  # pylint: disable=import-outside-toplevel
    from trainer.data import sources  # pylint: disable=import-outside-toplevel

    cli.register_configurables()
    description = None
    if tf.io.gfile.exists(os.path.join(model_dir, run_dir.DATA_FILE)):
        description = dict(run_dir.read_data_settings(model_dir).source)
    if data_dir:
        kind = sources.looks_like(data_dir)
        # Another layout at --data_dir replaces the run's source, unless that is one looks_like cannot tell.
        if description is None or (kind and kind != description["kind"] and description["kind"] in sources.LAYOUTS):
            description = {"kind": kind}
        description["location"] = data_dir
    if description is None or not description.get("kind"):
        raise UserError(f"No dataset to predict: {model_dir} is not a run's model directory with a {run_dir.DATA_FILE}"
                        f", and --data_dir {'holds no known layout' if data_dir else 'is not set'}. Give "
                        "--data_dir=DIR: Tiny ImageNet's layout, class folders or TFRecord shards.")
    source = sources.open_source(description)
    if tf.io.gfile.exists(os.path.join(model_dir, run_dir.DATA_FILE)):
        source.pin(model_dir)  # The run's own validation split, if its source draws one.
    return source


def predict_split(predictor, source, split, output, batch_size=32):
    """Classifies every image of a split of `source`; writes sorted `name class_id` lines to `output` (if given).

    The name is the example's file name, or its id (the path within the dataset) when file names repeat.

    Returns:
      (predictions, failures) as `predict_encoded` returns them, the predictions sorted by name.

    Raises:
      UserError: the source has no such split.
    """
    source.check_split(split)
    ids = source.listing(split)[0]
    short = {i: os.path.basename(i) for i in ids}
    if len(set(short.values())) < len(ids):
        short = {i: i for i in ids}
    named = ((short[id_.decode("utf-8", "surrogateescape")], image)
             for image, _, id_ in source.examples(split).as_numpy_iterator())
    predictions, failures = predict_encoded(predictor, named, top_k=1, batch_size=batch_size)
    predictions.sort(key=lambda p: p.file)
    if output:
        _write_text(output, split_text(predictions))
    return predictions, failures


def split_text(predictions):
    """`name class_id` lines: the Tiny ImageNet test-set predictions format."""
    return "".join(f"{p.file} {p.wnids[0]}\n" for p in predictions)


def _write(path, text):
    """`text` to the file `path`, or to stdout when `path` is None."""
    if path is None:
        sys.stdout.write(text)
    else:
        _write_text(path, text)


def _write_text(path, text):
    try:
        with tf.io.gfile.GFile(path, "w") as f:
            f.write(text)
    except (OSError, tf.errors.OpError) as err:
        raise UserError(f"Cannot write {path}: {_reason(err)}. Choose another --output.") from None


def _reason(err):
    """A TensorFlow or OS error as one short line (no op names, no function-node prefixes)."""
    if isinstance(err, tf.errors.OpError):
        message = err.message
    elif isinstance(err, OSError) and err.strerror:
        message = err.strerror
    else:
        message = str(err)
    message = re.sub(r"\{\{[^}]*\}\}|\[Op:[^\]]*\]( name: \S*)?", "", message)
    return " ".join(message.split()) or type(err).__name__


def main(argv):
    """The command line (see the module docstring). Returns the exit status."""
    from absl import flags

    flag_values = flags.FLAGS
    paths = argv[1:]
    if flag_values.split and paths:
        raise UserError(f"Give image files and directories, or --split=test, not both (got --split and {paths[0]}).")
    if not flag_values.split and not paths:
        raise UserError("Nothing to classify: expected image files or directories (or --split=NAME).")
    model_dir = flag_values.model_dir if "://" in flag_values.model_dir else os.path.expanduser(flag_values.model_dir)
    fmt = output_format(flag_values.format, flag_values.output)
    output = None if flag_values.output == "-" else flag_values.output
    predictor = Predictor(find_export(model_dir))
    if flag_values.split:
        source = open_split_source(model_dir, flag_values.data_dir)
        if not flag_values.output:
            output = os.path.join(model_dir, SPLIT_PREDICTIONS.format(split=flag_values.split))
            output = output if fmt == "text" else f"{os.path.splitext(output)[0]}.{fmt}"
        predictions, failures = predict_split(predictor, source, flag_values.split, None, flag_values.batch_size)
        _write(output, split_text(predictions) if fmt == "text" else format_predictions(predictions, failures, fmt))
        if output:
            print(f"Wrote {len(predictions)} predictions ({flag_values.split} split of {source.location}) to {output}.")
    else:
        files, failures = list_images(paths)
        predictions, bad = predict_files(predictor, files, flag_values.top_k, flag_values.batch_size)
        failures += bad
        if output:  # The lines on the console, the chosen format in the file.
            sys.stdout.write(format_predictions(predictions, failures, "text"))
        _write(output, format_predictions(predictions, failures, fmt))
    for file, reason in failures:
        print(f"error: cannot classify {file}: {reason}", file=sys.stderr)
    return 1 if failures else 0


def run():
    """`python -m trainer.predict`: exit status 1 if any image failed, or on a UserError (one `error:` line)."""
    from absl import flags  # pylint: disable=import-outside-toplevel

    from trainer import cli  # pylint: disable=import-outside-toplevel

    flags.DEFINE_string("model_dir", None, "A run's model directory (its export/ is used) or an export directory.",
                        required=True)
    flags.DEFINE_integer("top_k", 5, "Classes shown per image.", lower_bound=1)
    flags.DEFINE_string("output", None, "Where the predictions go: a file, or - for stdout (for --split, default "
                        "<model_dir>/predictions_<split>.txt).")
    flags.DEFINE_enum("format", None, list(FORMATS), "text, csv or json (default: text on stdout; else the "
                      "--output file's suffix: .json, .txt, else csv).")
    flags.DEFINE_string("split", None, "Classify this split of the dataset ('test', 'val', ...) instead of image "
                        "arguments.")
    flags.DEFINE_string("data_dir", None, "The dataset directory, for --split (default: the run's).")
    flags.DEFINE_integer("batch_size", 32, "Images per call of the SavedModel.", lower_bound=1)
    cli.run(main, usage=lambda: __doc__)


if __name__ == "__main__":
    run()
