"""The tf.data pipeline: shapes, dtypes and ranges at 32 and 64 px, padding, seeds, corrupt files."""

import os
import shutil

import helpers
import numpy as np
import pytest
import tensorflow as tf

from trainer.data import pipeline


@pytest.fixture
def bind(synthetic_dir):
    """Returns `make(**settings)`: a `pipeline.Data` on the synthetic dataset (5 classes, 200 train, 50 val)."""

    def _make(**settings):
        return pipeline.data(settings.pop("data_dir", synthetic_dir), **settings)

    return _make


@pytest.mark.parametrize("image_size", [32, 64])
def test_training_batches_shapes_dtypes_ranges(bind, image_size):
    data = bind(image_size=image_size, batch_size=16, augment="flip(0.5) | zoom(0.5, 1.5)")
    images, labels = next(iter(data.train()))
    assert images.shape == (16, image_size, image_size, 3) and images.dtype == tf.float32
    assert labels.shape == (16, 5) and labels.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 1.0
    assert float(tf.reduce_max(images)) > 0.5  # Real pixels, not a blank batch.
    np.testing.assert_array_equal(tf.reduce_sum(labels, axis=-1), np.ones(16))


def test_training_repeats_and_drops_partial_batches(bind):
    data = bind(image_size=32, batch_size=64)  # 200 images: 3 full batches an epoch.
    sizes = [int(x.shape[0]) for x, _ in data.train().take(7)]
    assert sizes == [64] * 7


def test_eval_is_one_ordered_pass_padded_to_whole_batches(bind, synthetic_dir):
    data = bind(image_size=64, batch_size=16)  # 50 val images: 3 full batches and 2 real rows in a 4th.
    batches = list(data.eval("val"))
    assert [int(x.shape[0]) for x, _ in batches] == [16] * 4
    labels = np.concatenate([y.numpy() for _, y in batches])
    real = labels.sum(axis=-1)
    assert real[:50].tolist() == [1.0] * 50 and real[50:].tolist() == [0.0] * 14
    _, expected = data.source.files("val")
    assert labels[:50].argmax(axis=-1).tolist() == expected
    assert float(tf.reduce_max(batches[-1][0][2:])) == 0.0  # Padding images are blank.


def test_test_split_has_no_labels(bind):
    data = bind(image_size=32, batch_size=8)
    labels = np.concatenate([y.numpy() for _, y in data.eval("test")])
    assert labels.shape == (16, 5) and labels.sum() == 0.0


