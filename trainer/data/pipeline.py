"""The input pipeline: one `Data` object carries everything the trainer needs from the data.

`trainer.data` (a gin configurable, bound once in gin/common.gin) opens the
dataset and holds the settings: resolution, batch size, augmentation policy,
resize method, normalisation, seeds. The trainer asks it for the training
and evaluation `tf.data.Dataset`s and for counts (classes, images, steps).

Training data: every image is decoded once (corrupt files are skipped and
counted), resized to the phase resolution and kept as uint8 in memory; each
epoch is a full permutation of all images (as the reference's
`flow_from_dataframe` drew), batched, then augmented per batch by vectorised
ops (`trainer.data.augment`). The permutation shuffles indices (8 bytes an
image), so it costs no memory beyond the decoded images themselves. Batches
are float32 (pixels / 255, then optionally standardised) with one-hot labels.

Evaluation batches are padded up to whole batches with all-zero images and
all-zero label rows, so every batch has a static shape (TPUs need it) and
padded rows carry no weight: the trainer treats a zero label row as absent.
"""

import dataclasses
import functools
import os

import numpy as np
import tensorflow as tf
from absl import logging

from trainer.data import augment as augment_lib
from trainer.data import synthetic
from trainer.data.tiny_imagenet import TinyImageNet
from trainer.errors import UserError
from trainer.registry import configurable

AUTOTUNE = tf.data.AUTOTUNE
RESIZE_METHODS = ("bilinear", "nearest", "bicubic", "area")


@dataclasses.dataclass
class Data:
    """A dataset in the Tiny ImageNet layout and how to feed it (see `data`)."""

    reader: TinyImageNet
    image_size: int
    batch_size: int
    augment: str | None = None
    seed: int = 0
    resize: str = "bilinear"
    mean: tuple | None = None
    std: tuple | None = None
    shuffle_buffer: int | None = None
    cache: str | None = "memory"
    num_parallel_calls: int = AUTOTUNE
    prefetch: int = AUTOTUNE
    deterministic: bool = False
    synthetic: bool = False

    @property
    def num_classes(self):
        return self.reader.num_classes

    @property
    def num_train(self):
        return len(self.reader.files("train")[0])

    @property
    def num_val(self):
        return len(self.reader.files("val")[0])

    @property
    def steps_per_epoch(self):
        return self.num_train // self.batch_size

    def train(self, input_context=None, resume_step=0, decoded_counter=None):
        """The endless, shuffled, augmented training batches (see `make_dataset`)."""
        return make_dataset(self, "train", True, input_context, decoded_counter, resume_step)

    def eval(self, split="val", input_context=None):
        """One ordered pass over `split`, padded to whole batches (see `make_dataset`)."""
        return make_dataset(self, split, False, input_context)


def _check_int(name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise UserError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}.")


@configurable("trainer")
def data(data_dir,
         image_size,
         batch_size,
         augment=None,
         seed=0,
         resize="bilinear",
         mean=None,
         std=None,
         shuffle_buffer=None,
         cache="memory",
         num_parallel_calls=AUTOTUNE,
         prefetch=AUTOTUNE,
         deterministic=False,
         synthetic_if_missing=False,
         synthetic_options=None):
    """Opens a dataset in the Tiny ImageNet layout and says how to feed it.

    Args:
      data_dir: the `tiny-imagenet-200`-style directory (local or gs://).
      image_size: the side images are resized to (64 is Tiny ImageNet's own).
      batch_size: the global batch size (split over replicas).
      augment: a policy string for `trainer.data.augment` (training only), or None.
      seed: seeds the data order and the augmentation (mixed with the input
        pipeline's id and the step a resumed run starts from).
      resize: 'bilinear' (with antialiasing), 'nearest' (the reference's 32 px
        phase: PIL's default), 'bicubic' or 'area'; images already at
        `image_size` are not resized.
      mean: None (pixels / 255 in [0, 1]), or per-channel means to subtract after
        the augmentation, on the [0, 1] scale.
      std: per-channel standard deviations to divide by (with `mean`).
      shuffle_buffer: None: a full permutation of the training images every
        epoch, over images decoded once into memory. An integer: a shuffle
        buffer of that many images after `cache` (for datasets too big for memory).
      cache: with `shuffle_buffer`: 'memory', a file path prefix (the split, size
        and input pipeline are appended), or None. Evaluation data is cached in memory.
      num_parallel_calls: parallelism of decode and augmentation.
      prefetch: batches to prefetch.
      deterministic: keep element order under parallel maps (slower).
      synthetic_if_missing: write the synthetic dataset to `data_dir` when it
        does not exist yet (the quickstart).
      synthetic_options: keyword arguments for `synthetic.write_synthetic`.

    Returns:
      A `Data`.

    Raises:
      UserError: a setting out of range; DatasetNotFoundError (a UserError):
        the directory does not hold the layout.
    """
    _check_int("IMAGE_SIZE (trainer.data.image_size)", image_size, 8, 1024)
    _check_int("BATCH_SIZE (trainer.data.batch_size)", batch_size, 1, 1 << 20)
    if resize not in RESIZE_METHODS:
        raise UserError(f"trainer.data.resize must be one of {', '.join(RESIZE_METHODS)}, got {resize!r}.")
    if (mean is None) != (std is None) or (mean is not None and (len(mean) != 3 or len(std) != 3
                                                                 or min(std) <= 0)):
        raise UserError(f"trainer.data.mean and std must both be None or both 3 numbers (std > 0), got "
                        f"{mean!r} and {std!r}.")
    if shuffle_buffer is not None:
        _check_int("trainer.data.shuffle_buffer", shuffle_buffer, 1, 1 << 40)
    augment_lib.build_policy(augment)  # A bad policy fails here, before anything runs.
    data_dir = os.path.expanduser(data_dir)
    written = False
    if synthetic_if_missing and not tf.io.gfile.exists(data_dir):
        synthetic.ensure_synthetic(data_dir, **(synthetic_options or {}))
        written = True
    return Data(TinyImageNet(data_dir), image_size, batch_size, augment, seed, resize,
                None if mean is None else tuple(mean), None if std is None else tuple(std), shuffle_buffer,
                cache, num_parallel_calls, prefetch, deterministic, synthetic=written or synthetic_if_missing)


