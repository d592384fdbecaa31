"""TFRecord shards: the converter (trainer.data.convert) and the source that reads them (sources.tfrecord)."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import gin
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import config as tf_config  # disable_op_determinism: not in the public API.

from trainer.data import convert
from trainer.data import sources
from trainer.data.sources import tfrecord
from trainer.data.sources.tiny_imagenet import TinyImageNet
from trainer.data import pipeline, scan
from trainer.data.preprocess import KnownImages, Preprocessing
from trainer.errors import UserError, data_error_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def converted(synthetic_dir, tmp_path_factory):
    """The synthetic dataset converted to 4 training shards (val and test: 1 each)."""
    out = str(tmp_path_factory.mktemp("tfrecord") / "shards")
    index, state = convert.convert(synthetic_dir, out, shards=4)
    assert state == "new"
    return out


def _by_id(dataset):
    return {i.decode(): (int(label), image) for image, label, i in dataset.as_numpy_iterator()}


def _ids(dataset):
    return [i.decode() for _, _, i in dataset.as_numpy_iterator()]


class _Context:
    """The parts of a tf.distribute.InputContext a source reads."""

    def __init__(self, pipelines, pipeline_id):
        self.num_input_pipelines, self.input_pipeline_id = pipelines, pipeline_id


def test_round_trip(synthetic_dir, converted):
    source, shards = TinyImageNet(synthetic_dir), tfrecord.TFRecord(converted)
    assert sources.looks_like(converted) == "tfrecord"
    assert source.class_ids == shards.class_ids and source.class_names == shards.class_names
    assert shards.splits == ("train", "val", "test")
    for split in shards.splits:
        assert shards.count(split) == source.count(split)
        assert _by_id(shards.examples(split)) == _by_id(source.examples(split))  # Same bytes, labels, ids.
    assert [len(shards.shards(s)) for s in shards.splits] == [4, 1, 1]
    assert [s["count"] for s in shards.shards("train")] == [50] * 4
    # val keeps the source's order; train is shuffled, every shard mixing the classes.
    assert _ids(shards.examples("val")) == _ids(source.examples("val"))
    assert shards.listing("val") == source.listing("val")
    for shard in shards.shards("train"):
        labels = {int(label) for _, label, _ in _read(converted, shard["file"])}
        assert len(labels) == 5
    assert shards.describe()["source"]["kind"] == "tiny_imagenet"
    assert shards.describe()["kind"] == "tfrecord" and shards.describe()["location"] == converted
    assert shards.fingerprint() == tfrecord.TFRecord(converted).fingerprint()


def _hashes(images):
    return sorted(hashlib.sha1(image.tobytes()).hexdigest() for image in images)


@pytest.mark.parametrize("size", [64, 32])  # The images' own size (a bare decode), and another (resized).
def test_the_index_lets_the_decode_leave_work_out_with_identical_pixels(synthetic_dir, converted, tmp_path,
                                                                        monkeypatch, size):
    shards = tfrecord.TFRecord(converted)
    assert shards.known_images("train") == shards.known_images("val") == KnownImages(64 * 64, (64, 64), False,
                                                                                     decoded=True)
    old, headers = str(tmp_path / "old"), str(tmp_path / "headers")  # As earlier converters wrote them.
    for directory, drop in ((old, "images"), (headers, "decoded")):  # No survey; headers read, none decoded.
        shutil.copytree(converted, directory)
        index = json.loads(open(os.path.join(directory, tfrecord.INDEX_FILE)).read())
        for entry in index["splits"].values():
            entry.pop(drop) if drop == "images" else entry["images"].pop(drop)
        with open(os.path.join(directory, tfrecord.INDEX_FILE), "w") as f:
            json.dump(index, f)
    assert tfrecord.TFRecord(old).known_images("train") is None
    assert tfrecord.TFRecord(headers).known_images("train") == KnownImages(64 * 64, (64, 64), False)
    prep, source = Preprocessing(size, crop="center"), TinyImageNet(synthetic_dir)
    expected = {split: {i.decode(): image for image, i in source.examples(split).map(
        lambda image, _, i: (prep.decode(image), i)).as_numpy_iterator()} for split in ("train", "val")}
    seen, decode, decode_batch = [], Preprocessing.decode, Preprocessing.decode_batch  # The `known` of every
    monkeypatch.setattr(Preprocessing, "decode", lambda self, e, known=None: seen.append(known) or decode(  # decode
        self, e, known))  # the pipeline builds, and whether it decodes a batch at a time.
    monkeypatch.setattr(Preprocessing, "decode_batch", lambda self, e, known=None: seen.append("batch") or
                        decode_batch(self, e, known))
    for directory, known in ((converted, shards.known_images("train")), (headers, KnownImages(64 * 64, (64, 64),
                                                                                              False)), (old, None)):
        data = pipeline.Data(tfrecord.TFRecord(directory), prep, batch_size=200, in_memory=False, shuffle_buffer=200)
        seen.clear()
        [(evaluated, _)] = list(data.eval("val").take(1))  # In the source's order.
        assert seen == (["batch", known] if directory == converted else [known])
        np.testing.assert_array_equal(evaluated.numpy()[:50], prep.prepare(np.stack(list(expected["val"].values()))))
        streamed, _ = next(iter(data.train()))  # The buffer mixes epochs: each image one of the training set's.
        assert set(_hashes(streamed.numpy())) <= set(_hashes(prep.prepare(np.stack(list(
            expected["train"].values()))).numpy()))
        seen.clear()
        images, _, ids = pipeline.Data(tfrecord.TFRecord(directory), prep, batch_size=200, in_memory=True).load_train()
        np.testing.assert_array_equal(images.numpy(), np.stack([expected["train"][i] for i in ids]))
        assert seen == (["batch", known] if directory == converted else [known])
    # An image over trainer.data.max_pixels would fail its whole batch: with a lower limit, one at a time.
    seen.clear()
    low = Preprocessing(size, crop="center", max_pixels=64 * 64 - 1)
    list(pipeline.Data(tfrecord.TFRecord(converted), low, batch_size=200, in_memory=False).eval("val"))
    assert seen == [shards.known_images("val")]


def _read(directory, name):
    records = tf.data.TFRecordDataset(os.path.join(directory, name)).batch(64)
    return list(records.map(tfrecord._parse).unbatch().as_numpy_iterator())  # pylint: disable=protected-access


def test_shards_read_in_parallel(converted):
    shards = tfrecord.TFRecord(converted)
    owner = {i.decode(): n for n, s in enumerate(shards.shards("train")) for _, _, i in _read(converted, s["file"])}
    ids = _ids(shards.examples("train"))
    blocks = [{owner[i] for i in ids[k:k + tfrecord.BLOCK]} for k in range(0, 4 * tfrecord.BLOCK, tfrecord.BLOCK)]
    assert blocks == [{0}, {1}, {2}, {3}]  # Interleaved: a block of records from each shard in turn.


@pytest.mark.parametrize("split", ["train", "test"])  # 4 shards for 2 pipelines; 1 shard for 2 (records shared).
def test_input_pipelines_disjoint(converted, split):
    shards = tfrecord.TFRecord(converted)
    shares = [_ids(shards.examples(split, shuffle_seed=7 + k, input_context=_Context(2, k))) for k in range(2)]
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(_ids(shards.examples(split)))
    assert abs(len(shares[0]) - len(shares[1])) <= 1
    assert [shards.share_count(split, 2, k) for k in range(2)] == [len(share) for share in shares]


def test_uneven_shares_load_into_memory(synthetic_dir, tmp_path):
    """3 shards for 2 input pipelines: the first reads two whole shards, more than half the images (the array
    sized at half of them did not hold them: a broadcast error). A file source's shares, for comparison."""
    files = TinyImageNet(synthetic_dir)
    assert [files.share_count("train", 3, k) for k in range(3)] == [
        len(_ids(files.examples("train", input_context=_Context(3, k)))) for k in range(3)]
    out = str(tmp_path / "shards")
    convert.convert(synthetic_dir, out, shards=3)
    data = pipeline.data(out, image_size=16, batch_size=10, in_memory=True, source=tfrecord.tfrecord)
    loaded = [data.load_train(_Context(2, k)) for k in range(2)]
    counts = [int(labels.shape[0]) for _, labels, _ in loaded]
    shard_counts = [s["count"] for s in data.source.shards("train")]  # 200 images: 67, 66, 67 or so.
    assert counts == [data.source.share_count("train", 2, k) for k in range(2)] == [
        shard_counts[0] + shard_counts[2], shard_counts[1]]
    assert sorted(loaded[0][2] + loaded[1][2]) == sorted(data.source.listing("train")[0])
    assert data.decoded_bytes(2) == counts[0] * 16 * 16 * 3  # The memory check counts the larger share.


