"""Reader for the official Tiny ImageNet layout (`tiny-imagenet-200/`), local or `gs://`.

    wnids.txt                       class ids, one a line (their order defines the labels)
    words.txt                       id <TAB> comma-separated names
    train/<wnid>/images/*.JPEG
    train/<wnid>/<wnid>_boxes.txt   file <TAB> x0 <TAB> y0 <TAB> x1 <TAB> y1
    val/images/*.JPEG
    val/val_annotations.txt         file <TAB> wnid <TAB> x0 <TAB> y0 <TAB> x1 <TAB> y1
    test/images/*.JPEG              no labels

The reader only lists files and parses the text files; decoding is the
tf.data pipeline's job. Every path goes through `tf.io.gfile`.
"""

import os

import tensorflow as tf

from trainer.errors import UserError

DOWNLOAD_COMMAND = "python -m trainer.data.download --dest DIR"

# Written at the top of a dataset directory while it is being written
# (by the downloader's extraction or the synthetic writer) and removed
# when it is complete: a directory holding it is never taken for a dataset.
INCOMPLETE_MARKER = ".incomplete"

SPLITS = ("train", "val", "test")

_REQUIRED = (
    ("wnids.txt", tf.io.gfile.exists),
    ("words.txt", tf.io.gfile.exists),
    ("train", tf.io.gfile.isdir),
    ("val/images", tf.io.gfile.isdir),
    ("val/val_annotations.txt", tf.io.gfile.exists),
    ("test/images", tf.io.gfile.isdir),
)
_IMAGE_SUFFIXES = (".jpeg", ".jpg")


class DatasetNotFoundError(UserError):
    """The dataset directory is missing, incomplete or not in the official layout."""


def _is_remote(path):
    return "://" in path


def _join(*parts):
    return os.path.join(*parts)


def _listdir(path):
    """Entry names of a directory, without the trailing '/' some filesystems (GCS) add."""
    return [name.rstrip("/") for name in tf.io.gfile.listdir(path)]


def _read_lines(path):
    """Lines of a text file, without line endings (blank lines kept for line numbers).

    Raises:
      UserError: the file is not UTF-8 text or cannot be read.
    """
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            data = f.read()
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_no = data[:err.start].count(b"\n") + 1
        raise UserError(f"{path}, line {line_no}: not UTF-8 text ({err.reason} at byte {err.start}): the file is "
                        "damaged or not the dataset's; download the dataset again.") from None
    except tf.errors.OpError as err:
        raise UserError(f"Cannot read {path}: {err.message}.") from None
    if "\0" in text:
        raise UserError(f"{path}, line {text[:text.index(chr(0))].count(chr(10)) + 1}: a NUL byte: the file is "
                        "damaged or not a text file; download the dataset again.")
    return text.split("\n") if "\r" not in text else text.splitlines()


def _images_in(directory):
    """Sorted full paths of the JPEG files in `directory` ([] when it does not exist: the scan reports it)."""
    if not tf.io.gfile.isdir(directory):
        return []
    names = [n for n in _listdir(directory) if n.lower().endswith(_IMAGE_SUFFIXES)]
    return [_join(directory, n) for n in sorted(names)]


def _parse_box(fields, path, line_no):
    """Parses `x0 y0 x1 y1` text fields into ints, or raises UserError at file:line."""
    try:
        return tuple(int(v) for v in fields)
    except ValueError:
        raise UserError(
            f"{path}, line {line_no}: expected four integer box coordinates "
            f"(x0 y0 x1 y1), got {' '.join(fields)!r}.") from None


def _not_found_message(data_dir, missing):
    """The one-paragraph message for a missing or incomplete dataset."""
    parent = os.path.dirname(data_dir.rstrip("/")) or "."
    hint = ""
    nested = _join(data_dir, "tiny-imagenet-200")
    if tf.io.gfile.exists(_join(nested, "wnids.txt")):
        hint = f" (It holds a 'tiny-imagenet-200' folder: did you mean DATA_DIR='{nested}'?)"
    return (
        f"Tiny ImageNet not found in '{data_dir}': {missing}.{hint} Expected the layout of "
        "the official archive: wnids.txt, words.txt, train/<wnid>/images/*.JPEG, "
        "val/images/ + val/val_annotations.txt and test/images/. To get it, run "
        f"`{DOWNLOAD_COMMAND.replace('DIR', parent)}` (it creates "
        f"'{_join(parent, 'tiny-imagenet-200')}'), or point DATA_DIR at an existing copy "
        "with --gin_bindings=\"DATA_DIR='/path/to/tiny-imagenet-200'\".")


