"""A folder per class: what Keras `image_dataset_from_directory` and torchvision `ImageFolder` read.

Two layouts, told apart by a `train/` folder:

    DATA_DIR/train/<class>/**/*.jpg     DATA_DIR/<class>/**/*.jpg
    DATA_DIR/val/<class>/**/*.jpg       (a seeded, stratified `val_fraction` of each class is held out for
    DATA_DIR/test/**/*.jpg (optional,    validation; the split is written to the model directory,
                            unlabelled)  `val_split.json`, so a resumed run validates on the same images)

Images are JPEG, PNG, GIF, BMP or WebP files (any case of extension), in
subfolders of any depth, counted under their top class folder. Labels are
the class folders in sorted order; their names are the folder names, or
come from an optional `classes.txt` or `words.txt` at the top
(`folder<TAB>name`, one a line; words.txt keeps the first of comma-separated
names, as Tiny ImageNet's does). Other files are ignored, and counted; hidden
ones (a name starting with '.': `.DS_Store`, macOS's `._photo.jpg`, folders
such as `.ipynb_checkpoints/`) are left out without a word.
"""

import json
import random

import tensorflow as tf
from absl import logging

from trainer.data import sources
from trainer.data.preprocess import IMAGE_SUFFIXES
from trainer.data.sources import INCOMPLETE_MARKER, DatasetNotFoundError
from trainer.errors import UserError
from trainer.registry import configurable

NAME_FILES = ("classes.txt", "words.txt")
SPLIT_FILE = "val_split.json"
_LAYOUT = ("Expected a folder per class: DATA_DIR/train/<class>/ and DATA_DIR/val/<class>/, or only "
           "DATA_DIR/<class>/ (a share of each class then held out for validation).")


def _walk(folder):
    """(image paths, other files) under `folder`, sorted, at any depth; hidden files and folders left out."""
    images, others = [], []
    for root, _, names in sources.walk(folder):
        for name in names:
            path = sources.join(root, name.rstrip("/"))
            (images if name.lower().endswith(IMAGE_SUFFIXES) else others).append(path)
    return sorted(images), sorted(others)


