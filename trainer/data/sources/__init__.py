"""Data sources: where a dataset's examples come from, behind one small interface.

A source tells the rest of the framework what it needs of a dataset and
nothing of its layout. The trainer, the data scan, evaluation, predict,
export and compare only ever see a `Source`:

  kind, location           'tiny_imagenet' and its DATA_DIR, for messages and the run's settings
  class_ids, class_names   label i is class_ids[i]; a readable name for each class
  splits                   the splits it holds ('train', 'val'; 'test' is unlabelled)
  count(split)             images in a split, known without decoding any
  examples(split, ...)     a tf.data.Dataset of (encoded image bytes, label int32, example id string);
                           the label of an unlabelled image is -1
  share_count(split, n, i) images input pipeline i of n reads (by default every n-th example: a source
                           whose `examples` shares otherwise, as TFRecord's whole shards, says so)
  listing(split)           (ids, labels) of every example of a split, in `examples` order
  fingerprint()            identifies the content cheaply (the scan's cache key)
  describe()               JSON: what the run's settings record of the source
  pin(model_dir)           fixes what a resumed run must see again (image_folder's own validation split)
  strict                   False: an unusable example (unreadable, undecodable) is skipped and counted;
                           True: it stops the run (a TFRecord source with on_corrupt='stop')

Decoding is never a source's job: every source hands over encoded bytes and
`trainer.data.preprocess` decodes them, one way for every source.

A source is a gin configurable under `trainer.sources`, chosen by one
binding (`trainer.data.source = @trainer.sources.image_folder`, in
`gin/data/<kind>.gin`) and called with DATA_DIR. A new layout is one module
(here, or in a package of your own), one gin file and its tests: a module
outside this package is named by an `import` line at the top of its gin file
(`import my_sources` before `trainer.data.source = @trainer.sources.my_kind`),
and the run's settings record it, so evaluate, export and predict find it
again (docs/datasets.md, "A layout of your own").
"""

import os

import tensorflow as tf
from absl import logging

from trainer.errors import UserError

AUTOTUNE = tf.data.AUTOTUNE
LABELLED_SPLITS = ("train", "val")

# Written at the top of a dataset directory while it is being written (by the downloader's extraction, the
# synthetic writer or the converter) and removed when it is complete: such a directory is never read as a dataset.
INCOMPLETE_MARKER = ".incomplete"


class DatasetNotFoundError(UserError):
    """The dataset directory is missing, incomplete or not in the layout its source reads."""


def read_order(shuffle_seed):
    """The `deterministic` argument of a source's parallel reads.

    Without a seed (evaluation, the data check, the in-memory load): True, in order. With one (training): None,
    so the dataset's `tf.data.Options.deterministic` decides, which the training pipeline sets from
    `trainer.data.deterministic` (out of order by default, for speed; in order when asked, so that a streamed
    run draws the same images in the same order again).
    """
    return True if shuffle_seed is None else None


class Source:
    """The interface (see the module docstring). Subclasses set the attributes and implement `examples`."""

    kind = None
    location = None
    class_ids = ()
    class_names = ()
    splits = ()
    strict = False

    @property
    def num_classes(self):
        return len(self.class_ids)

    def count(self, split):
        """Images in `split` (no decoding)."""
        raise NotImplementedError

    def share_count(self, split, num_pipelines, pipeline_id):
        """Images of `split` that input pipeline `pipeline_id` of `num_pipelines` reads from `examples`: every
        num_pipelines-th example by default (`Dataset.shard`); a source that shares otherwise says so here."""
        return len(range(pipeline_id, self.count(split), num_pipelines))

    def examples(self, split, shuffle_seed=None, input_context=None):
        """(encoded bytes, label int32, example id) of a split.

        Args:
          split: one of `splits`.
          shuffle_seed: None: a fixed order. An integer: the order of files (or
            shards) is drawn anew at each iteration of the dataset, e.g. each epoch of a `.repeat()`; parallel
            reads may then finish out of order if the dataset's options allow it (see `read_order`).
          input_context: a `tf.distribute.InputContext`: this input pipeline's share (disjoint shares).
        """
        raise NotImplementedError

    def known_images(self, split):
        """A `trainer.data.preprocess.KnownImages` true of every image of `split`, or None (nothing known)."""
        return None

    def listing(self, split):
        """(ids, labels) of every example of `split`, in the order of `examples(split)` (a pass over the data)."""
        ids, labels = [], []
        for label, id_ in self.examples(split).map(lambda image, label, id_: (label, id_)).as_numpy_iterator():
            ids.append(id_.decode("utf-8", "surrogateescape"))
            labels.append(int(label))
        return ids, labels

    def fingerprint(self):
        """A string that changes whenever the dataset's content does (the scan's cache key)."""
        raise NotImplementedError

    def describe(self):
        """What the run's settings record of the source (JSON): its kind, location and the module defining it
        (imported by `open_source` if it is not yet: a source of your own)."""
        return {"kind": self.kind, "location": self.location, "module": type(self).__module__}

    def pin(self, model_dir):
        """Fixes, in the model directory, whatever a resumed run of it must see again (nothing by default)."""

    def check_split(self, split):
        if split not in self.splits:
            raise UserError(f"The {self.kind} dataset at {self.location} has no split {split!r}: expected one of "
                            f"{', '.join(repr(s) for s in self.splits)}.")