def test_shuffle_differs_between_epochs(converted):
    """4 shards read in turn, 16 records at a time: an epoch's order follows its shard order (one of 24), so two
    epochs can agree (this test failed 1 run in 16 when it compared two); of 6 epochs, not all agree."""
    shards = tfrecord.TFRecord(converted)
    ids = _ids(shards.examples("train", shuffle_seed=3).repeat(6))
    epochs = {tuple(ids[i:i + 200]) for i in range(0, 1200, 200)}
    assert len(epochs) > 1 and len({tuple(sorted(e)) for e in epochs}) == 1
    assert epochs != {tuple(_ids(shards.examples("train")))}


def test_interrupted_conversion_resumes(synthetic_dir, tmp_path, monkeypatch):
    out = str(tmp_path / "shards")
    real, calls = convert.write_shard, []

    def fail_second(path, records):
        calls.append(path)
        if len(calls) == 2:
            with tf.io.gfile.GFile(path + ".tmp", "wb") as f:  # A half-written shard, as a kill leaves it.
                f.write(b"partial")
            raise KeyboardInterrupt
        return real(path, records)

    monkeypatch.setattr(convert, "write_shard", fail_second)
    with pytest.raises(KeyboardInterrupt):
        convert.convert(synthetic_dir, out, shards=4)
    assert not tf.io.gfile.exists(os.path.join(out, tfrecord.INDEX_FILE))
    with pytest.raises(sources.DatasetNotFoundError, match="partially written"):
        tfrecord.TFRecord(out)
    kept = os.path.getmtime(calls[0])
    monkeypatch.setattr(convert, "write_shard", real)
    index, state = convert.convert(synthetic_dir, out, shards=4)
    assert state == "resume"
    assert os.path.getmtime(calls[0]) == kept  # The complete shard was kept.
    assert sorted(os.listdir(out)) == sorted([convert.PLAN_FILE, tfrecord.INDEX_FILE] + [
        s["file"] for e in index["splits"].values() for s in e["shards"]])  # No temporary file left.
    assert _by_id(tfrecord.TFRecord(out).examples("train")) == _by_id(TinyImageNet(synthetic_dir).examples("train"))
    # Pass 1 of train was kept (its buckets were complete), so its headers were not read: nothing is assumed.
    assert "images" not in index["splits"]["train"] and tfrecord.TFRecord(out).known_images("train") is None
    assert index["splits"]["val"]["images"] == {"max_pixels": 64 * 64, "size": [64, 64], "webp": False, "decoded": True}
    assert convert.convert(synthetic_dir, out, shards=4)[1] == "done"