class ImageFolder(sources.FileSource):
    """Class folders (see the module docstring)."""

    kind = "image_folder"

    def __init__(self, data_dir, val_fraction=0.1, split_seed=0):
        super().__init__()
        self.location = self.data_dir = sources.local(data_dir).rstrip("/") or "/"
        self.val_fraction, self.split_seed = val_fraction, split_seed
        if not tf.io.gfile.isdir(self.location):
            raise DatasetNotFoundError(f"No dataset at '{self.location}': the directory does not exist. {_LAYOUT}")
        if tf.io.gfile.exists(sources.join(self.location, INCOMPLETE_MARKER)):
            raise DatasetNotFoundError(f"The dataset at '{self.location}' is only partially written (it still holds "
                                       f"'{INCOMPLETE_MARKER}'): write it again.")
        if sources.looks_like(self.location) in ("tiny_imagenet", "tfrecord"):
            hint = sources.wrong_layout_hint(self.location, self.kind)
            raise DatasetNotFoundError(f"'{self.location}' is not a folder per class.{hint}")
        self.split_layout = tf.io.gfile.isdir(sources.join(self.location, "train"))
        if self.split_layout and not tf.io.gfile.isdir(sources.join(self.location, "val")):
            raise DatasetNotFoundError(f"'{self.location}' has train/ but no val/ folder. {_LAYOUT}")
        train_root = sources.join(self.location, "train") if self.split_layout else self.location
        self.class_ids = self._class_folders(train_root)
        self.class_names = self._names()
        self.splits = ("train", "val") + (("test",) if self._has_test() else ())
        self._ignored = []
        self._by_class = {c: self._class_images(train_root, c) for c in self.class_ids}
        self._val_ids = None  # Held-out ids of the single-folder layout (pinned by `pin`).
        if self.split_layout:
            self._check_val_classes()
        if self._ignored:
            count = len(self._ignored)
            logging.warning("Ignored %d %s %s %s under %s, e.g. %s.", count,
                            "file that is not a" if count == 1 else "files that are not",
                            "/".join(s.lstrip(".") for s in IMAGE_SUFFIXES), "image" if count == 1 else "images",
                            self.location,
                            ", ".join(sources.relative(p, self.location) for p in self._ignored[:3]))

    # --- Classes ---------------------------------------------------------------------------------------------------

    def _class_folders(self, root):
        entries = sorted(sources.listdir(root, hidden=False))
        folders = [e for e in entries if tf.io.gfile.isdir(sources.join(root, e))
                   and not (not self.split_layout and e in ("val", "test"))]
        stray = [e for e in entries if e not in folders and e not in NAME_FILES and e.lower().endswith(IMAGE_SUFFIXES)]
        where = sources.relative(root, self.location) + "/" if self.split_layout else ""
        if stray:
            raise UserError(f"'{root}' holds images directly ({', '.join(stray[:3])}"
                            f"{' ...' if len(stray) > 3 else ''}), outside any class folder: move each into "
                            f"{where}<class>/. {_LAYOUT}")
        if not folders:
            hint = sources.wrong_layout_hint(self.location, self.kind)
            raise DatasetNotFoundError(f"No class folders in '{root}'. {_LAYOUT}{hint}")
        if len(folders) < 2:
            raise UserError(f"'{root}' holds one class folder ({folders[0]}): a classifier needs at least two. "
                            f"{_LAYOUT}")
        return folders

    def _names(self):
        for name_file in NAME_FILES:
            path = sources.join(self.location, name_file)
            if tf.io.gfile.exists(path):
                names = {}
                for line in sources.read_lines(path, remedy="fix or remove it"):
                    key, _, text = line.partition("\t")
                    text = text.split(",")[0] if name_file == "words.txt" else text
                    if key.strip() and text.strip():
                        names[key.strip()] = text.strip()
                return [names.get(c, c) for c in self.class_ids]
        return list(self.class_ids)

    def _has_test(self):
        test = sources.join(self.location, "test")
        return self.split_layout and tf.io.gfile.isdir(test) and bool(_walk(test)[0])

    def _class_images(self, root, class_id):
        images, others = _walk(sources.join(root, class_id))
        self._ignored += others
        if not images:
            raise UserError(f"The class folder '{sources.join(root, class_id)}' holds no image "
                            f"({', '.join(IMAGE_SUFFIXES)}, any case): add images or remove the folder.")
        return images

    def _check_val_classes(self):
        val_root = sources.join(self.location, "val")
        val_classes = [e for e in sources.listdir(val_root, hidden=False)
                       if tf.io.gfile.isdir(sources.join(val_root, e))]
        unknown = sorted(set(val_classes) - set(self.class_ids))
        if unknown:
            raise UserError(f"'{val_root}' has class folders that train/ does not ({', '.join(unknown[:5])}): a "
                            "class with no training image cannot be learned. Add train/<class>/ folders or remove "
                            "those.")

    # --- Splits ----------------------------------------------------------------------------------------------------

    def _held_out(self):
        """Ids of the validation images of the single-folder layout: `val_fraction` of each class, seeded."""
        if self._val_ids is None:
            held = []
            for class_id, paths in self._by_class.items():
                count = round(len(paths) * self.val_fraction)
                count = min(max(count, 1 if len(paths) > 1 and self.val_fraction > 0 else 0), len(paths) - 1)
                chosen = random.Random(f"{self.split_seed}/{class_id}").sample(paths, count)
                held += [sources.relative(p, self.location) for p in chosen]
            self._val_ids = sorted(held)
        return set(self._val_ids)

    def _list(self, split):
        index = {c: i for i, c in enumerate(self.class_ids)}
        if split == "test":
            return _walk(sources.join(self.location, "test"))[0], None
        if self.split_layout:
            if split == "train":
                pairs = [(p, index[c]) for c, paths in self._by_class.items() for p in paths]
            else:
                val_root = sources.join(self.location, "val")
                pairs = [(p, index[c]) for c in self.class_ids if tf.io.gfile.isdir(sources.join(val_root, c))
                         for p in _walk(sources.join(val_root, c))[0]]
        else:
            held = self._held_out()
            pairs = [(p, index[c]) for c, paths in self._by_class.items() for p in paths
                     if (sources.relative(p, self.location) in held) == (split == "val")]
        pairs.sort()
        return [p for p, _ in pairs], [label for _, label in pairs]

    def describe(self):
        return {**super().describe(), "layout": "train/ and val/" if self.split_layout else "class folders",
                **({} if self.split_layout else {"val_fraction": self.val_fraction, "split_seed": self.split_seed})}

    def pin(self, model_dir):
        """The single-folder layout: validates on the images listed in model_dir/val_split.json (written first)."""
        if self.split_layout:
            return
        path = sources.join(model_dir, SPLIT_FILE)
        if tf.io.gfile.exists(path):
            try:
                with tf.io.gfile.GFile(path) as f:
                    saved = json.load(f)
                ids = saved["val"]
                if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                    raise TypeError("'val' is not a list of file names")
            except (ValueError, KeyError, TypeError, tf.errors.OpError) as err:
                raise UserError(f"Cannot read the validation split {path} ({err}): it is damaged. Move it aside "
                                "to draw the split anew (a resumed run then validates on other images).") from None
            self._val_ids, self._files = sorted(ids), {}
            return
        self._held_out()
        try:
            tf.io.gfile.makedirs(model_dir)
            with tf.io.gfile.GFile(path, "w") as f:
                f.write(json.dumps({"val_fraction": self.val_fraction, "split_seed": self.split_seed,
                                    "val": self._val_ids}, indent=0) + "\n")
        except tf.errors.OpError as err:
            raise UserError(f"Cannot write the validation split {path}: {err.message}.") from None


@configurable("trainer.sources")
def image_folder(data_dir, val_fraction=0.1, split_seed=0):
    """A folder per class: DATA_DIR/train/<class>/ + DATA_DIR/val/<class>/, or DATA_DIR/<class>/ split by val_fraction.

    Args:
      data_dir: the dataset directory (local, gs:// or any tf.io.gfile file system).
      val_fraction: with only DATA_DIR/<class>/ folders: the share of each class held out for validation.
      split_seed: seeds that held-out draw.
    """
    if not (isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1):
        raise UserError(f"trainer.sources.image_folder.val_fraction must be a number in (0, 1), got "
                        f"{val_fraction!r}.")
    return ImageFolder(data_dir, val_fraction, split_seed)