def decode(path, image_size, resize="bilinear"):
    """Reads one JPEG (greyscale ones too) as uint8 [image_size, image_size, 3]."""
    image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)

    def resized():
        out = tf.image.resize(image, [image_size, image_size], method=resize, antialias=resize != "nearest")
        return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)

    native = tf.reduce_all(tf.equal(tf.shape(image)[:2], image_size))  # Tiny ImageNet at 64 px.
    return tf.ensure_shape(tf.cond(native, lambda: image, resized), [image_size, image_size, 3])


def make_dataset(settings, split, training, input_context=None, decoded_counter=None, resume_step=0):
    """Builds the input pipeline of one split.

    Args:
      settings: a `Data`.
      split: 'train', 'val' or 'test'.
      training: if True: shuffle, repeat forever, augment, drop the last
        partial batch. If False: one pass in file order, padded to whole batches.
      input_context: a `tf.distribute.InputContext` to shard over input pipelines.
      decoded_counter: an int64 tf.Variable incremented per decoded image (the
        caller compares it with the number of files to count corrupt ones).
      resume_step: the training step a resumed run starts from (mixed into the seed).

    Returns:
      A `tf.data.Dataset` of (images float32 [B, S, S, 3], labels float32 one-hot
      [B, num_classes]).
    """
    s = settings
    files, labels = s.reader.files(split)
    if labels is None:
        labels = [-1] * len(files)  # Unlabelled (test): all-zero label rows.
    batch_size, pipeline_id, num_pipelines = s.batch_size, 0, 1
    if input_context is not None:
        batch_size = input_context.get_per_replica_batch_size(s.batch_size)
        pipeline_id, num_pipelines = input_context.input_pipeline_id, input_context.num_input_pipelines
    seed = (s.seed * 1_000_003 + resume_step * 1_009 + pipeline_id) % 2**31

    ds = tf.data.Dataset.from_tensor_slices((files, tf.constant(labels, tf.int32)))
    if num_pipelines > 1:
        ds = ds.shard(num_pipelines, pipeline_id)
    ds = ds.map(lambda f, y: (decode(f, s.image_size, s.resize), y), num_parallel_calls=s.num_parallel_calls,
                deterministic=s.deterministic or not training)
    ds = ds.ignore_errors(log_warning=True)  # A corrupt JPEG is skipped, never ends the epoch.
    if decoded_counter is not None:
        ds = ds.map(functools.partial(_count, decoded_counter))

    if training and s.shuffle_buffer is None:
        ds = _permuted(ds, seed, batch_size)  # Batched already: one gather a batch.
    elif training:
        if s.cache:
            ds = ds.cache("" if s.cache == "memory" else
                          f"{s.cache}-{split}-{s.image_size}px-{pipeline_id}of{num_pipelines}")
        ds = ds.shuffle(s.shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
        ds = ds.batch(batch_size, drop_remainder=True, num_parallel_calls=s.num_parallel_calls)
    else:
        ds = ds.cache()
    finish = functools.partial(_finish, num_classes=s.num_classes, mean=s.mean, std=s.std)
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


def _permuted(decoded, seed, batch_size):
    """Decodes every image once into memory; then endless epochs, each a full permutation of them.

    The permutation shuffles indices; each batch is one gather of `batch_size`
    of them (a gather per image cost 2.5x the throughput of the whole pipeline).
    Batches run across epoch boundaries, as a repeated shuffle's do.

    Returns:
      A dataset of (uint8 images [B, S, S, 3], int labels [B]).
    """
    images, labels = [], []
    for image_batch, label_batch in decoded.batch(1024).prefetch(2):
        images.append(image_batch.numpy())
        labels.append(label_batch.numpy())
    if not images:
        raise UserError("No training image could be decoded: every file is corrupt or unreadable.")
    images = tf.constant(np.concatenate(images))
    labels = tf.constant(np.concatenate(labels))
    count = int(labels.shape[0])
    logging.info("Decoded %d training images into memory (%.0f MB).", count, images.shape.num_elements() / 2**20)
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


def _finish(batch, num_classes, mean=None, std=None, policy=None, seed=None):
    """uint8 images, int labels -> float32 images, one-hot labels; augmentation; standardisation."""
    images, labels = batch
    images = tf.cast(images, tf.float32) / 255.0
    labels = tf.one_hot(labels, num_classes, dtype=tf.float32)  # -1 -> all-zero row.
    if policy is not None:
        images, labels = policy(images, labels, tf.cast(seed, tf.int32))
    if mean is not None:
        images = (images - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)
    return images, labels