class FileSource(Source):
    """A source whose examples are image files listed up front: `files(split)` is all a subclass gives."""

    def __init__(self):
        self._files = {}

    def files(self, split):
        """(paths, labels) of a split in a fixed order; labels are None for an unlabelled split (listed once)."""
        self.check_split(split)
        if split not in self._files:
            self._files[split] = self._list(split)
        return self._files[split]

    def _list(self, split):
        raise NotImplementedError

    def count(self, split):
        return len(self.files(split)[0])

    def listing(self, split):
        paths, labels = self.files(split)
        return [relative(p, self.location) for p in paths], [-1] * len(paths) if labels is None else list(labels)

    def examples(self, split, shuffle_seed=None, input_context=None):
        paths, labels = self.files(split)
        labels = [-1] * len(paths) if labels is None else labels
        ds = tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string), tf.constant(labels, tf.int32),
                                                 tf.constant(self.listing(split)[0], tf.string)))
        if input_context is not None and input_context.num_input_pipelines > 1:
            ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        if shuffle_seed is not None:  # The file order is the epoch's order: a full permutation, new each epoch.
            ds = ds.shuffle(max(len(paths), 1), seed=shuffle_seed, reshuffle_each_iteration=True)
        return ds.map(lambda path, label, id_: (tf.io.read_file(path), label, id_), num_parallel_calls=AUTOTUNE,
                      deterministic=read_order(shuffle_seed))

    def fingerprint(self):
        import hashlib  # pylint: disable=import-outside-toplevel

        digest = hashlib.sha1(f"{self.kind}\n{self.location}\n".encode())
        folders = set()
        for split in self.splits:
            paths = self.files(split)[0]
            digest.update(f"{split}:{len(paths)}\n".encode())
            for path in paths:
                digest.update(path.encode("utf-8", "surrogateescape") + b"\n")
                folders.add(os.path.dirname(path))
        if not is_remote(self.location):
            for folder in sorted(folders | {self.location}):
                try:
                    digest.update(f"{folder}:{os.stat(folder).st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
                except OSError:
                    pass
        return digest.hexdigest()


def open_source(description):
    """Opens the source a `describe()` dict describes (its kind, location and the options its factory takes).

    Raises:
      UserError: an unknown kind; the source's own errors (e.g. DatasetNotFoundError).
    """
    import importlib  # pylint: disable=import-outside-toplevel
    import inspect  # pylint: disable=import-outside-toplevel

    from trainer import registry  # pylint: disable=import-outside-toplevel

    selector = f"trainer.sources.{description.get('kind')}"
    module = description.get("module")
    if selector not in registry.CONFIGURABLES and module:  # A source of your own.
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise UserError(f"The data source {description.get('kind')!r} is defined in {module}, which "
                            f"{import_failure(module, err)}") from None
        if selector not in registry.CONFIGURABLES:
            raise UserError(f"The data source {description.get('kind')!r} is defined in {module}, which was imported "
                            f"but registers no {selector}.")
    factory = registry.CONFIGURABLES.get(selector)
    if factory is None:
        known = sorted(s.rsplit(".", 1)[1] for s in registry.CONFIGURABLES if s.startswith("trainer.sources."))
        raise UserError(f"Unknown data source {description.get('kind')!r}: expected one of {', '.join(known)}.")
    params = inspect.signature(factory).parameters
    options = {k: v for k, v in description.items() if k in params and k != "data_dir"}
    return factory(description["location"], **options)


def import_failure(module, err):
    """The end of a sentence saying why `module` could not be imported (`err`), and what to do."""
    missing = getattr(err, "name", None)
    if missing and missing != module and not module.startswith(missing + "."):
        return f"imports {missing}, which is not installed ({err}): install it."
    return f"cannot be imported ({err}): put the directory holding it on PYTHONPATH, or install its package."


def check_reopenable(source):
    """A run records its source's kind and module (`describe`); evaluate and predict reopen it by them, through
    the gin factory `trainer.sources.<kind>` in the module of the source's class.

    Raises:
      UserError: no such factory, or one defined elsewhere.
    """
    from trainer import registry  # pylint: disable=import-outside-toplevel

    selector, module = f"trainer.sources.{source.kind}", type(source).__module__
    factory = registry.CONFIGURABLES.get(selector)
    if factory is None or factory.__module__ != module:
        where = "none is registered" if factory is None else f"that one is defined in {factory.__module__}"
        raise UserError(f"The data source {type(source).__name__} has kind {source.kind!r}, but {where}: a run "
                        f"reopens its source by kind, so name its gin factory {selector} and define it in {module}, "
                        "next to the class (docs/datasets.md, 'A layout of your own').")


# --- Helpers every source uses: paths through tf.io.gfile, so gs:// (and ram://) work as local paths. ---------


def is_remote(path):
    return "://" in path


def local(path):
    """`~` expanded for a local path; a URL as it is."""
    return path if is_remote(path) else os.path.expanduser(path)


def join(*parts):
    return os.path.join(*parts)


def relative(path, root):
    return path.removeprefix(root.rstrip("/") + "/")


def listdir(path, hidden=True):
    """Entry names of a directory, without the trailing '/' some file systems (GCS) add.

    `hidden=False` leaves out hidden entries (a name starting with '.': `.DS_Store`, the `._photo.jpg` metadata
    twins macOS leaves on shared drives, `.ipynb_checkpoints/`), which are never part of a dataset's layout.
    A local name that is not UTF-8 (TensorFlow cannot open it, and tf.io.gfile.listdir fails on the whole
    directory) is left out, with a warning naming it by its escaped bytes.
    """
    if not hidden:
        return [name for name in listdir(path) if not name.startswith(".")]
    if is_remote(path):
        return [name.rstrip("/") for name in tf.io.gfile.listdir(path)]
    names, bad = [], []
    for name in os.listdir(path):
        try:
            name.encode("utf-8")
            names.append(name)
        except UnicodeEncodeError:  # os.listdir kept the undecodable bytes as surrogates.
            bad.append(os.fsencode(name))
    if bad:
        logging.warning("Skipped %d names in %s that are not UTF-8 (rename them to use them): %s", len(bad), path,
                        ", ".join(repr(b)[2:-1] for b in sorted(bad)[:5]) + (" ..." if len(bad) > 5 else ""))
    return names


def walk(folder):
    """(directory, subdirectory names, file names) of `folder` and everything under it, as os.walk yields them.

    Built on `listdir` (non-UTF-8 names and hidden files and folders left out); a local directory reached twice
    through symbolic links is read once.
    """
    seen = set()
    pending = [folder]
    while pending:
        current = pending.pop(0)
        if not is_remote(current):
            real = os.path.realpath(current)
            if real in seen:
                continue
            seen.add(real)
        names = sorted(listdir(current, hidden=False))
        dirs = [n for n in names if tf.io.gfile.isdir(join(current, n))]
        yield current, dirs, [n for n in names if n not in dirs]
        pending += [join(current, d) for d in dirs]


def read_lines(path, remedy="download the dataset again"):
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
                        f"damaged or not the dataset's; {remedy}.") from None
    except tf.errors.OpError as err:
        raise UserError(f"Cannot read {path}: {err.message}.") from None
    if "\0" in text:
        raise UserError(f"{path}, line {text[:text.index(chr(0))].count(chr(10)) + 1}: a NUL byte: the file is "
                        f"damaged or not a text file; {remedy}.")
    return text.split("\n") if "\r" not in text else text.splitlines()


LAYOUTS = ("tiny_imagenet", "tfrecord", "image_folder")  # What `looks_like` recognises.


def looks_like(data_dir):
    """The kind of layout `data_dir` holds (one of LAYOUTS), or None."""
    data_dir = local(data_dir)
    if not tf.io.gfile.isdir(data_dir):
        return None
    if tf.io.gfile.exists(join(data_dir, "wnids.txt")) and tf.io.gfile.isdir(join(data_dir, "train")):
        return "tiny_imagenet"
    if tf.io.gfile.exists(join(data_dir, "index.json")) and tf.io.gfile.glob(join(data_dir, "*.tfrecord")):
        return "tfrecord"
    entries = listdir(data_dir, hidden=False)
    if entries and any(tf.io.gfile.isdir(join(data_dir, e)) for e in entries):
        return "image_folder"
    return None


def wrong_layout_hint(data_dir, expected):
    """' It holds the <kind> layout instead: include gin/data/<kind>.gin ...' for another layout, else ''."""
    kind = looks_like(data_dir)
    if kind and kind != expected:
        return (f" It holds the {kind} layout instead: include gin/data/{kind}.gin after the runnable gin "
                f"file (--gin_file=gin/data/{kind}.gin).")
    return ""
