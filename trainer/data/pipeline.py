"""The input pipeline: one `Data` object carries everything the trainer needs from the data.

`trainer.data` (a gin configurable, bound once in gin/common.gin) opens the
dataset through its source (`trainer.data.sources`: Tiny ImageNet's layout
by default, class folders or TFRecord shards by including gin/data/<kind>.gin)
and holds the settings: the preprocessing (`trainer.data.preprocess`:
resolution, resize, crop, standardisation), batch size, augmentation policy,
seeds. The trainer asks it for the training and evaluation
`tf.data.Dataset`s and for counts (classes, images, steps).

Training data comes one of two ways, chosen by `memory_mode`:

  in memory   every image is decoded once (in parallel, straight into one
              array of uint8 at the phase resolution; corrupt ones skipped and
              counted); each epoch is a full permutation of them (as the
              reference's `flow_from_dataframe` drew). Chosen when the decoded
              training set fits `memory_budget`.
  streaming   each epoch reads and decodes every image again: the order of
              files (or TFRecord shards) is drawn anew each epoch, then a
              shuffle buffer of `shuffle_buffer` decoded images (at most the
              images the input pipeline reads an epoch) mixes them.
              For datasets larger than memory.

Batches are then augmented by vectorised ops (`trainer.data.augment`) and
standardised; labels are one-hot.

Evaluation batches are padded up to whole batches with all-zero images and
all-zero label rows, so every batch has a static shape (TPUs need it) and
padded rows carry no weight: the trainer treats a zero label row as absent.
"""

import dataclasses
import functools

import numpy as np
import tensorflow as tf
from absl import logging

from trainer.data import augment as augment_lib
from trainer.data import sources as sources_lib
from trainer.data import synthetic
from trainer.data import preprocess as preprocess_lib
from trainer.data.preprocess import RESIZE_METHODS, Preprocessing  # noqa: F401 (RESIZE_METHODS: re-exported)
from trainer.data.sources import image_folder, tfrecord, tiny_imagenet  # noqa: F401 (registers their gin names)
from trainer.errors import UserError
from trainer.registry import configurable

AUTOTUNE = tf.data.AUTOTUNE
# Peak resident memory of decoding a training set into memory, as a multiple of its decoded size (uint8): the
# array, the decode's chunks in flight and what glibc's allocator keeps of them. Measured with
# benchmarks/decode_memory.py (BUILD_NOTES.md): 2.2x at 64 px (10,000 images: the fixed part weighs), 1.4x at
# 256 px, 3.9x at 512 px (1,000 images: freed buffers stay in per-thread arenas; 1.25x with MALLOC_ARENA_MAX=2).
DECODE_PEAK_FACTOR = 4.0
# The default memory budget: the decoded set's peak may take half the memory available when the run starts.
DEFAULT_BUDGET_FRACTION = 0.5 / DECODE_PEAK_FACTOR
LOAD_CHUNK_BYTES = 32 << 20  # Decoded images handed over at a time while loading into memory (a few in flight).
DECODE_BATCH = 128  # Images decoded by one call when none can fail alone (`_decoded`).


