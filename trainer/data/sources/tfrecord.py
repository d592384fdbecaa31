"""TFRecord shards written by `python -m trainer.data.convert`: how TPU and multi-worker runs read their data.

    DATA_DIR/index.json                        classes, per-split counts and shard lists (no pass over
                                               the data is needed to count it)
    DATA_DIR/<split>-00000-of-00008.tfrecord   tf.train.Example records (see FEATURES)

Reading interleaves shards in parallel; under several input pipelines each
reads its own subset of shard files (or, with fewer shards than pipelines,
its own 1/n of every shard's records).

A corrupt shard is found at read time by counting its records against the
index: TFRecordDataset raises DataLossError ("corrupted record at <offset>",
no file name) on a damaged record and then ends that file, and it ends a
truncated file silently, without any error. `on_corrupt='skip'` keeps the
records read before the damage and logs the shard (one stderr line);
`on_corrupt='stop'` fails with an error naming the shard (marked with
`trainer.errors.DATA_ERROR_MARK`, so the command prints that one line), and the
pipeline then stops on any unusable record instead of skipping it (`strict`).
"""

import hashlib
import json
import sys
import time

import tensorflow as tf

from trainer.data import sources
from trainer.data.preprocess import KnownImages
from trainer.data.sources import INCOMPLETE_MARKER, DatasetNotFoundError
from trainer.errors import DATA_ERROR_MARK, UserError
from trainer.registry import configurable

INDEX_FILE = "index.json"
FORMAT_VERSION = 1
# One tf.train.Example per image: the encoded bytes as they were in the source, the label (-1: unlabelled),
# the class id (b"" when unlabelled) and the source's example id (its file name relative to DATA_DIR).
FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/label": tf.io.FixedLenFeature([], tf.int64),
    "image/class_id": tf.io.FixedLenFeature([], tf.string),
    "image/id": tf.io.FixedLenFeature([], tf.string),
}
# index.json:
# {"format_version": 1, "kind": "tfrecord", "source": <the source's describe()>,
#  "class_ids": [...], "class_names": [...],
#  "splits": {"train": {"count": N, "shards": [{"file": "train-00000-of-00002.tfrecord", "count": n}, ...],
#                       "images": {"max_pixels": P, "size": [h, w] or null, "webp": false, "decoded": true}},
#             "val": {...}, "test": {...}}}
# "images" (since this converter read every header; absent in older indexes, and then nothing is assumed): the most
# pixels any image declares, the size all declare (null when they differ), whether any is WebP and whether the
# converter decoded every one ("decoded"; absent in older indexes: false) (trainer.data.preprocess.KnownImages:
# what the decode may leave out, and whether it may decode a batch at a time).
ON_CORRUPT = ("skip", "stop")
CORRUPT_PREFIX = "Corrupt TFRecord shard "
AUTOTUNE = sources.AUTOTUNE
MAX_CYCLE_LENGTH = 16  # Shards read at once by one input pipeline.
BLOCK = 16  # Consecutive records taken from a shard in turn (and checked and parsed together).
_REMOTE_BUFFER = 4 << 20  # Read buffer a shard on a remote file system (gs://): fewer, larger requests.
_LAYOUT = ("Expected index.json and <split>-NNNNN-of-NNNNN.tfrecord shards written by "
           "`python -m trainer.data.convert --data_dir=SRC --out=DATA_DIR`.")


def shard_name(split, index, count):
    """The file name of shard `index` (from 0) of `count` of a split."""
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def parse_index(text, path):
    """The index's dict, checked.

    Args:
      text: index.json's content.
      path: its path, for messages.

    Returns:
      The index (see the format above).

    Raises:
      DatasetNotFoundError: not JSON, another format version or a field missing or of the wrong type.
    """
    try:
        index = json.loads(text)
        if index.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {index.get('format_version')!r}, expected {FORMAT_VERSION}")
        class_ids, class_names = list(index["class_ids"]), list(index["class_names"])
        if not class_ids or len(class_ids) != len(class_names):
            raise ValueError("class_ids and class_names are empty or of different lengths")
        for split, entry in index["splits"].items():
            counts = [int(s["count"]) for s in entry["shards"]]
            if not all(isinstance(s["file"], str) and "/" not in s["file"] for s in entry["shards"]):
                raise ValueError(f"a shard of {split!r} is not a file name")
            if sum(counts) != int(entry["count"]):
                raise ValueError(f"the shards of {split!r} hold {sum(counts)} records, its count says "
                                 f"{entry['count']}")
            if "images" in entry:
                KnownImages.from_json(entry["images"])
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
        raise DatasetNotFoundError(f"{path} is damaged ({err}): convert the dataset again "
                                   f"(`python -m trainer.data.convert --data_dir=SRC --out=...`).") from None
    return index


