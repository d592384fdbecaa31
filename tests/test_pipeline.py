"""The tf.data pipeline: shapes, dtypes and ranges at 32 and 64 px, padding, seeds, corrupt files."""

import os
import shutil

import gin
import numpy as np
import pytest
import tensorflow as tf

from trainer.data import pipeline


@pytest.fixture
def bind(synthetic_dir):
    """Binds the dataset and returns a function to bind more."""

    def _bind(**params):
        gin.bind_parameter("open_dataset.data_dir", params.pop("data_dir", synthetic_dir))
        for key, value in params.items():
            gin.bind_parameter(f"make_dataset.{key}", value)

    return _bind


@pytest.mark.parametrize("image_size", [32, 64])
def test_training_batches_shapes_dtypes_ranges(bind, image_size):
    bind(image_size=image_size, batch_size=16, augment="flip(0.5) | zoom(0.5, 1.5)")
    images, labels = next(iter(pipeline.make_dataset("train", training=True)))
    assert images.shape == (16, image_size, image_size, 3) and images.dtype == tf.float32
    assert labels.shape == (16, 5) and labels.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 1.0
    assert float(tf.reduce_max(images)) > 0.5  # Real pixels, not a blank batch.
    np.testing.assert_array_equal(tf.reduce_sum(labels, axis=-1), np.ones(16))


def test_training_repeats_and_drops_partial_batches(bind):
    bind(image_size=32, batch_size=64)  # 200 images: 3 full batches an epoch.
    sizes = [int(x.shape[0]) for x, _ in pipeline.make_dataset("train", training=True).take(7)]
    assert sizes == [64] * 7


def test_eval_is_one_ordered_pass_padded_to_whole_batches(bind, synthetic_dir):
    bind(image_size=64, batch_size=16)  # 50 val images: 3 full batches and 2 real rows in a 4th.
    batches = list(pipeline.make_dataset("val", training=False))
    assert [int(x.shape[0]) for x, _ in batches] == [16] * 4
    labels = np.concatenate([y.numpy() for _, y in batches])
    real = labels.sum(axis=-1)
    assert real[:50].tolist() == [1.0] * 50 and real[50:].tolist() == [0.0] * 14
    _, expected = pipeline.open_dataset().files("val")
    assert labels[:50].argmax(axis=-1).tolist() == expected
    assert float(tf.reduce_max(batches[-1][0][2:])) == 0.0  # Padding images are blank.


def test_test_split_has_no_labels(bind):
    bind(image_size=32, batch_size=8)
    labels = np.concatenate([y.numpy() for _, y in pipeline.make_dataset("test", training=False)])
    assert labels.shape == (16, 5) and labels.sum() == 0.0


def test_seed_makes_training_order_and_augmentation_repeatable(bind):
    bind(image_size=32, batch_size=8, augment="flip(0.5) | zoom(0.5, 1.5)", seed=3, deterministic=True)
    first = [x.numpy() for x, _ in pipeline.make_dataset("train", training=True).take(3)]
    again = [x.numpy() for x, _ in pipeline.make_dataset("train", training=True).take(3)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    gin.bind_parameter("make_dataset.seed", 4)
    other = next(iter(pipeline.make_dataset("train", training=True))).__getitem__(0).numpy()
    assert not np.array_equal(first[0], other)


def test_cache_to_file_is_per_split_and_size(bind, tmp_path):
    bind(image_size=32, batch_size=10, cache=str(tmp_path / "cache"))
    train_rows = sum(int(y.numpy().sum()) for _, y in pipeline.make_dataset("train", training=False))
    val_rows = sum(int(y.numpy().sum()) for _, y in pipeline.make_dataset("val", training=False))
    assert (train_rows, val_rows) == (200, 50)  # The val pipeline did not read the train cache.
    again = sum(int(y.numpy().sum()) for _, y in pipeline.make_dataset("val", training=False))
    assert again == 50
    assert {p.name.split(".")[0] for p in tmp_path.iterdir()} == {"cache-train-32px-0of1", "cache-val-32px-0of1"}


def test_corrupt_images_are_skipped_and_counted(bind, synthetic_dir, tmp_path):
    data = tmp_path / "tiny-imagenet-200"
    shutil.copytree(synthetic_dir, data)
    for name in sorted(os.listdir(data / "val" / "images"))[:3]:
        (data / "val" / "images" / name).write_bytes(b"not a jpeg")
    bind(data_dir=str(data), image_size=32, batch_size=10)
    counter = tf.Variable(0, dtype=tf.int64)
    labels = np.concatenate([y.numpy() for _, y in
                             pipeline.make_dataset("val", training=False, decoded_counter=counter)])
    assert labels.sum() == 47 and int(counter.numpy()) == 47


def test_greyscale_jpegs_decode_to_three_channels(synthetic_dir):
    from PIL import Image

    folder = os.path.join(synthetic_dir, "val", "images")
    grey = [f for f in sorted(os.listdir(folder)) if Image.open(os.path.join(folder, f)).mode == "L"]
    assert grey, "the synthetic writer should write some greyscale JPEGs"
    image = pipeline.decode(os.path.join(folder, grey[0]), 32)
    assert image.shape == (32, 32, 3) and image.dtype == tf.uint8
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