def test_seed_makes_training_order_and_augmentation_repeatable(bind):
    settings = dict(image_size=32, batch_size=8, augment="flip(0.5) | zoom(0.5, 1.5)", deterministic=True)
    first = [x.numpy() for x, _ in bind(seed=3, **settings).train().take(3)]
    again = [x.numpy() for x, _ in bind(seed=3, **settings).train().take(3)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    other = next(iter(bind(seed=4, **settings).train()))[0].numpy()
    assert not np.array_equal(first[0], other)


def test_streaming_reads_every_image_once_an_epoch(bind):
    # In order: a parallel decode finishing out of order (deterministic=False) can swap two images across an
    # epoch's boundary (seen once in CI: [80, 80, 79, 81, 80]).
    data = bind(image_size=16, batch_size=10, in_memory=False, shuffle_buffer=1, deterministic=True)
    assert data.memory_mode() == (False, "streaming: forced by trainer.data.in_memory = False (decoded training "
                                         "set 150.0 KB)")
    labels = np.concatenate([y.numpy() for _, y in data.train().take(40)])
    assert labels.shape == (400, 5) and np.bincount(labels.argmax(-1)).tolist() == [80] * 5  # Two whole epochs.
    assert not data._loaded  # Nothing held in memory.
    # A shuffle buffer mixes across the epochs' boundary (it fills once a run): about 80 a class still.
    data = bind(image_size=16, batch_size=10, in_memory=False, shuffle_buffer=50)
    counter = tf.Variable(0, dtype=tf.int64)
    labels = np.concatenate([y.numpy() for _, y in data.train(decoded_counter=counter).take(40)])
    assert all(abs(n - 80) <= 20 for n in np.bincount(labels.argmax(-1)))
    assert 400 <= int(counter.numpy()) <= 600  # Decoded: the batches, plus the buffer and what is read ahead.
    # A buffer larger than the training set (200 images) holds the training set: the first batch waits for one
    # epoch's decode, not for 50 epochs' (the default 10,000).
    data = bind(image_size=16, batch_size=10, in_memory=False)
    counter = tf.Variable(0, dtype=tf.int64)
    next(iter(data.train(decoded_counter=counter)))
    assert 200 <= int(counter.numpy()) <= 400


def test_corrupt_images_are_skipped_and_counted(bind, synthetic_dir, tmp_path):
    data = tmp_path / "tiny-imagenet-200"
    shutil.copytree(synthetic_dir, data)
    for name in sorted(os.listdir(data / "val" / "images"))[:3]:
        (data / "val" / "images" / name).write_bytes(b"not a jpeg")
    for name in sorted(os.listdir(data / "train" / os.listdir(data / "train")[0] / "images"))[:2]:
        wnid = name.split("_")[0]
        (data / "train" / wnid / "images" / name).write_bytes(b"not a jpeg")
    settings = bind(data_dir=str(data), image_size=32, batch_size=10)
    labels = np.concatenate([y.numpy() for _, y in settings.eval("val")])
    assert labels.sum() == 47
    counter = tf.Variable(0, dtype=tf.int64)
    labels = np.concatenate([y.numpy() for _, y in settings.train(decoded_counter=counter).take(19)])
    assert labels.sum() == 190 and int(counter.numpy()) == 198  # Decoded once, into memory.


def test_greyscale_jpegs_decode_to_three_channels(synthetic_dir):
    from PIL import Image

    folder = os.path.join(synthetic_dir, "val", "images")
    grey = [f for f in sorted(os.listdir(folder)) if Image.open(os.path.join(folder, f)).mode == "L"]
    assert grey, "the synthetic writer should write some greyscale JPEGs"
    image = helpers.decode_file(os.path.join(folder, grey[0]), 32)
    assert image.shape == (32, 32, 3) and image.dtype == tf.uint8
    np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_resize_method_and_standardisation(bind):
    nearest = bind(image_size=32, batch_size=50, resize="nearest")
    images = np.concatenate([x.numpy() for x, _ in nearest.eval("val")])
    full = np.concatenate([x.numpy() for x, _ in bind(image_size=64, batch_size=50).eval("val")])
    np.testing.assert_array_equal(images, full[:, 1::2, 1::2, :])  # Nearest, pixel centres: as PIL picks.
    bilinear = np.concatenate([x.numpy() for x, _ in bind(image_size=32, batch_size=50).eval("val")])
    assert not np.array_equal(images, bilinear)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    standard = np.concatenate([x.numpy() for x, _ in bind(image_size=32, batch_size=50, resize="nearest",
                                                          mean=mean, std=std).eval("val")])
    np.testing.assert_allclose(standard, (images - np.array(mean)) / np.array(std), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("settings, message", [
    (dict(image_size=7, batch_size=8), r"IMAGE_SIZE .* in \[8, 1024\], got 7"),
    (dict(image_size="32", batch_size=8), r"IMAGE_SIZE .*integer.*got '32'"),
    (dict(image_size=32, batch_size=0), r"BATCH_SIZE .*\[1, .*got 0"),
    (dict(image_size=32, batch_size=8, resize="lanczos7"), "resize must be one of"),
    (dict(image_size=32, batch_size=8, mean=(0.5,)), "mean and std"),
])
def test_bad_settings_are_one_line_errors(bind, settings, message):
    from trainer.errors import UserError

    with pytest.raises(UserError, match=message):
        bind(**settings)


@pytest.fixture(scope="module")
def many_classes(tmp_path_factory):
    """50 classes x 20 training images at 32 px, listed class by class as the reader lists them."""
    from trainer.data import synthetic

    out = tmp_path_factory.mktemp("many") / "tiny-imagenet-200"
    return synthetic.write_synthetic(str(out), num_classes=50, per_class=20, val_per_class=1, test_images=1,
                                     image_size=32)


def test_every_epoch_is_a_full_permutation(many_classes):
    """Batches mix classes as a full permutation does, from the first batch of every epoch on.

    Under a full permutation of 1,000 images (50 classes x 20), a batch of 32
    holds 50 * (1 - C(980, 32) / C(1000, 32)) = 23.9 distinct classes on
    average, and the first 4 batches (128 images) cover 46.4 classes. A
    shuffle buffer of 100 alone over the class-sorted file list would give
    about 12 and 15; streaming draws the file order anew each epoch first.
    """
    data = pipeline.data(many_classes, image_size=32, batch_size=32, seed=5, deterministic=True)  # Batch order.
    per_epoch = data.steps_per_epoch  # 31
    labels = [y.numpy().argmax(-1) for _, y in data.train().take(3 * per_epoch)]
    distinct = [len(set(batch)) for batch in labels]
    assert 22.0 <= np.mean(distinct) <= 25.5, np.mean(distinct)
    for epoch in range(3):
        early = set(np.concatenate(labels[epoch * per_epoch:epoch * per_epoch + 4]))
        assert len(early) >= 40, (epoch, len(early))
    epoch_images = np.concatenate(labels[:per_epoch])
    assert np.bincount(epoch_images, minlength=50).max() <= 20  # No image twice within an epoch.
    # Streamed, the file order is drawn anew each epoch before the (small) shuffle buffer: as well mixed.
    streamed = pipeline.data(many_classes, image_size=32, batch_size=32, seed=5, in_memory=False,
                             shuffle_buffer=100)
    mixed = [len(set(y.numpy().argmax(-1))) for _, y in streamed.train().take(per_epoch)]
    assert 22.0 <= np.mean(mixed) <= 25.5, np.mean(mixed)


def test_the_memory_mode_is_decided_once_by_the_budget(bind, monkeypatch):
    from trainer.models import plan

    data = bind(image_size=64, batch_size=10)  # 200 images: 2.3 MB decoded.
    monkeypatch.setattr(plan, "available_memory", lambda host=False: (2**30, "host RAM"))
    assert data.memory_mode() == (True, "in memory: decoded training set 2.3 MB <= budget 128.0 MB (12% of the "
                                        "1.0 GB available)")
    monkeypatch.setattr(plan, "available_memory", lambda host=False: (2**20, "host RAM"))  # The data took it.
    assert data.memory_mode()[0] is True  # Not a second decode, streamed, beside the first.
    assert bind(image_size=64, batch_size=10).memory_mode() == (
        False, "streaming: decoded training set 2.3 MB > budget 128.0 KB (12% of the 1.0 MB available)")
    assert bind(image_size=64, batch_size=10, memory_budget=10**6).memory_mode()[1].endswith(
        "> budget 976.6 KB (trainer.data.memory_budget)")


def test_only_the_synthetic_dataset_is_called_synthetic(synthetic_dir, tmp_path):
    """The quickstart's `synthetic_if_missing` labelled any existing dataset it was pointed at as synthetic."""
    real = tmp_path / "real"
    shutil.copytree(synthetic_dir, real)
    renamed = {f"n9{i:07d}": f"n0{i:07d}" for i in range(5)}  # As if real WordNet ids.
    for old, new in renamed.items():
        os.rename(real / "train" / old, real / "train" / new)
    for name in ("wnids.txt", "words.txt", "val/val_annotations.txt"):
        text = (real / name).read_text()
        for old, new in renamed.items():
            text = text.replace(old, new)
        (real / name).write_text(text)
    assert pipeline.data(str(synthetic_dir), 32, 10, synthetic_if_missing=True).synthetic
    data = pipeline.data(str(real), 32, 10, synthetic_if_missing=True)
    assert data.source.class_ids == list(renamed.values()) and not data.synthetic
