"""Tests for trainer.data.synthetic: layout, determinism, atomic writes, learnable classes."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.data import synthetic
from trainer.data.sources.tiny_imagenet import INCOMPLETE_MARKER, DatasetNotFoundError, TinyImageNet
from trainer.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(num_classes=3, per_class=4, val_per_class=2, test_images=3, image_size=16)


def _siblings(path):
    return sorted(os.listdir(os.path.dirname(path)))


def test_layout_matches_tiny_imagenet(tmp_path):
    out = synthetic.write_synthetic(str(tmp_path / "ds"), **SMALL, seed=3)
    ds = TinyImageNet(out)
    assert ds.wnids == ["n90000000", "n90000001", "n90000002"]
    assert os.listdir(os.path.join(out, "train", "n90000001")) in (
        ["images", "n90000001_boxes.txt"], ["n90000001_boxes.txt", "images"])
    test_names = sorted(os.listdir(os.path.join(out, "test", "images")))
    assert test_names == [f"test_{i}.JPEG" for i in range(3)]
    with open(os.path.join(out, "words.txt")) as f:
        words = [line.rstrip("\n").split("\t") for line in f]
    assert all(len(w) == 2 for w in words)
    assert len(words) > 3 and {w[0] for w in words} > set(ds.wnids)
    with open(os.path.join(out, "val", "val_annotations.txt")) as f:
        fields = [line.rstrip("\n").split("\t") for line in f]
    assert len(fields) == 6 and all(len(x) == 6 and x[0].startswith("val_") for x in fields)
    assert {x[1] for x in fields} == set(ds.wnids)
    image = tf.io.decode_jpeg(tf.io.read_file(ds.files("train")[0][0]), channels=3)
    assert image.shape == (16, 16, 3)
    assert not os.path.exists(os.path.join(out, INCOMPLETE_MARKER))


def test_deterministic_given_seed(tmp_path):
    a = synthetic.write_synthetic(str(tmp_path / "a"), **SMALL, seed=5)
    b = synthetic.write_synthetic(str(tmp_path / "b"), **SMALL, seed=5)
    c = synthetic.write_synthetic(str(tmp_path / "c"), **SMALL, seed=6)
    name = os.path.join("val", "images", "val_1.JPEG")
    read = lambda root: open(os.path.join(root, name), "rb").read()
    assert read(a) == read(b) != read(c)


def test_greyscale_fraction(tmp_path):
    out = synthetic.write_synthetic(str(tmp_path / "ds"), num_classes=2, per_class=20,
                                    val_per_class=1, test_images=0, image_size=8,
                                    greyscale_fraction=0.5)
    files = TinyImageNet(out).files("train")[0]
    grey = sum(tf.io.decode_jpeg(tf.io.read_file(f)).shape[-1] == 1 for f in files)
    assert 8 <= grey <= 32


def test_classes_differ_by_shape_not_colour():
    rng = np.random.default_rng(0)
    images = [synthetic.render(c, 64, 32, rng)[0].astype(np.float32) for c in range(4)]
    channel_means = np.array([im.mean(axis=(0, 1, 2)) for im in images])
    # Colours are drawn alike for every class: no class has its own hue.
    assert np.ptp(channel_means, axis=1).max() < 20
    assert len({synthetic.class_recipe(c) for c in range(208)}) == 208
    assert [synthetic.class_name(c) for c in (0, 13, 52, 104)] == [
        "disk", "2 disks", "dark disk", "disk on noise"]


def test_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="per_class=0"):
        synthetic.write_synthetic(str(tmp_path / "ds"), per_class=0)
    with pytest.raises(UserError, match="num_clases"):
        synthetic.ensure_synthetic(str(tmp_path / "ds"), num_clases=3)


def test_ensure_writes_once_and_checks_options(tmp_path):
    out = str(tmp_path / "ds")
    assert synthetic.ensure_synthetic(out, **SMALL) == out
    wnids = os.path.join(out, "wnids.txt")
    os.utime(wnids, (0, 0))
    assert synthetic.ensure_synthetic(out, **SMALL) == out
    assert os.path.getmtime(wnids) == 0  # Not rewritten.
    assert _siblings(out) == ["ds"]  # No temporary directory left.
    with pytest.raises(UserError, match=r"num_classes=3 \(asked 4\)"):
        synthetic.ensure_synthetic(out, **dict(SMALL, num_classes=4))


def test_ensure_replaces_an_empty_directory_but_not_other_content(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    TinyImageNet(synthetic.ensure_synthetic(str(empty), **SMALL))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="exists but is not a complete dataset"):
        synthetic.ensure_synthetic(str(other), **SMALL)
    assert os.listdir(other) == ["notes.txt"]


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    out = str(tmp_path / "ds")

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_write_test", crash)
    with pytest.raises(KeyboardInterrupt):
        synthetic.ensure_synthetic(out, **SMALL)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    TinyImageNet(synthetic.ensure_synthetic(out, **SMALL))


def test_interrupted_plain_write_is_not_a_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "_write_test", lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        synthetic.write_synthetic(str(tmp_path / "ds"), **SMALL)
    with pytest.raises(DatasetNotFoundError, match="partially written"):
        TinyImageNet(str(tmp_path / "ds"))


def test_concurrent_callers(tmp_path, monkeypatch):
    """A second caller finishes while the first is writing: both get one complete dataset."""
    out = str(tmp_path / "ds")
    original = synthetic.write_synthetic
    calls = []

    def racing_write(path, **kwargs):
        calls.append(path)
        if len(calls) == 1:
            synthetic.ensure_synthetic(out, **SMALL)  # The other caller wins the race.
        return original(path, **kwargs)

    monkeypatch.setattr(synthetic, "write_synthetic", racing_write)
    assert synthetic.ensure_synthetic(out, **SMALL) == out
    assert len(calls) == 2 and calls[0] != calls[1]
    assert _siblings(out) == ["ds"]
    assert TinyImageNet(out).num_classes == 3


@pytest.mark.slow
def test_command_line(tmp_path):
    out = str(tmp_path / "cli")
    command = [sys.executable, "-m", "trainer.data.synthetic", f"--out={out}", "--classes=2",
               "--per_class=2", "--val_per_class=1", "--test_images=1", "--image_size=8"]
    run = lambda cmd: subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    done = run(command)
    assert done.returncode == 0, done.stderr
    assert "written" in done.stdout and "NUM_CLASSES=2" in done.stdout
    assert TinyImageNet(out).num_classes == 2
    clash = run(command[:4] + ["--classes=3"])
    assert clash.returncode == 1
    assert "error: The synthetic dataset" in clash.stderr and "Traceback" not in clash.stderr


def _augment(images, rng, layers):
    """Reference-like augmentation: flip, x/y zoom 0.5-1.5, ±45° rotation, channel
    shuffle, brightness multiply, 3x3 coarse dropout (p 0.2 per cell)."""
    images = layers(images, training=True).numpy()
    n, size = len(images), images.shape[1]
    order = np.argsort(rng.uniform(size=(n, 3)), axis=1)
    images = np.take_along_axis(images, order[:, None, None, :], axis=3)
    images = images * rng.uniform(0.5, 1.5, (n, 1, 1, 1))
    cell = -(-size // 3)
    dropped = np.kron(rng.uniform(size=(n, 3, 3)) < 0.2, np.ones((cell, cell)))[:, :size, :size]
    return np.clip(images * (1 - dropped[..., None]), 0, 1).astype(np.float32)


@pytest.mark.slow
def test_classes_are_learnable_under_reference_augmentations(tmp_path):
    """A tiny CNN at 32 px reaches far above chance (10%) on augmented validation images."""
    ds = TinyImageNet(synthetic.write_synthetic(
        str(tmp_path / "ds"), num_classes=10, per_class=60, val_per_class=20, test_images=0))

    def load(split):
        files, labels = ds.files(split)
        images = [tf.image.resize(tf.io.decode_jpeg(tf.io.read_file(f), channels=3), [32, 32],
                                  antialias=True) / 255.0 for f in files]
        return np.stack(images).astype(np.float32), np.array(labels)

    (x_train, y_train), (x_val, y_val) = load("train"), load("val")
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    layers = keras.Sequential([
        keras.layers.RandomFlip("horizontal", seed=1),
        keras.layers.RandomZoom((-0.5, 0.5), (-0.5, 0.5), fill_mode="nearest", seed=2),
        keras.layers.RandomRotation(0.125, fill_mode="constant", seed=3)])
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"), keras.layers.MaxPool2D(),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"), keras.layers.MaxPool2D(),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        keras.layers.GlobalMaxPooling2D(), keras.layers.Dense(10)])
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    for _ in range(30):
        model.fit(_augment(x_train, rng, layers), y_train, batch_size=32, epochs=1, verbose=0)
    _, accuracy = model.evaluate(_augment(x_val, rng, layers), y_val, verbose=0)
    assert accuracy > 0.4
