"""The tf.data input pipeline: list, shuffle, decode, resize, cache, augment, batch, prefetch.

Decoded images are cached as uint8 at the phase resolution (a quarter of the
memory of float32), shuffled with a seed, batched, and augmented per batch
(vectorised ops from `trainer.data.augment`). Batches are float32 in [0, 1]
with one-hot float32 labels.

Evaluation batches are padded up to whole batches with all-zero images and
all-zero label rows, so every batch has a static shape (TPUs need it) and
padded rows carry no weight: the trainer treats a zero label row as absent.
"""

import functools
import os

import gin
import tensorflow as tf

from trainer.data import augment as augment_lib
from trainer.data import synthetic
from trainer.data.tiny_imagenet import TinyImageNet

AUTOTUNE = tf.data.AUTOTUNE


@gin.configurable
def open_dataset(data_dir=gin.REQUIRED, synthetic_if_missing=False, synthetic_options=None):
    """Opens a dataset in the Tiny ImageNet layout.

    Args:
      data_dir: the `tiny-imagenet-200`-style directory (local or gs://).
      synthetic_if_missing: write the synthetic dataset to `data_dir` when it
        does not exist yet (the quickstart's cache directory).
      synthetic_options: keyword arguments for `synthetic.write_synthetic`.

    Returns:
      A `TinyImageNet` reader.

    Raises:
      DatasetNotFoundError: the directory does not hold the layout, with the
        download command in the message.
    """
    return _open(os.path.expanduser(data_dir), synthetic_if_missing,
                 tuple(sorted((synthetic_options or {}).items())))


@functools.lru_cache(maxsize=8)
def _open(data_dir, synthetic_if_missing, synthetic_items):
    if synthetic_if_missing and not tf.io.gfile.exists(data_dir):
        synthetic.ensure_synthetic(data_dir, **dict(synthetic_items))
    return TinyImageNet(data_dir)


def decode(path, image_size):
    """Reads one JPEG (greyscale ones too) as uint8 [image_size, image_size, 3]."""
    image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)

    def resize():
        resized = tf.image.resize(image, [image_size, image_size], antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

    native = tf.reduce_all(tf.equal(tf.shape(image)[:2], image_size))  # Tiny ImageNet at 64 px.
    return tf.ensure_shape(tf.cond(native, lambda: image, resize), [image_size, image_size, 3])


@gin.configurable(denylist=["split", "training", "input_context", "decoded_counter", "resume_step"])
def make_dataset(split,
                 training,
                 image_size=gin.REQUIRED,
                 batch_size=gin.REQUIRED,
                 augment=None,
                 seed=0,
                 shuffle_buffer=20_000,
                 cache="memory",
                 num_parallel_calls=AUTOTUNE,
                 prefetch=AUTOTUNE,
                 deterministic=False,
                 input_context=None,
                 decoded_counter=None,
                 resume_step=0):
    """Builds the input pipeline of one split.

    Args:
      split: 'train', 'val' or 'test'.
      training: if True: shuffle, repeat forever, augment, drop the last
        partial batch. If False: one pass in file order, padded to whole batches.
      image_size: resolution the images are resized to (32 or 64 for the
        reference recipe; 64 is the native size).
      batch_size: the global batch size (split over replicas with `input_context`).
      augment: a policy spec string for `augment.build_policy` (training only).
      seed: seeds the shuffle and the augmentation (mixed with the input
        pipeline's id and `resume_step`, so workers and resumed runs draw
        their own streams).
      shuffle_buffer: shuffle buffer in images (after the cache).
      cache: 'memory', a file path prefix (cache to disk; the split, size and
        input pipeline are appended to it), or None / '' for none.
      num_parallel_calls: parallelism of decode and augmentation.
      prefetch: batches to prefetch.
      deterministic: keep element order under parallel maps (slower).
      input_context: a `tf.distribute.InputContext` to shard over input pipelines.
      decoded_counter: an int64 tf.Variable incremented per decoded image;
        the caller compares it with the number of files to count corrupt
        (skipped) images.
      resume_step: the training step a resumed run starts from.

    Returns:
      A `tf.data.Dataset` of (images float32 [B, S, S, 3] in [0, 1],
      labels float32 one-hot [B, num_classes]).
    """
    dataset = open_dataset()
    files, labels = dataset.files(split)
    if labels is None:
        labels = [-1] * len(files)  # Unlabelled (test): all-zero label rows.
    num_classes = dataset.num_classes
    pipeline_id, num_pipelines = 0, 1
    if input_context is not None:
        batch_size = input_context.get_per_replica_batch_size(batch_size)
        pipeline_id, num_pipelines = input_context.input_pipeline_id, input_context.num_input_pipelines
    seed = (seed * 1_000_003 + resume_step * 1_009 + pipeline_id) % 2**31

    ds = tf.data.Dataset.from_tensor_slices((files, tf.constant(labels, tf.int32)))
    if num_pipelines > 1:
        ds = ds.shard(num_pipelines, pipeline_id)
    ds = ds.map(lambda f, y: (decode(f, image_size), y), num_parallel_calls=num_parallel_calls,
                deterministic=deterministic or not training)
    ds = ds.ignore_errors(log_warning=True)  # A corrupt JPEG is skipped, never ends the epoch.
    if decoded_counter is not None:
        ds = ds.map(functools.partial(_count, decoded_counter))
    if cache:
        ds = ds.cache("" if cache == "memory" else f"{cache}-{split}-{image_size}px-{pipeline_id}of{num_pipelines}")

    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
        ds = ds.batch(batch_size, drop_remainder=True, num_parallel_calls=num_parallel_calls)
        policy = augment_lib.build_policy(augment)
        seeds = tf.data.Dataset.random(seed=seed).batch(2, drop_remainder=True)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda batch, s: _finish(batch, num_classes, policy, s),
            num_parallel_calls=num_parallel_calls, deterministic=deterministic)
    else:
        ds = ds.batch(batch_size).map(lambda *batch: _finish(_pad(batch, batch_size), num_classes, None, None),
                                      num_parallel_calls=num_parallel_calls)
    options = tf.data.Options()
    options.deterministic = deterministic or not training
    options.experimental_optimization.map_parallelization = True
    return ds.with_options(options).prefetch(prefetch)


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


def _finish(batch, num_classes, policy, seed):
    """uint8 images, int labels -> float32 [0, 1] images, one-hot labels, then augmentation."""
    images, labels = batch
    images = tf.cast(images, tf.float32) / 255.0
    labels = tf.one_hot(labels, num_classes, dtype=tf.float32)  # -1 -> all-zero row.
    if policy is not None:
        images, labels = policy(images, labels, tf.cast(seed, tf.int32))
    return images, labels
