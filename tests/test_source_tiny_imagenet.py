"""Tests for trainer.data.sources.tiny_imagenet on small synthetic datasets."""

import os
import shutil

import pytest
import tensorflow as tf

from trainer.data import synthetic
from trainer.data.sources.tiny_imagenet import DOWNLOAD_COMMAND, INCOMPLETE_MARKER
from trainer.data.sources.tiny_imagenet import DatasetNotFoundError, TinyImageNet
from trainer.errors import UserError

CLASSES, PER_CLASS, VAL_PER_CLASS, TEST_IMAGES, SIZE = 4, 6, 3, 5, 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small synthetic dataset, shared read-only by the tests of this file."""
    return synthetic.write_synthetic(
        str(tmp_path_factory.mktemp("reader") / "tiny-imagenet-200"), num_classes=CLASSES,
        per_class=PER_CLASS, val_per_class=VAL_PER_CLASS, test_images=TEST_IMAGES,
        image_size=SIZE, greyscale_fraction=0.3, seed=1)


@pytest.fixture
def copy_dir(data_dir, tmp_path):
    """A private copy of the dataset, for tests that break it."""
    return shutil.copytree(data_dir, str(tmp_path / "tiny-imagenet-200"))


def test_counts_and_classes(data_dir):
    ds = TinyImageNet(data_dir)
    assert ds.num_classes == CLASSES
    assert ds.wnids == [synthetic.wnid(c) for c in range(CLASSES)]
    train, train_labels = ds.files("train")
    val, val_labels = ds.files("val")
    test, test_labels = ds.files("test")
    assert (len(train), len(train_labels)) == (CLASSES * PER_CLASS,) * 2
    assert (len(val), len(val_labels)) == (CLASSES * VAL_PER_CLASS,) * 2
    assert len(test) == TEST_IMAGES and test_labels is None
    assert sorted(train_labels) == sorted(list(range(CLASSES)) * PER_CLASS)


def test_hidden_files_are_left_out(copy_dir):
    """A copy made through a macOS share leaves '._<name>' metadata twins, named like JPEGs: not images."""
    first = sorted(TinyImageNet(copy_dir).files("train")[0])[0]
    with open(os.path.join(os.path.dirname(first), "._" + os.path.basename(first)), "wb") as f:
        f.write(b"\0\5\26\7 AppleDouble")
    assert len(TinyImageNet(copy_dir).files("train")[0]) == CLASSES * PER_CLASS


def test_order_is_sorted_and_deterministic(data_dir):
    ds = TinyImageNet(data_dir)
    for split in ("train", "val", "test"):
        files, _ = ds.files(split)
        assert files == sorted(files)
        assert ds.files(split) == TinyImageNet(data_dir).files(split)


def test_train_labels_follow_wnids_txt_order(copy_dir):
    path = os.path.join(copy_dir, "wnids.txt")
    reordered = [synthetic.wnid(c) for c in (2, 0, 3, 1)]
    with open(path, "w") as f:
        f.write("\n".join(reordered) + "\n")
    ds = TinyImageNet(copy_dir)
    assert ds.wnids == reordered
    files, labels = ds.files("train")
    for path, label in zip(files, labels):
        assert path.split(os.sep)[-3] == reordered[label]
    assert ds.class_names == [synthetic.class_name(c) for c in (2, 0, 3, 1)]


def test_class_names_from_words_txt_with_wnid_fallback(copy_dir):
    ds = TinyImageNet(copy_dir)
    assert ds.class_names == ["disk", "ring", "cross", "triangle"]
    words = os.path.join(copy_dir, "words.txt")
    with open(words) as f:
        lines = [l for l in f if not l.startswith(synthetic.wnid(1))]
    with open(words, "w") as f:
        f.writelines(lines)
    assert TinyImageNet(copy_dir).class_names == ["disk", synthetic.wnid(1), "cross", "triangle"]


def test_val_labels_come_from_val_annotations(data_dir):
    ds = TinyImageNet(data_dir)
    with open(os.path.join(data_dir, "val", "val_annotations.txt")) as f:
        expected = {l.split("\t")[0]: ds.wnids.index(l.split("\t")[1]) for l in f if l.strip()}
    files, labels = ds.files("val")
    assert {os.path.basename(p): y for p, y in zip(files, labels)} == expected
    assert all(os.path.dirname(p) == os.path.join(data_dir, "val", "images") for p in files)


def test_greyscale_jpegs_decode_to_three_channels(data_dir):
    ds = TinyImageNet(data_dir)
    files = ds.files("train")[0] + ds.files("val")[0] + ds.files("test")[0]
    channels = []
    for path in files:
        data = tf.io.read_file(path)
        channels.append(tf.io.decode_jpeg(data, channels=0).shape[-1])
        assert tf.io.decode_jpeg(data, channels=3).shape == (SIZE, SIZE, 3)
    assert 1 in channels and 3 in channels


def test_boxes(data_dir):
    ds = TinyImageNet(data_dir)
    for split in ("train", "val"):
        boxes = ds.boxes(split)
        assert set(boxes) == {os.path.basename(p) for p in ds.files(split)[0]}
        for x0, y0, x1, y1 in boxes.values():
            assert 0 <= x0 <= x1 < SIZE and 0 <= y0 <= y1 < SIZE
    wnid = synthetic.wnid(0)
    boxes_file = os.path.join(data_dir, "train", wnid, f"{wnid}_boxes.txt")
    with open(boxes_file) as f:
        first = f.readline().split("\t")
    assert first[0] == f"{wnid}_0.JPEG"
    assert ds.boxes("train")[first[0]] == tuple(int(v) for v in first[1:])


def test_bad_split(data_dir):
    ds = TinyImageNet(data_dir)
    with pytest.raises(UserError, match="'validation'.*'train', 'val', 'test'"):
        ds.files("validation")
    with pytest.raises(UserError, match="'test'"):
        ds.boxes("test")


def test_missing_dataset_names_layout_and_download_command(tmp_path):
    missing = str(tmp_path / "nowhere" / "tiny-imagenet-200")
    with pytest.raises(DatasetNotFoundError) as info:
        TinyImageNet(missing)
    message = str(info.value)
    assert isinstance(info.value, UserError)
    assert "\n" not in message
    assert missing in message and "does not exist" in message
    assert DOWNLOAD_COMMAND.replace("DIR", str(tmp_path / "nowhere")) in message
    assert "val/val_annotations.txt" in message and "train/<wnid>/images" in message
    assert "DATA_DIR=" in message


def test_missing_val_annotations_is_named(copy_dir):
    os.remove(os.path.join(copy_dir, "val", "val_annotations.txt"))
    with pytest.raises(DatasetNotFoundError, match="missing val/val_annotations.txt"):
        TinyImageNet(copy_dir)


def test_missing_class_folder_is_named(copy_dir):
    shutil.rmtree(os.path.join(copy_dir, "train", synthetic.wnid(3)))
    with pytest.raises(DatasetNotFoundError, match=f"train/{synthetic.wnid(3)}"):
        TinyImageNet(copy_dir)


def test_partially_written_directory_is_rejected(copy_dir):
    open(os.path.join(copy_dir, INCOMPLETE_MARKER), "w").close()
    with pytest.raises(DatasetNotFoundError, match="partially written"):
        TinyImageNet(copy_dir)


def test_parent_directory_hint(copy_dir):
    with pytest.raises(DatasetNotFoundError, match="did you mean"):
        TinyImageNet(os.path.dirname(copy_dir))


def test_unknown_wnid_in_val_annotations_names_file_and_line(copy_dir):
    path = os.path.join(copy_dir, "val", "val_annotations.txt")
    with open(path) as f:
        lines = f.readlines()
    lines[2] = "\t".join([lines[2].split("\t")[0], "n12345678"] + lines[2].split("\t")[2:])
    with open(path, "w") as f:
        f.writelines(lines)
    with pytest.raises(UserError, match=r"val_annotations.txt, line 3: class 'n12345678'"):
        TinyImageNet(copy_dir).files("val")


def test_val_annotation_without_image(copy_dir):
    images = os.path.join(copy_dir, "val", "images")
    os.remove(os.path.join(images, "val_0.JPEG"))
    with pytest.raises(UserError, match="missing from val/images.*val_0.JPEG"):
        TinyImageNet(copy_dir).files("val")


def test_home_is_expanded(data_dir, monkeypatch):
    monkeypatch.setenv("HOME", os.path.dirname(data_dir))
    ds = TinyImageNet("~/tiny-imagenet-200")
    assert ds.data_dir == data_dir
    assert len(ds.files("test")[0]) == TEST_IMAGES