@dataclasses.dataclass
class Data:
    """A dataset (its `source`) and how to feed it (see `data`)."""

    source: sources_lib.Source
    preprocess: Preprocessing
    batch_size: int
    augment: str | None = None
    seed: int = 0
    in_memory: bool | None = None
    memory_budget: int | None = None
    shuffle_buffer: int = 10_000
    num_parallel_calls: int = AUTOTUNE
    prefetch: int = AUTOTUNE
    deterministic: bool = False
    synthetic: bool = False
    _loaded: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)
    _mode: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def image_size(self):
        return self.preprocess.image_size

    @property
    def num_classes(self):
        return self.source.num_classes

    @property
    def num_train(self):
        return self.source.count("train")

    @property
    def num_val(self):
        return self.source.count("val")

    @property
    def steps_per_epoch(self):
        return self.num_train // self.batch_size

    def pipeline_images(self, num_pipelines=1, pipeline_id=None):
        """Training images input pipeline `pipeline_id` reads (None: the most any of `num_pipelines` reads)."""
        ids = range(num_pipelines) if pipeline_id is None else [pipeline_id]
        return max(self.source.share_count("train", num_pipelines, i) for i in ids)

    def decoded_bytes(self, num_pipelines=1):
        """Bytes of the decoded training images one input pipeline holds in memory (uint8; the largest share)."""
        return self.pipeline_images(num_pipelines) * self.image_size ** 2 * 3

    def memory_mode(self, num_pipelines=1):
        """(in_memory, reason): whether the training set is decoded into memory, and why, in one line.

        Decided once (the first call): what is available changes once the data is in memory.
        """
        if num_pipelines not in self._mode:
            self._mode[num_pipelines] = self._decide_memory_mode(num_pipelines)
        return self._mode[num_pipelines]

    def _decide_memory_mode(self, num_pipelines):
        from trainer.models import plan  # pylint: disable=import-outside-toplevel

        size = plan.format_bytes(self.decoded_bytes(num_pipelines))
        if self.in_memory is not None:
            return self.in_memory, (f"{'in memory' if self.in_memory else 'streaming'}: forced by "
                                    f"trainer.data.in_memory = {self.in_memory} (decoded training set {size})")
        if self.memory_budget is not None:
            budget, where = self.memory_budget, "trainer.data.memory_budget"
        else:
            available, _ = plan.available_memory(host=True)
            if available is None:
                return True, f"in memory: decoded training set {size} (available memory unknown)"
            budget, where = int(available * DEFAULT_BUDGET_FRACTION), \
                f"{DEFAULT_BUDGET_FRACTION:.0%} of the {plan.format_bytes(available)} available"
        fits = self.decoded_bytes(num_pipelines) <= budget
        return fits, (f"{'in memory' if fits else 'streaming'}: decoded training set {size} "
                      f"{'<=' if fits else '>'} budget {plan.format_bytes(budget)} ({where})")

    def train(self, input_context=None, resume_step=0, decoded_counter=None):
        """The endless, shuffled, augmented training batches (see `make_dataset`)."""
        return make_dataset(self, "train", True, input_context, decoded_counter, resume_step)

    def eval(self, split="val", input_context=None):
        """One ordered pass over `split`, padded to whole batches (see `make_dataset`)."""
        return make_dataset(self, split, False, input_context)

    def pin(self, model_dir):
        """Fixes in `model_dir` what a resumed run must see again (the source's own validation split)."""
        self.source.pin(model_dir)

    def load_train(self, input_context=None):
        """The training images decoded into memory, once: (images uint8 [N, S, S, 3], labels int32 [N], ids [N]).

        Decoded in parallel straight into one aligned array that the tensor then
        shares (no copy); a corrupt image is skipped. Kept for the next call.
        """
        key = _share(input_context)
        if key not in self._loaded:
            self._loaded[key] = _load(self, input_context)
        return self._loaded[key]


def _share(input_context):
    """(num_pipelines, pipeline_id) of a `tf.distribute.InputContext`, or (1, 0) without one."""
    if input_context is None:
        return 1, 0
    return input_context.num_input_pipelines, input_context.input_pipeline_id


def _check_int(name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise UserError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}.")


