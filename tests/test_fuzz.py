"""Fuzzing what reads the user's files: the Tiny ImageNet layout reader and the image decode path.

Whatever wnids.txt, val_annotations.txt or a boxes file hold, the reader either works or raises a
UserError (one line naming the file); whatever bytes an image file holds, the input pipeline skips and
counts it, never crashes. Bounded to run in seconds.
"""

import os
import shutil
import tempfile

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer.data import pipeline, synthetic
from trainer.data.preprocess import Preprocessing
from trainer.data.sources.tiny_imagenet import TinyImageNet
from trainer.errors import UserError

WNIDS = [synthetic.wnid(i) for i in range(3)]


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """A 3-class dataset (2 train images a class, 1 val image a class, 8 px)."""
    return synthetic.write_synthetic(str(tmp_path_factory.mktemp("fuzz") / "tiny-imagenet-200"), num_classes=3,
                                     per_class=2, val_per_class=1, test_images=1, image_size=8)


def _read_everything(data_dir):
    reader = TinyImageNet(data_dir)
    for split in ("train", "val", "test"):
        reader.files(split)
    reader.boxes("train")
    reader.boxes("val")
    return reader


# Lines built from the pieces that matter (tabs, wnids, numbers, names) and from anything at all.
_pieces = st.sampled_from(WNIDS + ["\t", " ", "", "n99999999", "val_0.JPEG", "train_0.JPEG", "1", "-3", "1e3",
                                   "x", "\r", "..", "/", "é", "\x00", "\ufeff"])
_line = st.one_of(st.lists(_pieces, max_size=8).map("".join), st.text(max_size=20))
_text = st.lists(_line, max_size=6).map("\n".join)
_bytes = st.binary(max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.sampled_from(["wnids.txt", "val/val_annotations.txt", "train/{w}/{w}_boxes.txt", "words.txt"]),
       content=st.one_of(_text, _bytes), keep_original=st.booleans())
def test_the_layout_reader_works_or_raises_a_user_error(layout, target, content, keep_original):
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, "tiny-imagenet-200")
        shutil.copytree(layout, data_dir)
        path = os.path.join(data_dir, target.format(w=WNIDS[0]))
        mode = "ab" if keep_original else "wb"
        with open(path, mode) as f:
            f.write(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
        try:
            reader = _read_everything(data_dir)
        except UserError as err:
            assert "\n" not in str(err), str(err)  # One line, naming the file.
            return
        assert reader.num_classes == len(reader.wnids) >= 1
        files, labels = reader.files("train")
        assert all(0 <= label < reader.num_classes for label in labels) and len(files) == len(labels)


_jpeg_like = st.one_of(st.binary(max_size=200), st.binary(max_size=200).map(lambda b: b"\xff\xd8\xff\xe0" + b))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.lists(_jpeg_like, min_size=1, max_size=3), truncate=st.booleans())
def test_undecodable_images_are_skipped_and_counted(layout, garbage, truncate):
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, "tiny-imagenet-200")
        shutil.copytree(layout, data_dir)
        reader = TinyImageNet(data_dir)
        files, _ = reader.files("train")
        for path, payload in zip(files, garbage):
            if truncate:  # A real JPEG cut short.
                with open(path, "rb") as f:
                    payload = f.read()[:max(1, len(payload) % 100)]
            with open(path, "wb") as f:
                f.write(payload)
        good = 0
        for path in files:  # What TensorFlow itself can decode.
            try:
                tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
                good += 1
            except tf.errors.OpError:
                pass
        data = pipeline.Data(TinyImageNet(data_dir), Preprocessing(8), batch_size=1, deterministic=True)
        counter = tf.Variable(0, dtype=tf.int64)
        batches = iter(data.train(decoded_counter=counter))
        images, labels = next(batches)
        assert int(counter.numpy()) == good
        assert images.shape == (1, 8, 8, 3) and np.all(np.isfinite(images.numpy()))
