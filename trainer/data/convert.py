"""Converts a dataset (Tiny ImageNet layout or class folders) to TFRecord shards, for gin/data/tfrecord.gin.

    python -m trainer.data.convert --data_dir=data/tiny-imagenet-200 --out=gs://my-bucket/tiny-tfrecord

Each image's encoded bytes are kept as they are (no re-encoding), with its
label, class id and example id (see trainer/data/sources/tfrecord.py).
Training examples are shuffled with a fixed seed before sharding, so every
shard mixes all classes; val and test keep their order. Shards are near
150 MB each by default. DATA_DIR and --out may be local, gs:// or any
tf.io.gfile file system.

Nothing half-written reads as valid: each shard is written under a
temporary name and renamed when complete, index.json last. An interrupted
conversion resumes when rerun with the same arguments (complete shards are
kept); a finished one is left as it is.

Flags:
  --data_dir  the dataset to convert; required.
  --out       the directory to write (local or gs://); required.
  --shards    training shards (default: near 150 MB each); smaller splits get proportionally fewer.
  --source    tiny_imagenet or image_folder (default: detected from the layout).
"""
if __name__ == "__main__":  # `--help` answers before TensorFlow loads.
    from trainer import cli as _cli

    _cli.fast_help(__doc__)


import itertools
import json

from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf

from trainer import cli
from trainer.data import sources
from trainer.data.preprocess import ImageSurvey
from trainer.data.sources import INCOMPLETE_MARKER, tfrecord
from trainer.data.sources.image_folder import ImageFolder
from trainer.data.sources.tiny_imagenet import TinyImageNet
from trainer.errors import UserError

SHARD_BYTES = 150 << 20  # Target size of a shard.
PLAN_FILE = "convert_plan.json"  # Written first: what a rerun must match to resume.
SEED = 0  # Shuffles the training examples before sharding.
PLAN_VERSION = 1
_SOURCES = {"tiny_imagenet": TinyImageNet, "image_folder": ImageFolder}
_SAMPLE = 64  # Files whose size is read to estimate a split's size.
_RECORD_OVERHEAD = 200  # Bytes a record adds to its image: the other features, framing and CRCs (about).
_TMP = ".tmp"
_BUCKET = ".bucket-"  # Pass 1 of the training split: the examples of each shard, not yet shuffled.


def open_source(data_dir, kind=None):
    """Opens the dataset to convert.

    Args:
      data_dir: its directory.
      kind: 'tiny_imagenet', 'image_folder' or None (detected with `sources.looks_like`).

    Returns:
      A `sources.Source`.

    Raises:
      UserError: an unknown kind, a directory that holds no layout the converter reads, or the source's own errors.
    """
    data_dir = sources.local(data_dir)
    if kind is None:
        kind = sources.looks_like(data_dir)
        if kind == "tfrecord":
            raise UserError(f"'{data_dir}' already holds TFRecord shards: train on it with "
                            "--gin_file=gin/data/tfrecord.gin, or convert the dataset it was made from.")
        if kind is None:
            what = "does not exist" if not tf.io.gfile.isdir(data_dir) else "holds no dataset layout it knows"
            raise UserError(f"Cannot convert '{data_dir}': the directory {what}. Expected Tiny ImageNet's layout "
                            "(wnids.txt, train/<wnid>/images/, ...) or a folder per class (DATA_DIR/train/<class>/ "
                            "and DATA_DIR/val/<class>/, or DATA_DIR/<class>/); --source says which.")
    if kind not in _SOURCES:
        raise UserError(f"--source must be one of {', '.join(_SOURCES)}, got {kind!r}.")
    return _SOURCES[kind](data_dir)


def estimate_bytes(source, split):
    """About the bytes of a split's images: the mean size of a sample of its files times its count."""
    count = source.count(split)
    if not count:
        return 0
    if hasattr(source, "files"):
        paths = source.files(split)[0]
        sample = [paths[i] for i in np.linspace(0, len(paths) - 1, min(_SAMPLE, len(paths))).astype(int)]
        sizes = [tf.io.gfile.stat(p).length for p in sample]
    else:
        sizes = [len(image) for image, _, _ in source.examples(split).take(_SAMPLE).as_numpy_iterator()]
    return int(count * (np.mean(sizes) + _RECORD_OVERHEAD))


def make_plan(source, shards=None):
    """What the conversion writes: per split, its count and number of shards.

    Args:
      source: the source to convert.
      shards: training shards (the other splits get proportionally fewer, at least 1), or None: near
        SHARD_BYTES each.

    Returns:
      A JSON-able dict; a rerun resumes only when its plan is the same.
    """
    counts = {split: source.count(split) for split in source.splits}
    train = max(counts.get("train", 1), 1)
    splits = {}
    for split, count in counts.items():
        if shards is None:
            n = round(estimate_bytes(source, split) / SHARD_BYTES)
        else:
            n = round(shards * count / train)
        splits[split] = {"count": count, "shards": int(min(max(n, 1), max(count, 1)))}
    # (Without the module describe() names: a plan written before it did still matches.)
    described = {k: v for k, v in source.describe().items() if k != "module"}
    plan = {"plan_version": PLAN_VERSION, "source": described, "fingerprint": source.fingerprint(),
            "seed": SEED, "splits": splits}
    return json.loads(json.dumps(plan))  # As a rerun reads it back from PLAN_FILE.