_WARNED = set()  # The corrupt-shard lines this process printed.


def _warn_once(message):
    """Prints a corrupt shard's line to stderr as the console's lines read ('hh:mm:ss warning: ...'), once a process.

    A split is read more than once in a run (the data check, the in-memory load, each streamed epoch): the same
    damage is named the first time only. From Python: tf.print would print it each time, and tf.timestamp
    fails under op determinism (`trainer.train.deterministic_ops`).
    """
    text = message.numpy().decode("utf-8", "surrogateescape")
    if text not in _WARNED:
        _WARNED.add(text)
        print(f"{time.strftime('%H:%M:%S')} warning: {text}", file=sys.stderr, flush=True)
    return True


class TFRecord(sources.Source):
    """Shards and their index (see the module docstring).

    Attributes:
      index: index.json's content.
    """

    kind = "tfrecord"

    def __init__(self, data_dir, on_corrupt="skip"):
        """Reads and checks index.json and that its shards are there (without reading them).

        Args:
          data_dir: the directory the converter wrote (local, gs:// or any tf.io.gfile file system).
          on_corrupt: 'skip' or 'stop': what a shard found corrupt at read time does.

        Raises:
          DatasetNotFoundError: no directory, a partial conversion, no or a damaged index, missing shards.
          UserError: another on_corrupt.
        """
        if on_corrupt not in ON_CORRUPT:
            raise UserError(f"trainer.sources.tfrecord.on_corrupt must be 'skip' or 'stop', got {on_corrupt!r}.")
        self.on_corrupt = on_corrupt
        self.strict = on_corrupt == "stop"
        self.location = self.data_dir = sources.local(data_dir).rstrip("/") or "/"
        if not tf.io.gfile.isdir(self.location):
            raise DatasetNotFoundError(f"No TFRecord dataset at '{self.location}': the directory does not exist. "
                                       f"{_LAYOUT}")
        if tf.io.gfile.exists(sources.join(self.location, INCOMPLETE_MARKER)):
            raise DatasetNotFoundError(f"The TFRecord dataset at '{self.location}' is only partially written (it "
                                       f"still holds '{INCOMPLETE_MARKER}'): rerun the conversion, which resumes it.")
        path = sources.join(self.location, INDEX_FILE)
        if not tf.io.gfile.exists(path):
            hint = sources.wrong_layout_hint(self.location, self.kind)
            raise DatasetNotFoundError(f"No TFRecord dataset at '{self.location}': it has no {INDEX_FILE}. "
                                       f"{_LAYOUT}{hint}")
        try:
            with tf.io.gfile.GFile(path, "rb") as f:
                self._index_text = f.read()
        except tf.errors.OpError as err:
            raise DatasetNotFoundError(f"Cannot read {path}: {err.message}.") from None
        try:
            text = self._index_text.decode("utf-8")
        except UnicodeDecodeError:
            text = ""
        self.index = parse_index(text, path)
        self.class_ids = list(self.index["class_ids"])
        self.class_names = list(self.index["class_names"])
        self.splits = tuple(self.index["splits"])
        self._check_shards()

    def _check_shards(self):
        present = set(sources.listdir(self.location))
        missing = [s["file"] for split in self.splits for s in self.shards(split) if s["file"] not in present]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise DatasetNotFoundError(
                f"{len(missing)} shards listed in {sources.join(self.location, INDEX_FILE)} are missing from "
                f"'{self.location}' ({', '.join(missing[:3])}{more}): the copy is incomplete. Copy them again, or "
                "convert the dataset again.")

    def shards(self, split):
        """[{"file": name, "count": records}, ...] of a split, from the index."""
        return self.index["splits"][split]["shards"]

    def count(self, split):
        self.check_split(split)
        return int(self.index["splits"][split]["count"])

    def share_count(self, split, num_pipelines, pipeline_id):
        """As `examples` shares: whole shard files, or, with fewer shards than pipelines, 1/n of each one's records."""
        counts = [int(s["count"]) for s in self.shards(split)]
        if num_pipelines > 1 and len(counts) >= num_pipelines:
            return sum(counts[pipeline_id::num_pipelines])
        return sum(len(range(pipeline_id, count, num_pipelines)) for count in counts)

    def known_images(self, split):
        self.check_split(split)
        known = self.index["splits"][split].get("images")
        return None if known is None else KnownImages.from_json(known)

    def examples(self, split, shuffle_seed=None, input_context=None):
        """(encoded bytes, label int32, example id) of a split, its shards read in parallel (see `Source`).

        Under several input pipelines each reads its own shard files (fixed, then shuffled within the
        pipeline), or, with fewer shards than pipelines, every shard and its own 1/n of each one's records.
        """
        self.check_split(split)
        shards = self.shards(split)
        paths = [sources.join(self.location, s["file"]) for s in shards]
        counts = [int(s["count"]) for s in shards]
        pipelines, pipeline_id = 1, 0
        if input_context is not None:
            pipelines, pipeline_id = input_context.num_input_pipelines, input_context.input_pipeline_id
        files = tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string), tf.constant(counts, tf.int64)))
        record_share = pipelines > 1 and len(paths) < pipelines
        if pipelines > 1 and not record_share:
            # Each pipeline its own files, fixed, before any shuffle: pipelines shuffle with different seeds.
            files = files.shard(pipelines, pipeline_id)
            cycle = len(range(pipeline_id, len(paths), pipelines))
        else:
            cycle = len(paths)
        if shuffle_seed is not None:
            files = files.shuffle(max(len(paths), 1), seed=shuffle_seed, reshuffle_each_iteration=True)
        share = (pipelines, pipeline_id) if record_share else (1, 0)
        order = sources.read_order(shuffle_seed)
        batches = files.interleave(lambda path, count: self._read_shard(path, count, *share),
                                   cycle_length=max(1, min(cycle, MAX_CYCLE_LENGTH)), num_parallel_calls=AUTOTUNE,
                                   deterministic=order)
        return batches.map(_parse, num_parallel_calls=AUTOTUNE, deterministic=order).unbatch()

    def _read_shard(self, path, count, num_shares, share):
        """Batches of BLOCK records of one shard (this pipeline's share of them), checked against the index.

        After its records the shard gives an empty batch that carries the check: fewer records than the
        index says is a corrupt shard, logged ('skip') or an error ('stop'). Batches keep the per-record cost
        of the check (and of parsing) low; a shard's records are already in random order.
        """
        buffer = _REMOTE_BUFFER if sources.is_remote(self.location) else None
        records = tf.data.TFRecordDataset(path, buffer_size=buffer).ignore_errors()
        if num_shares > 1:
            records = records.shard(num_shares, share)
            count = (count - share + num_shares - 1) // num_shares
        batches = records.batch(BLOCK).map(lambda batch: (batch, False)).concatenate(
            tf.data.Dataset.from_tensors((tf.zeros([0], tf.string), True)))
        stop = self.on_corrupt == "stop"

        def step(read, element):
            batch, end = element
            short = tf.logical_and(end, read < count)
            message = tf.strings.join([
                DATA_ERROR_MARK if stop else "", CORRUPT_PREFIX, path, ": read ", tf.strings.as_string(read),
                " of its ", tf.strings.as_string(count),
                " records, the rest is damaged or cut off. " + (
                    "Convert the dataset again, or set trainer.sources.tfrecord.on_corrupt = 'skip' to train "
                    "without them." if stop else "Skipped them (trainer.sources.tfrecord.on_corrupt = 'skip').")])
            if stop:
                checks = [tf.debugging.Assert(tf.logical_not(short), [message])]
            else:
                checks = [tf.cond(short, lambda: tf.py_function(_warn_once, [message], tf.bool),
                                  lambda: tf.constant(True))]
            with tf.control_dependencies(checks):
                return read + tf.size(batch, tf.int64), tf.identity(batch)

        return batches.scan(tf.constant(0, tf.int64), step)

    def fingerprint(self):
        digest = hashlib.sha1(f"{self.kind}\n{self.location}\n".encode("utf-8", "surrogateescape"))
        digest.update(self._index_text)
        for split in self.splits:
            for shard in self.shards(split):
                size = tf.io.gfile.stat(sources.join(self.location, shard["file"])).length
                digest.update(f"\n{shard['file']}:{size}".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()

    def describe(self):
        return {**super().describe(), "on_corrupt": self.on_corrupt, "source": self.index.get("source")}


def _parse(records):
    """(encoded bytes, label int32, example id) of serialized tf.train.Examples (any shape)."""
    example = tf.io.parse_example(records, FEATURES)
    return example["image/encoded"], tf.cast(example["image/label"], tf.int32), example["image/id"]


@configurable("trainer.sources")
def tfrecord(data_dir, on_corrupt="skip"):
    """TFRecord shards and index.json written by `python -m trainer.data.convert`.

    Args:
      data_dir: the converted dataset's directory (local, gs:// or any tf.io.gfile file system).
      on_corrupt: a shard found corrupt while reading (fewer records than its index says): 'skip' the rest of it
        (logged, naming the shard) or 'stop' with an error naming it.
    """
    return TFRecord(data_dir, on_corrupt)