def test_changed_plan_starts_clean(synthetic_dir, tmp_path):
    out = str(tmp_path / "shards")
    os.makedirs(out)
    for name in ("train-00000-of-00009.tfrecord.tmp", ".bucket-train-00003-of-00009.tfrecord", convert.PLAN_FILE,
                 sources.INCOMPLETE_MARKER):
        (tmp_path / "shards" / name).write_text("{}")
    index, state = convert.convert(synthetic_dir, out, shards=2)
    assert state == "new" and len(index["splits"]["train"]["shards"]) == 2
    assert sorted(os.listdir(out)) == sorted([convert.PLAN_FILE, tfrecord.INDEX_FILE, "test-00000-of-00001.tfrecord",
                                              "val-00000-of-00001.tfrecord", "train-00000-of-00002.tfrecord",
                                              "train-00001-of-00002.tfrecord"])  # The stale files are gone.
    with pytest.raises(UserError, match="another dataset or with other options"):
        convert.convert(synthetic_dir, out, shards=3)
    # The plan names no module (which the sources' descriptions gained later): a plan written before still matches.
    plan = json.loads((tmp_path / "shards" / convert.PLAN_FILE).read_text())
    assert set(plan["source"]) == {"kind", "location"} and convert.convert(synthetic_dir, out, shards=2)[1] == "done"