def _example(image, label, id_, class_ids):
    class_id = class_ids[label].encode("utf-8", "surrogateescape") if label >= 0 else b""
    feature = {"image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
               "image/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
               "image/class_id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[class_id])),
               "image/id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[id_]))}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _records(source, split, survey):
    """Serialized tf.train.Examples of a split, in the source's order; `survey` reads each image's header."""
    class_ids = list(source.class_ids)
    try:
        for image, label, id_ in source.examples(split).prefetch(64).as_numpy_iterator():
            survey.add(image)
            yield _example(image, int(label), id_, class_ids)
    except tf.errors.OpError as err:
        raise UserError(f"Cannot read the {split} images of {source.location}: {err.message.splitlines()[0]}. "
                        "Fix or remove the file and convert again (completed shards are kept).") from None


def write_shard(path, records):
    """Writes records to `path` + '.tmp', then renames it to `path`: a shard under its name is complete.

    Returns:
      The number of records written.
    """
    tmp = path + _TMP
    count = 0
    with tf.io.TFRecordWriter(tmp) as writer:
        for record in records:
            writer.write(record)
            count += 1
    tf.io.gfile.rename(tmp, path, overwrite=True)
    return count


def _bounds(count, shards):
    """Start of each shard's records (shards as equal as can be), and the end."""
    return [count * i // shards for i in range(shards + 1)]


def _write_split(source, split, plan, out):
    """Writes the split's missing shards; returns its index entry (its images' `KnownImages` when all were read)."""
    count, shards = plan["count"], plan["shards"]
    names = [tfrecord.shard_name(split, i, shards) for i in range(shards)]
    bounds = _bounds(count, shards)
    entries = [{"file": name, "count": bounds[i + 1] - bounds[i]} for i, name in enumerate(names)]
    todo = [i for i, name in enumerate(names) if not tf.io.gfile.exists(sources.join(out, name))]
    if len(todo) < shards:
        logging.info("%s: %d of %d shards already written, kept.", split, shards - len(todo), shards)
    # The headers of the images read: all of them (unless every shard, or every bucket of a resumed training split,
    # is kept) let the index say what the reader may leave out (trainer.data.preprocess.KnownImages).
    survey = ImageSurvey()
    if todo and split != "train":  # In the source's order: shard i is a contiguous run of it.
        records = _records(source, split, survey)
        for i in range(shards):
            chunk = list(itertools.islice(records, bounds[i + 1] - bounds[i]))
            if i in todo:
                _save(out, names[i], chunk, entries[i]["count"])
    elif todo:
        _write_train(source, plan, out, names, bounds, todo, survey)
    known = survey.known(count)
    return {"count": count, "shards": entries, **({"images": known.to_json()} if known else {})}


def _save(out, name, records, expected):
    written = write_shard(sources.join(out, name), records)
    if written != expected:
        raise UserError(f"{name}: {written} records, the plan says {expected}: the source changed during the "
                        "conversion. Convert again.")
    logging.info("Wrote %s (%d images).", sources.join(out, name), written)


def _write_train(source, plan, out, names, bounds, todo, survey):
    """A seeded permutation in two passes, so memory holds one shard, not the split.

    Pass 1 writes the examples bound for each missing shard to a bucket file, in the source's order; pass 2
    shuffles each bucket in memory into its shard. Buckets are complete once all are renamed.
    """
    count = plan["count"]
    position = np.empty(count, np.int64)
    position[np.random.default_rng(SEED).permutation(count)] = np.arange(count)  # Example -> place in the split.
    shard_of = np.searchsorted(bounds, position, side="right") - 1
    buckets = [sources.join(out, f"{_BUCKET}{names[i]}") for i in range(len(names))]
    if not all(tf.io.gfile.exists(buckets[i]) for i in todo):
        writers = {i: tf.io.TFRecordWriter(buckets[i] + _TMP) for i in todo}
        seen = 0
        for k, record in enumerate(_records(source, "train", survey)):
            if k < count and shard_of[k] in writers:
                writers[shard_of[k]].write(record)
            seen += 1
        for writer in writers.values():
            writer.close()
        if seen != count:
            raise UserError(f"The training split of {source.location} has {seen} images, the plan says {count}: "
                            "it changed during the conversion. Convert again.")
        for i in todo:
            tf.io.gfile.rename(buckets[i] + _TMP, buckets[i], overwrite=True)
    for i in todo:
        order = np.argsort(position[shard_of == i])  # The bucket holds them in the source's order.
        bucket = list(tf.data.TFRecordDataset(buckets[i]).as_numpy_iterator())
        if len(bucket) != len(order):
            raise UserError(f"{buckets[i]} is damaged ({len(bucket)} records, expected {len(order)}): remove it "
                            "and convert again.")
        _save(out, names[i], (bucket[j] for j in order), bounds[i + 1] - bounds[i])
        tf.io.gfile.remove(buckets[i])


def _read_json(path):
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, tf.errors.OpError):
        return None


def _write_json(path, value):
    """Writes JSON atomically (a temporary file renamed)."""
    with tf.io.gfile.GFile(path + _TMP, "w") as f:
        f.write(json.dumps(value, indent=1) + "\n")
    tf.io.gfile.rename(path + _TMP, path, overwrite=True)


def _ours(name):
    """Whether a file name is one the converter writes."""
    return (name in (tfrecord.INDEX_FILE, PLAN_FILE, INCOMPLETE_MARKER) or name.endswith((".tfrecord", _TMP))
            or name.startswith(_BUCKET))


def _prepare(out, plan):
    """Readies `out` for `plan`: 'done' (already converted), 'resume' or 'new'.

    Raises:
      UserError: `out` holds other files, or a finished conversion of another plan.
    """
    if not tf.io.gfile.isdir(out):
        tf.io.gfile.makedirs(out)
        return "new"
    names = sources.listdir(out)
    others = [n for n in names if not _ours(n)]
    if others:
        raise UserError(f"'{out}' is not empty and holds no conversion ({', '.join(sorted(others)[:3])}): choose "
                        "a new or empty directory for --out.")
    previous = _read_json(sources.join(out, PLAN_FILE)) if PLAN_FILE in names else None
    finished = tfrecord.INDEX_FILE in names and INCOMPLETE_MARKER not in names
    if previous == plan:
        if finished:
            return "done"
        for name in names:  # Temporary files of the interrupted run; complete shards and buckets are kept.
            if name.endswith(_TMP):
                tf.io.gfile.remove(sources.join(out, name))
        return "resume"
    if finished and names:
        raise UserError(f"'{out}' already holds a finished conversion of another dataset or with other options "
                        f"(its {PLAN_FILE} differs): remove it or choose another --out.")
    for name in names:  # An interrupted conversion of another plan: start clean.
        tf.io.gfile.remove(sources.join(out, name))
    return "new"


def convert(data_dir, out, shards=None, kind=None):
    """Converts the dataset at `data_dir` into TFRecord shards and an index in `out`.

    Args:
      data_dir: the source dataset's directory.
      out: the directory to write (created; may be gs:// or ram://).
      shards: training shards, or None: near SHARD_BYTES each.
      kind: the source's kind ('tiny_imagenet', 'image_folder'), or None: detected.

    Returns:
      (the index's dict, 'done' | 'resume' | 'new': what was there before).

    Raises:
      UserError: a bad source or --out, --shards < 1, a source unreadable or changed mid-way.
    """
    if shards is not None and shards < 1:
        raise UserError(f"--shards must be at least 1, got {shards}.")
    out = sources.local(out).rstrip("/")
    source = open_source(data_dir, kind)
    if out == source.location.rstrip("/"):
        raise UserError(f"--out is the dataset itself ('{out}'): choose another directory.")
    plan = make_plan(source, shards)
    state = _prepare(out, plan)
    index_path = sources.join(out, tfrecord.INDEX_FILE)
    if state == "done":
        return tfrecord.TFRecord(out).index, state
    with tf.io.gfile.GFile(sources.join(out, INCOMPLETE_MARKER), "w") as f:
        f.write("a conversion is being written\n")
    if state == "new":
        _write_json(sources.join(out, PLAN_FILE), plan)
    splits = {split: _write_split(source, split, p, out) for split, p in plan["splits"].items()}
    index = {"format_version": tfrecord.FORMAT_VERSION, "kind": "tfrecord", "source": source.describe(),
             "class_ids": list(source.class_ids), "class_names": list(source.class_names), "splits": splits}
    _write_json(index_path, index)
    tf.io.gfile.remove(sources.join(out, INCOMPLETE_MARKER))
    return index, state


def _define_flags():
    flags.DEFINE_string("data_dir", None, "The dataset to convert (local or gs://).", required=True)
    flags.DEFINE_string("out", None, "Directory to write the shards to (local or gs://).", required=True)
    flags.DEFINE_integer("shards", None, "Training shards (default: near 150 MB each).")
    flags.DEFINE_enum("source", None, list(_SOURCES), "The source's layout (default: detected).")


def main(argv):
    """Converts the dataset given by the flags (or says it is already converted)."""
    cli.no_arguments(argv)
    f = flags.FLAGS
    index, state = convert(f.data_dir, f.out, f.shards, f.source)
    splits = ", ".join(f"{s} {e['count']} images in {len(e['shards'])} shard{'s' * (len(e['shards']) != 1)}"
                       for s, e in index["splits"].items())
    what = {"done": "Already converted", "resume": "Converted (resumed)", "new": "Converted"}[state]
    print(f"{what}: {sources.local(f.out)} ({len(index['class_ids'])} classes; {splits}). Train on it with "
          f"--gin_file=gin/data/tfrecord.gin --gin_bindings=\"DATA_DIR='{sources.local(f.out)}'\".")


def run():
    """Console entry point."""
    _define_flags()
    cli.run(main)


if __name__ == "__main__":
    run()