class TinyImageNet:
    """The files, labels, class names and boxes of a Tiny ImageNet directory.

    Attributes:
      data_dir: the dataset directory (`~` expanded for local paths).
      wnids: class ids in the order of wnids.txt; label `i` is `wnids[i]`.
      class_names: a human-readable name for each class (the first name in
        words.txt, or the wnid when words.txt has none).
      num_classes: `len(wnids)`.
    """

    def __init__(self, data_dir):
        """Checks the layout and reads the class list.

        Args:
          data_dir: the `tiny-imagenet-200` directory (local path or `gs://...`).

        Raises:
          DatasetNotFoundError: the directory is missing, partially written or
            lacks part of the official layout.
          UserError: wnids.txt lists a class twice.
        """
        if not _is_remote(data_dir):
            data_dir = os.path.expanduser(data_dir)
        self.data_dir = data_dir
        self._check_layout()
        self.wnids = self._read_wnids()
        self._check_train_classes()
        self.num_classes = len(self.wnids)
        self.class_names = self._read_class_names()
        self._index = {wnid: i for i, wnid in enumerate(self.wnids)}
        self._files = {}

    def _path(self, *parts):
        return _join(self.data_dir, *parts)

    def _fail(self, missing):
        raise DatasetNotFoundError(_not_found_message(self.data_dir, missing))

    def _check_layout(self):
        if not tf.io.gfile.isdir(self.data_dir):
            self._fail("the directory does not exist")
        if tf.io.gfile.exists(self._path(INCOMPLETE_MARKER)):
            self._fail(f"it is only partially written (it still holds '{INCOMPLETE_MARKER}', "
                       "left by an interrupted download, extraction or synthetic write)")
        missing = [name for name, check in _REQUIRED if not check(self._path(name))]
        if missing:
            self._fail(f"missing {', '.join(missing)}")

    def _read_wnids(self):
        path = self._path("wnids.txt")
        wnids = [line.strip() for line in _read_lines(path) if line.strip()]
        if not wnids:
            self._fail("wnids.txt is empty")
        seen = set()
        for wnid in wnids:
            if wnid in seen:
                raise UserError(f"{path} lists class '{wnid}' twice; each class id must "
                                "appear once.")
            seen.add(wnid)
        return wnids

    def _check_train_classes(self):
        present = set(_listdir(self._path("train")))
        absent = [w for w in self.wnids if w not in present]
        if absent:
            shown = ", ".join(f"train/{w}" for w in absent[:3])
            more = f" and {len(absent) - 3} more" if len(absent) > 3 else ""
            raise DatasetNotFoundError(
                f"{len(absent)} of the {len(self.wnids)} classes in {self._path('wnids.txt')} have no training "
                f"folder ({shown}{more} missing in {self._path('train')}): the copy is incomplete, or wnids.txt "
                "lists classes it does not hold. Download the dataset again "
                f"(`{DOWNLOAD_COMMAND.replace('DIR', os.path.dirname(self.data_dir.rstrip('/')) or '.')}`) or "
                "remove those lines from wnids.txt.")

    def _read_class_names(self):
        names = {}
        wanted = set(self.wnids)
        for line in _read_lines(self._path("words.txt")):
            wnid, _, words = line.partition("\t")
            if wnid in wanted and words.strip():
                names[wnid] = words.split(",")[0].strip()
        return [names.get(w, w) for w in self.wnids]

    def _check_split(self, split, allowed=SPLITS):
        if split not in allowed:
            raise UserError(f"Unknown Tiny ImageNet split '{split}': expected one of "
                            f"{', '.join(repr(s) for s in allowed)}.")

    def _val_annotations(self):
        """Yields (file, wnid, box) per line of val_annotations.txt, checking each line."""
        path = self._path("val", "val_annotations.txt")
        for line_no, line in enumerate(_read_lines(path), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2:
                raise UserError(f"{path}, line {line_no}: expected "
                                f"'file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1', got {line!r}.")
            name, wnid = fields[0].strip(), fields[1].strip()
            if wnid not in self._index:
                raise UserError(f"{path}, line {line_no}: class '{wnid}' of '{name}' is not in "
                                f"{self._path('wnids.txt')} ({self.num_classes} classes).")
            box = _parse_box(fields[2:6], path, line_no) if len(fields) >= 6 else None
            yield name, wnid, box

    def files(self, split):
        """Image paths and labels of a split, in a deterministic (sorted) order.

        Args:
          split: 'train', 'val' or 'test'.

        Returns:
          (paths, labels): full image paths, and the class index of each
          (position of its wnid in wnids.txt), or None for 'test'.

        Raises:
          UserError: an unknown split, an unknown class in val_annotations.txt
            (naming the file and line) or annotations that do not match
            val/images.
        """
        self._check_split(split)
        if split not in self._files:  # Listed once: the trainer and every input pipeline ask.
            self._files[split] = self._list_files(split)
        return self._files[split]

    def _list_files(self, split):
        if split == "train":
            pairs = []
            for label, wnid in enumerate(self.wnids):
                pairs += [(p, label) for p in _images_in(self._path("train", wnid, "images"))]
            pairs.sort()
            return [p for p, _ in pairs], [label for _, label in pairs]
        if split == "val":
            return self._val_files()
        return _images_in(self._path("test", "images")), None

    def _val_files(self):
        labels = {name: self._index[wnid] for name, wnid, _ in self._val_annotations()}
        images_dir = self._path("val", "images")
        present = {os.path.basename(p) for p in _images_in(images_dir)}
        for problem, names in (("listed in val/val_annotations.txt but missing from val/images",
                                sorted(set(labels) - present)),
                               ("in val/images but not listed in val/val_annotations.txt",
                                sorted(present - set(labels)))):
            if names:
                raise UserError(f"{len(names)} validation images are {problem} "
                                f"(e.g. {', '.join(names[:3])}) in '{self.data_dir}': the copy "
                                "is incomplete or mixed; download it again.")
        names = sorted(labels)
        return [_join(images_dir, n) for n in names], [labels[n] for n in names]

    def boxes(self, split):
        """Bounding boxes of the objects of a labelled split.

        Args:
          split: 'train' (from train/<wnid>/<wnid>_boxes.txt) or 'val' (from
            val/val_annotations.txt).

        Returns:
          dict from image file name (no directory) to (x0, y0, x1, y1) ints.

        Raises:
          UserError: another split, or a malformed line (naming file and line).
        """
        self._check_split(split, allowed=("train", "val"))
        if split == "val":
            return {name: box for name, _, box in self._val_annotations() if box is not None}
        boxes = {}
        for wnid in self.wnids:
            path = self._path("train", wnid, f"{wnid}_boxes.txt")
            if not tf.io.gfile.exists(path):
                continue
            for line_no, line in enumerate(_read_lines(path), start=1):
                fields = line.split("\t")
                if not line.strip():
                    continue
                if len(fields) != 5:
                    raise UserError(f"{path}, line {line_no}: expected "
                                    f"'file<TAB>x0<TAB>y0<TAB>x1<TAB>y1', got {line!r}.")
                boxes[fields[0].strip()] = _parse_box(fields[1:], path, line_no)
        return boxes


# --- The scan before training ----------------------------------------------------------------------------------

SCAN_VERSION = 1
TINY_CLASS_FRACTION = 0.1  # A class with fewer training images than this fraction of the median is "tiny".
IMBALANCE_RATIO = 2.0  # Most / fewest training images a class above which the split is called imbalanced.


def scan_cache_dir():
    """Where scans are cached: $TRAINER_CACHE_DIR, else $XDG_CACHE_HOME or ~/.cache, /tiny-imagenet-trainer."""
    return os.environ.get("TRAINER_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tiny-imagenet-trainer")


def _scan_key(reader, listed):
    """Identifies the dataset's content: its path, every file name, and (local copies) the folders' mtimes."""
    import hashlib  # pylint: disable=import-outside-toplevel

    digest = hashlib.sha1(f"{SCAN_VERSION}\n{reader.data_dir}\n".encode())
    for split, paths in listed.items():
        digest.update(f"{split}:{len(paths)}\n".encode())
        for path in paths:
            digest.update(path.encode("utf-8", "surrogateescape") + b"\n")
    if not _is_remote(reader.data_dir):
        folders = {os.path.dirname(p) for paths in listed.values() for p in paths}
        for folder in sorted(folders | {reader.data_dir}):
            try:
                digest.update(f"{folder}:{os.stat(folder).st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
            except OSError:
                pass
    return digest.hexdigest()


def _undecodable(paths):
    """The paths whose bytes `tf.io.decode_jpeg` (the training pipeline's decoder) cannot decode."""
    if not paths:
        return []
    ds = tf.data.Dataset.from_tensor_slices(paths).map(
        lambda p: (p, tf.shape(tf.io.decode_jpeg(tf.io.read_file(p), channels=3))),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=False).ignore_errors(log_warning=False)
    decoded = {p.decode("utf-8", "surrogateescape") for p, _ in ds.as_numpy_iterator()}
    return [p for p in paths if p not in decoded]


def scan(reader, use_cache=True):
    """Counts each split's images and the undecodable ones, and the training images of each class.

    Every image is decoded once; the result is cached (see `scan_cache_dir`) under a key of the dataset's
    path, file names and folder times, so the full dataset is not decoded again on every run.

    Args:
      reader: a `TinyImageNet`.
      use_cache: read and write the cache.

    Returns:
      A dict: {'data_dir', 'splits': {split: {'images', 'unreadable': [paths]}}, 'train_per_class': {wnid: n},
      'empty_classes', 'tiny_classes', 'imbalance' (most / fewest, None with an empty class), 'problems' (one
      line each), 'cached' (where the scan is cached, or None)}.
    """
    import json  # pylint: disable=import-outside-toplevel

    listed = {split: reader.files(split)[0] for split in SPLITS}
    key = _scan_key(reader, listed)
    cache = os.path.join(scan_cache_dir(), f"scan-{key}.json")
    if use_cache:
        try:
            with open(cache, encoding="utf-8") as f:
                report = json.load(f)
            if report.get("key") == key:
                report["cached"] = cache
                return report
        except (OSError, ValueError):
            pass
    unreadable = set(_undecodable([p for paths in listed.values() for p in paths]))
    splits = {split: {"images": len(paths), "unreadable": [p for p in paths if p in unreadable]}
              for split, paths in listed.items()}
    paths, labels = reader.files("train")
    per_class = {w: 0 for w in reader.wnids}
    for path, label in zip(paths, labels):
        if path not in unreadable:
            per_class[reader.wnids[label]] += 1
    counts = sorted(per_class.values())
    median = counts[len(counts) // 2] if counts else 0
    empty = [w for w, n in per_class.items() if n == 0]
    tiny = [w for w, n in per_class.items() if 0 < n < TINY_CLASS_FRACTION * median]
    imbalance = (max(counts) / min(counts)) if counts and min(counts) > 0 else None
    problems = []
    for split, entry in splits.items():
        bad = entry["unreadable"]
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            problems.append(f"{len(bad)} of the {entry['images']} {split} images cannot be decoded and are skipped: "
                            f"{shown}.")
    if empty:
        problems.append(f"{len(empty)} classes have no decodable training image, so the network cannot learn them: "
                        f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''} (train/<wnid>/images).")
    if tiny:
        problems.append(f"{len(tiny)} classes have fewer than {TINY_CLASS_FRACTION:.0%} of the median "
                        f"{median} training images: " + ", ".join(f"{w} ({per_class[w]})" for w in tiny[:5])
                        + (" ..." if len(tiny) > 5 else "") + ".")
    if imbalance and imbalance >= IMBALANCE_RATIO:
        fewest, most = min(per_class, key=per_class.get), max(per_class, key=per_class.get)
        problems.append(f"The training classes are imbalanced: {per_class[fewest]} ({fewest}) to {per_class[most]} "
                        f"({most}) images a class; consider trainer.optim.cross_entropy.class_weights.")
    report = {"key": key, "data_dir": reader.data_dir, "splits": splits, "train_per_class": per_class,
              "empty_classes": empty, "tiny_classes": tiny, "imbalance": imbalance, "problems": problems}
    if use_cache:
        try:
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            tmp = f"{cache}.tmp-{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(report, f)
            os.replace(tmp, cache)
        except OSError:
            cache = None  # A read-only home: the scan runs again next time.
    report["cached"] = cache if use_cache else None
    return report


def scan_summary(report):
    """One line: each split's images and unreadable ones, and the training images a class."""
    parts = [f"{split} {entry['images']} images ({len(entry['unreadable'])} unreadable)"
             for split, entry in report["splits"].items()]
    counts = list(report["train_per_class"].values())
    if counts:
        parts[0] += f", {min(counts)} to {max(counts)} a class"
    return "; ".join(parts)