def _damaged_copy(converted, tmp_path, damage):
    """A copy of `converted` whose second training shard has a flipped byte or is cut in half; (copy, that shard)."""
    copy = str(tmp_path / "copy")
    tf.io.gfile.makedirs(copy)
    for name in os.listdir(converted):
        tf.io.gfile.copy(os.path.join(converted, name), os.path.join(copy, name))
    bad = os.path.join(copy, "train-00001-of-00004.tfrecord")
    data = bytearray(open(bad, "rb").read())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[:len(data) // 2]
    with open(bad, "wb") as f:
        f.write(bytes(data))
    return copy, bad


@pytest.mark.parametrize("on_corrupt", ["skip", "stop"])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_shard(converted, tmp_path, on_corrupt, damage, capfd):
    copy, bad = _damaged_copy(converted, tmp_path, damage)
    shards = tfrecord.TFRecord(copy, on_corrupt=on_corrupt)
    if on_corrupt == "skip":
        ids = _ids(shards.examples("train", shuffle_seed=1))
        assert 150 <= len(ids) < 200 and len(set(ids)) == len(ids)
        [line] = [l for l in capfd.readouterr().err.splitlines() if "train-00001-of-00004.tfrecord: read" in l]
        assert re.fullmatch(r"\d\d:\d\d:\d\d warning: Corrupt TFRecord shard .*", line)  # As the console's lines.
        report = scan.scan(shards, use_cache=False)  # The data check says how many the index promised in vain.
        again = _ids(shards.examples("train", shuffle_seed=2))  # A split is read again (in-memory load, epochs) ...
        assert len(again) == len(ids)
        assert "Corrupt TFRecord shard" not in capfd.readouterr().err  # ... and the damage was named once.
        assert report["splits"]["train"] == {"images": len(ids), "unreadable": [], "missing": 200 - len(ids)}
        assert f"{200 - len(ids)} of the 200 train images the dataset counts could not be read" in \
            " ".join(report["problems"])
        assert scan.scan_summary(report).startswith(f"train {len(ids)} images (0 unreadable, {200 - len(ids)} more "
                                                    "counted but not read)")
    else:
        with pytest.raises(tf.errors.OpError) as caught:
            _ids(shards.examples("train"))
        line = data_error_line(caught.value)  # What `trainer.cli.run` prints as the one error line.
        assert line.startswith(f"Corrupt TFRecord shard {bad}: read ") and "\n" not in line
        assert line.endswith("on_corrupt = 'skip' to train without them.")
        # Through the training pipeline too: a strict source is not skipped past.
        data = pipeline.Data(shards, Preprocessing(32), batch_size=10, in_memory=False)
        with pytest.raises(tf.errors.OpError) as caught:
            for _ in data.train().take(40):
                pass
        assert data_error_line(caught.value).startswith(f"Corrupt TFRecord shard {bad}: read ")
        scan.scan(tfrecord.TFRecord(copy, on_corrupt="skip"))  # Cached, as a 'skip' run leaves it ...
        with pytest.raises(tf.errors.OpError):  # ... which a 'stop' run does not take for its own: it reads.
            scan.scan(shards)
    assert data_error_line(tf.errors.DataLossError(None, None, "other")) is None


def test_a_skipped_shard_is_named_under_op_determinism(converted, tmp_path, capfd):
    """trainer.train.deterministic_ops turns op determinism on, under which tf.timestamp fails: the skip's line
    took its time from it and ended the run ("Timestamp cannot be called when determinism is enabled")."""
    copy, bad = _damaged_copy(converted, tmp_path, "truncate")
    tf.config.experimental.enable_op_determinism()
    try:
        ids = _ids(tfrecord.TFRecord(copy).examples("train", shuffle_seed=1))
    finally:
        tf_config.disable_op_determinism()
    assert 150 <= len(ids) < 200
    [line] = [l for l in capfd.readouterr().err.splitlines() if f"{bad}: read" in l]
    assert re.fullmatch(r"\d\d:\d\d:\d\d warning: Corrupt TFRecord shard .*", line)


@pytest.mark.parametrize("kind", ["tfrecord", "files"])
def test_a_streamed_run_asked_for_order_draws_the_same_images_again(converted, synthetic_dir, kind):
    """trainer.data.deterministic = True: the same seed streams the same images in the same order. The sources'
    parallel reads (files, shards interleaved) finished out of order whenever a seed was given."""
    def images():
        source = tfrecord.TFRecord(converted) if kind == "tfrecord" else TinyImageNet(synthetic_dir)
        data = pipeline.Data(source, Preprocessing(16), batch_size=10, seed=3, in_memory=False, shuffle_buffer=1,
                             deterministic=True)
        return np.concatenate([x.numpy() for x, _ in data.train().take(40)])  # Two epochs.

    first = images()
    for _ in range(3):
        np.testing.assert_array_equal(images(), first)


def test_bad_data_dir(converted, synthetic_dir, tmp_path):
    with pytest.raises(sources.DatasetNotFoundError, match="does not exist"):
        tfrecord.tfrecord(str(tmp_path / "nothing"))
    with pytest.raises(sources.DatasetNotFoundError, match="no index.json.*holds the tiny_imagenet layout"):
        tfrecord.tfrecord(synthetic_dir)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "index.json").write_text("{not json")
    with pytest.raises(sources.DatasetNotFoundError, match="index.json is damaged"):
        tfrecord.tfrecord(str(copy))
    index = json.loads(open(os.path.join(converted, "index.json")).read())
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(sources.DatasetNotFoundError, match="6 shards .* missing .*train-00000-of-00004.tfrecord"):
        tfrecord.tfrecord(str(copy))
    with pytest.raises(UserError, match="on_corrupt must be"):
        tfrecord.tfrecord(converted, on_corrupt="ignore")
    with pytest.raises(UserError, match="already holds TFRecord shards"):
        convert.convert(converted, str(tmp_path / "again"))
    with pytest.raises(UserError, match="not empty and holds no conversion"):
        convert.convert(synthetic_dir, str(copy.parent))


