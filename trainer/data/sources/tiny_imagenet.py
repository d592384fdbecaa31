"""The official Tiny ImageNet layout (`tiny-imagenet-200/`), local, gs:// or any tf.io.gfile file system.

    wnids.txt                       class ids, one a line (their order defines the labels)
    words.txt                       id <TAB> comma-separated names
    train/<wnid>/images/*.JPEG
    train/<wnid>/<wnid>_boxes.txt   file <TAB> x0 <TAB> y0 <TAB> x1 <TAB> y1
    val/images/*.JPEG
    val/val_annotations.txt         file <TAB> wnid <TAB> x0 <TAB> y0 <TAB> x1 <TAB> y1
    test/images/*.JPEG              no labels

The source lists files and parses the text files; decoding is
`trainer.data.preprocess`'s job. Every path goes through `tf.io.gfile`.
"""

import os

import tensorflow as tf

from trainer.data import sources
from trainer.data.sources import INCOMPLETE_MARKER, DatasetNotFoundError
from trainer.errors import UserError
from trainer.registry import configurable

DOWNLOAD_COMMAND = "python -m trainer.data.download --dest DIR"
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
_join = sources.join
_listdir = sources.listdir
_read_lines = sources.read_lines


def _images_in(directory):
    """Sorted full paths of the JPEG files in `directory` ([] when it does not exist: the scan reports it); hidden
    files (macOS's '._x.JPEG' metadata twins) left out."""
    if not tf.io.gfile.isdir(directory):
        return []
    names = [n for n in _listdir(directory, hidden=False) if n.lower().endswith(_IMAGE_SUFFIXES)]
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
    hint += sources.wrong_layout_hint(data_dir, "tiny_imagenet")
    return (
        f"Tiny ImageNet not found in '{data_dir}': {missing}.{hint} Expected the layout of "
        "the official archive: wnids.txt, words.txt, train/<wnid>/images/*.JPEG, "
        "val/images/ + val/val_annotations.txt and test/images/. To get it, run "
        f"`{DOWNLOAD_COMMAND.replace('DIR', parent)}` (it creates "
        f"'{_join(parent, 'tiny-imagenet-200')}'), or point DATA_DIR at an existing copy "
        "with --gin_bindings=\"DATA_DIR='/path/to/tiny-imagenet-200'\".")


class TinyImageNet(sources.FileSource):
    """The files, labels, class names and boxes of a Tiny ImageNet directory.

    Attributes:
      data_dir (= location): the dataset directory (`~` expanded for local paths).
      wnids (= class_ids): class ids in the order of wnids.txt; label `i` is `wnids[i]`.
      class_names: a human-readable name for each class (the first name in
        words.txt, or the wnid when words.txt has none).
    """

    kind = "tiny_imagenet"
    splits = SPLITS

    def __init__(self, data_dir):
        """Checks the layout and reads the class list.

        Args:
          data_dir: the `tiny-imagenet-200` directory (local path or `gs://...`).

        Raises:
          DatasetNotFoundError: the directory is missing, partially written or
            lacks part of the official layout.
          UserError: wnids.txt lists a class twice.
        """
        super().__init__()
        self.data_dir = self.location = sources.local(data_dir)
        self._check_layout()
        self.wnids = self.class_ids = self._read_wnids()
        self._check_train_classes()
        self.class_names = self._read_class_names()
        self._index = {wnid: i for i, wnid in enumerate(self.wnids)}

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

    def _list(self, split):
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
        if split not in sources.LABELLED_SPLITS:
            raise UserError(f"Tiny ImageNet has boxes for 'train' and 'val', not {split!r}.")
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


@configurable("trainer.sources")
def tiny_imagenet(data_dir):
    """The official Tiny ImageNet layout (wnids.txt, train/<wnid>/images/, val/val_annotations.txt)."""
    return TinyImageNet(data_dir)