@configurable("trainer")
def data(data_dir,
         image_size,
         batch_size,
         source=tiny_imagenet.tiny_imagenet,
         augment=None,
         seed=0,
         resize="bilinear",
         crop="stretch",
         max_pixels=preprocess_lib.MAX_PIXELS,
         mean=None,
         std=None,
         in_memory=None,
         memory_budget=None,
         shuffle_buffer=10_000,
         num_parallel_calls=AUTOTUNE,
         prefetch=AUTOTUNE,
         deterministic=False,
         synthetic_if_missing=False,
         synthetic_options=None):
    """Opens a dataset through its source and says how to feed it.

    Args:
      data_dir: the dataset directory (local, gs:// or any tf.io.gfile file system).
      image_size: the side images are resized to (64 is Tiny ImageNet's own).
      batch_size: the global batch size (split over replicas).
      source: a reference to a `trainer.sources.*` factory, called with `data_dir`:
        `@trainer.sources.tiny_imagenet` (the default), `.image_folder` or `.tfrecord`
        (gin/data/<kind>.gin binds it), or a source of your own (docs/datasets.md).
      augment: a policy string for `trainer.data.augment` (training only), or None.
      seed: seeds the data order and the augmentation (mixed with the input
        pipeline's id and the step a resumed run starts from).
      resize: 'bilinear' (with antialiasing), 'nearest' (the reference's 32 px
        phase: PIL's default), 'bicubic' or 'area'; images already at
        `image_size` are not resized.
      crop: 'stretch' (a non-square image is resized whole) or 'center' (its centred square).
      max_pixels: an image whose header declares more pixels is refused before it is decoded
        (skipped and counted in training; named by predict).
      mean: None (pixels / 255 in [0, 1]), or per-channel means to subtract after
        the augmentation, on the [0, 1] scale.
      std: per-channel standard deviations to divide by (with `mean`).
      in_memory: None: decode the training set into memory when it fits `memory_budget`,
        else stream it; True or False forces either.
      memory_budget: bytes the decoded training images may take; None: an eighth of the
        memory available when the run starts (their decode peaks at up to DECODE_PEAK_FACTOR times that).
      shuffle_buffer: streaming only: decoded images mixed by the shuffle buffer, at most the training
        images an input pipeline reads (the file or shard order is drawn anew every epoch before it).
      num_parallel_calls: parallelism of decode and augmentation.
      prefetch: batches to prefetch.
      deterministic: keep element order under parallel maps and reads (slower): with the same seed, a run
        draws the same images in the same order, streamed too.
      synthetic_if_missing: write the synthetic dataset to `data_dir` when it
        does not exist yet (the quickstart).
      synthetic_options: keyword arguments for `synthetic.write_synthetic`.

    Returns:
      A `Data`.

    Raises:
      UserError: a setting out of range; DatasetNotFoundError (a UserError):
        the directory does not hold the source's layout.
    """
    _check_int("BATCH_SIZE (trainer.data.batch_size)", batch_size, 1, 1 << 20)
    _check_int("trainer.data.shuffle_buffer", shuffle_buffer, 1, 1 << 40)
    if memory_budget is not None:
        _check_int("trainer.data.memory_budget (bytes)", memory_budget, 0, 1 << 60)
    if in_memory not in (None, True, False):
        raise UserError(f"trainer.data.in_memory must be None (decide by the memory budget), True or False, got "
                        f"{in_memory!r}.")
    if not callable(source):
        raise UserError(f"trainer.data.source must be a source, e.g. @trainer.sources.image_folder, got "
                        f"{source!r}.")
    preprocess = Preprocessing(image_size, resize, None if mean is None else tuple(mean),
                               None if std is None else tuple(std), crop, max_pixels)
    augment_lib.build_policy(augment)  # A bad policy fails here, before anything runs.
    data_dir = sources_lib.local(data_dir)
    if synthetic_if_missing and not tf.io.gfile.exists(data_dir):
        synthetic.ensure_synthetic(data_dir, **(synthetic_options or {}))
    source = source(data_dir)
    sources_lib.check_reopenable(source)
    return Data(source, preprocess, batch_size, augment, seed, in_memory, memory_budget, shuffle_buffer,
                num_parallel_calls, prefetch, deterministic, synthetic=synthetic.is_synthetic(source.class_ids))