def test_from_image_folder(synthetic_dir, tmp_path):
    tiny = TinyImageNet(synthetic_dir)
    paths, labels = tiny.files("train")
    folders = tmp_path / "folders"
    for k, (path, label) in enumerate(zip(paths[::10], labels[::10])):
        target = folders / ("val" if k % 4 == 0 else "train") / tiny.class_ids[label] / os.path.basename(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(open(path, "rb").read())
    out = str(tmp_path / "shards")
    index, _ = convert.convert(str(folders), out)  # The layout is detected.
    shards = tfrecord.TFRecord(out)
    source = sources.open_source(index["source"])
    assert index["source"]["kind"] == "image_folder" and shards.class_ids == list(source.class_ids)
    for split in ("train", "val"):
        assert _by_id(shards.examples(split)) == _by_id(source.examples(split))


def test_ram_file_system(synthetic_dir):
    out = "ram://tfrecord-test/shards"
    index, _ = convert.convert(synthetic_dir, out)  # Default shard count: one a split for so few bytes.
    assert [len(e["shards"]) for e in index["splits"].values()] == [1, 1, 1]
    shards = tfrecord.TFRecord(out)
    assert _by_id(shards.examples("val")) == _by_id(TinyImageNet(synthetic_dir).examples("val"))
    assert not [n for n in tf.io.gfile.listdir(out) if n.endswith(".tmp") or n.startswith(".")]
    assert len(shards.fingerprint()) == 40


def test_gin_file_and_settings(converted):
    gin.parse_config_files_and_bindings([os.path.join(ROOT, "gin/data/tfrecord.gin")], ["ON_CORRUPT = 'stop'"])
    assert tfrecord.tfrecord(converted).on_corrupt == "stop"
    reopened = sources.open_source(tfrecord.TFRecord(converted, on_corrupt="stop").describe())
    assert isinstance(reopened, tfrecord.TFRecord) and reopened.on_corrupt == "stop"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "trainer.data.convert", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.mark.slow
def test_cli(synthetic_dir, tmp_path):
    out = str(tmp_path / "shards")
    done = _cli(f"--data_dir={synthetic_dir}", f"--out={out}", "--shards=2")
    assert done.returncode == 0, done.stderr
    assert "Converted" in done.stdout and "train 200 images in 2 shards, val 50 images in 1 shard," in done.stdout
    bad = _cli(f"--data_dir={tmp_path / 'nothing'}", f"--out={tmp_path / 'x'}")
    assert bad.returncode == 1
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not exist" in errors[0], bad.stderr
    assert _cli("--help").returncode == 0