def make_dataset(settings, split, training, input_context=None, decoded_counter=None, resume_step=0):
    """Builds the input pipeline of one split.

    Args:
      settings: a `Data`.
      split: a split of the source ('train', 'val', ...).
      training: if True: shuffle, repeat forever, augment, drop the last
        partial batch. If False: one pass in the source's order, padded to whole batches.
      input_context: a `tf.distribute.InputContext` to shard over input pipelines.
      decoded_counter: an int64 tf.Variable incremented per decoded image (the
        caller compares it with the number of images to count corrupt ones).
      resume_step: the training step a resumed run starts from (mixed into the seed).

    Returns:
      A `tf.data.Dataset` of (images float32 [B, S, S, 3], labels float32 one-hot
      [B, num_classes]).
    """
    s = settings
    s.source.check_split(split)
    num_pipelines, pipeline_id = _share(input_context)
    batch_size = s.batch_size if input_context is None else input_context.get_per_replica_batch_size(s.batch_size)
    seed = (s.seed * 1_000_003 + resume_step * 1_009 + pipeline_id) % 2**31

    if training and s.memory_mode(num_pipelines)[0]:
        images, labels, _ = s.load_train(input_context)
        if decoded_counter is not None:
            decoded_counter.assign_add(int(labels.shape[0]))
        ds = _permuted(images, labels, seed, batch_size)  # Batched already: one gather a batch.
    else:
        ds = _decoded(s, split, input_context, shuffle_seed=seed if training else None,
                      deterministic=s.deterministic or not training, repeat=training)
        if decoded_counter is not None:
            ds = ds.map(functools.partial(_count, decoded_counter))
        if training:  # After the repeat: the buffer fills once a run, not at every epoch's start.
            # At most the images this pipeline reads: a larger buffer would only fill with their next epochs.
            ds = ds.shuffle(min(s.shuffle_buffer, s.pipeline_images(num_pipelines, pipeline_id)), seed=seed)
            ds = ds.batch(batch_size, drop_remainder=True, num_parallel_calls=s.num_parallel_calls)
        else:
            ds = ds.cache()
    finish = functools.partial(_finish, num_classes=s.num_classes, preprocess=s.preprocess)
    if training:
        policy = augment_lib.build_policy(s.augment)
        seeds = tf.data.Dataset.random(seed=seed).batch(2, drop_remainder=True)
        ds = tf.data.Dataset.zip((ds, seeds)).map(lambda batch, k: finish(batch, policy=policy, seed=k),
                                                  num_parallel_calls=s.num_parallel_calls,
                                                  deterministic=s.deterministic)
    else:
        ds = ds.batch(batch_size).map(lambda *batch: finish(_pad(batch, batch_size)),
                                      num_parallel_calls=s.num_parallel_calls)
    options = tf.data.Options()
    options.deterministic = s.deterministic or not training
    options.experimental_optimization.map_parallelization = True
    return ds.with_options(options).prefetch(s.prefetch)


def _decoded(s, split, input_context=None, shuffle_seed=None, deterministic=True, with_ids=False, repeat=False):
    """(uint8 image [S, S, 3], label) of a split (and the example id `with_ids`); corrupt images skipped.

    With `repeat`, endless epochs, each in the order the source draws anew (with `shuffle_seed`). Images one
    at a time, so that a corrupt one is skipped alone; DECODE_BATCH at a time when the source vouches that
    every one decodes (`KnownImages.decoded`: TFRecord shards whose converter decoded them).
    """
    # What the source knows of every image (a TFRecord index: their sizes) leaves work out of the decode.
    known = s.source.known_images(split)
    ds = s.source.examples(split, shuffle_seed=shuffle_seed, input_context=input_context)
    if repeat:
        ds = ds.repeat()
    pick = (lambda *example: example) if with_ids else (lambda image, label, _: (image, label))
    if known is not None and known.decoded and known.max_pixels <= s.preprocess.max_pixels:
        # Every image decodes (the converter decoded each) and none is over the limit: nothing can fail alone,
        # so DECODE_BATCH at a time (a tf.data call an image costs about as much as a 64 px JPEG's decode).
        ds = ds.batch(DECODE_BATCH).map(lambda images, labels, ids: pick(
            s.preprocess.decode_batch(images, known), labels, ids), num_parallel_calls=s.num_parallel_calls,
            deterministic=deterministic).unbatch()
    else:
        ds = ds.map(lambda image, label, id_: pick(s.preprocess.decode(image, known), label, id_),
                    num_parallel_calls=s.num_parallel_calls, deterministic=deterministic)
    # A corrupt image is skipped, never ends the epoch (unless the source is strict: see `Source.strict`).
    return ds if s.source.strict else ds.ignore_errors(log_warning=True)


def _aligned_uint8(shape, align=64):
    """An uninitialised uint8 array whose buffer is `align`-byte aligned (TensorFlow can then share it)."""
    size = int(np.prod(shape))
    buffer = np.empty(size + align, np.uint8)
    offset = (-buffer.ctypes.data) % align
    return buffer[offset:offset + size].reshape(shape)


def _load(s, input_context):
    """Decodes this input pipeline's training images into one array (see `Data.load_train`)."""
    capacity = s.pipeline_images(*_share(input_context))
    size = s.image_size
    images = _aligned_uint8((capacity, size, size, 3))
    labels = np.empty(capacity, np.int32)
    ids, count = [], 0
    # In the source's order, so that the seeded permutations are the same whatever the decode threads did.
    chunk = max(1, LOAD_CHUNK_BYTES // (size * size * 3))
    for image_batch, label_batch, id_batch in _decoded(s, "train", input_context, deterministic=True,
                                                       with_ids=True).batch(chunk).prefetch(1):
        n = int(label_batch.shape[0])
        images[count:count + n] = image_batch.numpy()
        labels[count:count + n] = label_batch.numpy()
        ids += [i.decode("utf-8", "surrogateescape") for i in id_batch.numpy()]
        count += n
    if not count:
        raise UserError(f"No training image of {s.source.location} could be decoded: every file is corrupt or "
                        "unreadable.")
    images = images[:count]  # A view: no copy.
    from trainer.models import plan  # pylint: disable=import-outside-toplevel

    logging.info("Decoded %d training images into memory (%s).", count, plan.format_bytes(images.nbytes))
    return tf.experimental.dlpack.from_dlpack(images.__dlpack__()), tf.constant(labels[:count]), ids


def _permuted(images, labels, seed, batch_size):
    """Endless epochs over images held in memory, each a full permutation of them.

    The permutation shuffles indices (8 bytes an image); each batch is one
    gather of `batch_size` of them (a gather per image cost 2.5x the
    throughput of the whole pipeline). Batches run across epoch boundaries,
    as a repeated shuffle's do.

    Returns:
      A dataset of (uint8 images [B, S, S, 3], int labels [B]).
    """
    count = int(labels.shape[0])
    order = tf.data.Dataset.range(count).shuffle(count, seed=seed, reshuffle_each_iteration=True).repeat()
    return order.batch(batch_size, drop_remainder=True).map(lambda i: (tf.gather(images, i), tf.gather(labels, i)))


def _count(counter, image, label):
    counter.assign_add(1)
    return image, label


def _pad(batch, batch_size):
    """Pads a (last, partial) batch to `batch_size` rows of zero images labelled -1."""
    images, labels = batch
    missing = batch_size - tf.shape(labels)[0]
    images = tf.pad(images, [[0, missing], [0, 0], [0, 0], [0, 0]])
    labels = tf.pad(labels, [[0, missing]], constant_values=-1)
    return tf.ensure_shape(images, [batch_size] + images.shape[1:]), tf.ensure_shape(labels, [batch_size])


def _finish(batch, num_classes, preprocess, policy=None, seed=None):
    """uint8 images, int labels -> float32 images, one-hot labels; augmentation between scale and normalise."""
    images, labels = batch
    images = preprocess.scale(images)
    labels = tf.one_hot(labels, num_classes, dtype=tf.float32)  # -1 -> all-zero row.
    if policy is not None:
        images, labels = policy(images, labels, tf.cast(seed, tf.int32))
    return preprocess.normalise(images), labels
