"""The evaluator (trainer/evaluation/, python -m trainer.evaluate): metrics, reports, figures, Grad-CAM, CLI.

The numbers are checked against an independent numpy recomputation from the
model's logits, and against the top-1 the training run logged for its best
checkpoint.
"""

import csv
import glob
import json
import os
import shutil
import subprocess
import sys

import gin
import helpers
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from trainer import checkpoints
from trainer import config
from trainer.data import pipeline
from trainer.data.preprocess import Preprocessing
from trainer.data.sources import FileSource
from trainer.errors import UserError
from trainer.evaluation import evaluator  # Also registers its gin configurable.
from trainer.evaluation import gradcam as gradcam_lib
from trainer.evaluation import metrics
from trainer.models import builder

pytestmark = pytest.mark.slow  # Trains or starts TensorFlow in subprocesses: CI runs these.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
IMAGE_TAGS = {"eval/confusion_matrix", "eval/confusion_matrix_clustered",
              "eval/misclassified", "eval/gradcam", "eval/reliability"}


def evaluate_cli(*args):
    return subprocess.run([sys.executable, "-m", "trainer.evaluate", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300, check=False)


def event_tags(directory):
    """The summaries of every event file directly in `directory` (a run's eval/: one TensorBoard run)."""
    assert glob.glob(os.path.join(str(directory), "events.out.tfevents.*"))
    acc = event_accumulator.EventAccumulator(str(directory), size_guidance={"tensors": 0})
    acc.Reload()
    return acc


# --- Metrics in numpy ---------------------------------------------------------------


def test_in_top_k_counts_ties_like_tensorflow():
    rng = np.random.default_rng(0)
    logits = rng.integers(0, 4, (200, 7)).astype(np.float32)  # Many ties.
    labels = rng.integers(0, 7, 200)
    for k in (1, 3, 5):
        want = tf.math.in_top_k(tf.constant(labels), tf.constant(logits), k).numpy()
        np.testing.assert_array_equal(metrics.in_top_k(logits, labels, k), want)


def test_expected_calibration_error_by_hand():
    # Bins of width 1/15: 0.95 falls in (14/15, 1], 0.5 in (7/15, 8/15].
    ece, rows = metrics.reliability([0.95, 0.95, 0.5, 0.5], [True, False, True, True])
    assert ece == pytest.approx(0.5 * abs(0.5 - 0.95) + 0.5 * abs(1.0 - 0.5))
    assert len(rows) == 15 and [r["count"] for r in rows if r["count"]] == [2, 2]
    assert rows[14]["accuracy"] == 0.5 and rows[7]["confidence"] == 0.5
    assert metrics.reliability([1.0], [True])[0] == 0.0  # A confidence of 1 is in the last bin.


def test_cluster_order_keeps_confused_groups_together():
    rng = np.random.default_rng(3)
    groups = [[0, 1, 2], [3, 4, 5, 6], [7, 8]]
    confusion = np.diag(rng.integers(20, 30, 9))
    for group in groups:
        for a in group:
            for b in group:
                if a != b:
                    confusion[a, b] = rng.integers(1, 6)
    shuffle = rng.permutation(9)
    order = metrics.cluster_order(confusion[np.ix_(shuffle, shuffle)])
    positions = {int(shuffle[c]): p for p, c in enumerate(order)}
    assert sorted(order) == list(range(9))
    for group in groups:
        spots = sorted(positions[c] for c in group)
        assert spots[-1] - spots[0] == len(group) - 1, (group, order)


# --- Grad-CAM ------------------------------------------------------------------------

_COLOURS = np.array([[1, .1, .1], [.1, 1, .1], [.1, .1, 1], [1, 1, .1]], np.float32)


def _cue_images(n, rng, size=32, side=6):
    """Noise, a square of the class's colour in one quadrant and a grey distractor square in another.

    Returns:
      (images [n, size, size, 3], labels [n] (the colour), quadrants [n] of the cue: 2 * row + column).
    """
    images = rng.uniform(0.2, 0.5, (n, size, size, 3)).astype(np.float32)
    labels, quadrants = rng.integers(0, 4, n), rng.integers(0, 4, n)
    half = size // 2
    for i in range(n):
        distractor = (quadrants[i] + rng.integers(1, 4)) % 4
        for quadrant, colour in ((quadrants[i], _COLOURS[labels[i]]), (distractor, np.full(3, 0.9))):
            y = quadrant // 2 * half + rng.integers(1, half - side - 1)
            x = quadrant % 2 * half + rng.integers(1, half - side - 1)
            images[i, y:y + side, x:x + side] = colour
    return images, labels, quadrants


def _cue_model():
    image = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="c1_conv")(image)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="c2_conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="head_gap")(x)
    return keras.Model(image, keras.layers.Dense(4, name="head_dense")(x), name="cue")


def test_gradcam_peak_falls_on_the_class_cue():
    """A net that tells the cue's colour looks at the cue: the Grad-CAM peak is in its quadrant (chance 25%)."""
    keras.utils.set_random_seed(0)
    images, labels, _ = _cue_images(2048, np.random.default_rng(0))
    model = _cue_model()
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(images, labels, batch_size=64, epochs=8, verbose=0)  # 256 steps.
    test_images, test_labels, quadrants = _cue_images(200, np.random.default_rng(1))
    predicted = model(test_images).numpy().argmax(axis=1)
    assert np.mean(predicted == test_labels) > 0.9

    layer = gradcam_lib.find_layer(model)
    assert layer.name == "c2_conv"  # The last layer with a 4-D output.
    cams = gradcam_lib.gradcam(model, test_images, predicted, layer)
    assert cams.shape == (200, 32, 32) and cams.min() >= 0.0 and cams.max() <= 1.0
    peaks = np.array([np.unravel_index(np.argmax(c), c.shape) for c in cams])
    hit = (peaks[:, 0] >= 16) * 2 + (peaks[:, 1] >= 16) == quadrants
    assert hit.mean() >= 0.6, hit.mean()


def test_gradcam_layer_by_block_name_and_errors():
    model = _cue_model()
    assert gradcam_lib.find_layer(model, "c1").name == "c1_conv"
    assert gradcam_lib.find_layer(model, "c2_conv").name == "c2_conv"
    with pytest.raises(UserError, match=r"gradcam_layer = 'c3'.*got none of that name.*c2_conv"):
        gradcam_lib.find_layer(model, "c3")
    with pytest.raises(UserError, match=r"spatial \(4-D\) output, got layer 'head_dense'"):
        gradcam_lib.find_layer(model, "head")


# --- evaluate_checkpoint on a hand-made dataset with a corrupt image -------------------


def test_corrupt_image_is_skipped_and_reported(tmp_path):
    images, labels, _ = _cue_images(7, np.random.default_rng(2))
    files = []
    for i, image in enumerate(images):
        files.append(str(tmp_path / "data" / f"img_{i}.JPEG"))
        tf.io.gfile.makedirs(os.path.dirname(files[-1]))
        tf.io.write_file(files[-1], tf.io.encode_jpeg(tf.cast(image * 255, tf.uint8)))
    with open(files[3], "wb") as f:
        f.write(b"not a jpeg")
    class Listed(FileSource):
        kind, location, splits = "listed", str(tmp_path / "data"), ("train", "val")
        class_ids, class_names = ["a", "b", "c", "d"], ["red", "green", "blue", "yellow"]

        def _list(self, split):
            return files, [int(v) for v in labels]

    reader = Listed()
    model = _cue_model()
    path = tf.train.Checkpoint(weights={w.path: w for w in model.weights}).save(str(tmp_path / "best" / "ckpt"))
    before = [w.numpy() for w in model.weights]
    data = pipeline.Data(reader, Preprocessing(32), batch_size=4)
    report = evaluator.evaluate_checkpoint(model, path, data, "val", str(tmp_path / "eval"))
    assert report["checkpoint_name"] == "best-1"
    assert report["data"] == {"data_dir": str(tmp_path / "data"), "source": {"kind": "listed",
                                                                            "location": str(tmp_path / "data"),
                                                                            "module": Listed.__module__},
                              "num_files": 7, "num_scored": 6, "num_skipped": 1, "skipped_files": ["img_3.JPEG"]}
    out = tmp_path / "eval" / "best-1"
    with open(out / "predictions.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == [f"img_{i}.JPEG" for i in (0, 1, 2, 4, 5, 6)]
    assert all(len(r["top5_wnids"].split()) == 4 for r in rows)  # k = min(5, classes).
    assert "could not be decoded" in (out / "report.md").read_text()
    for got, want in zip(model.weights, before):  # A given model gets its weights back.
        np.testing.assert_array_equal(got.numpy(), want)


# --- A trained run: report against numpy, the training log, files, TensorBoard, CLI ----


@pytest.fixture(scope="module")
def trained_run(finished_run, tmp_path_factory):
    """The small network, 2 epochs (30 steps) on the synthetic dataset; its best and latest checkpoints (a copy:
    the tests evaluate into it)."""
    model_dir = tmp_path_factory.mktemp("eval_run") / "run"
    shutil.copytree(finished_run("EPOCHS = 2"), model_dir)
    return model_dir


def _parse(train_base_gin, model_dir, *bindings):
    gin.clear_config()
    config.parse_gin([train_base_gin], ["EPOCHS = 2", *bindings], model_dir=str(model_dir))


def _val_logits(model):
    """Independently: decode every val image as make_dataset does, run the model, in batches of 20."""
    files, labels = pipeline.data().source.files("val")
    images = np.stack([tf.cast(helpers.decode_file(f, 32), tf.float32).numpy() / 255.0 for f in files])
    logits = [model(images[i:i + 20], training=False).numpy() for i in range(0, len(images), 20)]
    flipped = [model(images[i:i + 20, :, ::-1], training=False).numpy() for i in range(0, len(images), 20)]
    return np.concatenate(logits), np.concatenate(flipped), np.array(labels)


def test_report_equals_numpy_recomputation_and_the_logged_best_top1(train_base_gin, trained_run):
    _parse(train_base_gin, trained_run)
    report = evaluator.evaluate_best_of_phase(str(trained_run), pipeline.data())

    model = builder.build_network(32)
    checkpoints.restore_weights(model, report["checkpoint"])
    logits, flipped, labels = _val_logits(model)
    predicted = logits.argmax(axis=1)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    confusion = np.zeros((5, 5), int)
    for t, p in zip(labels, predicted):
        confusion[t, p] += 1
    m = report["metrics"]
    assert m["top1"] == pytest.approx(np.mean(predicted == labels), abs=1e-12)
    assert m["top5"] == pytest.approx(np.mean([t in row for t, row in zip(labels, top5)]), abs=1e-12)
    assert report["confusion_matrix"] == confusion.tolist()
    for c in report["per_class"]:
        assert c["accuracy"] == pytest.approx(np.mean(predicted[labels == c["index"]] == c["index"]), abs=1e-12)
        assert c["support"] == np.sum(labels == c["index"])
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert m["loss"] == pytest.approx(-np.mean(log_probs[np.arange(len(labels)), labels]), rel=1e-4)

    # The top-1 the trainer logged for the best epoch, and stored in the best checkpoint.
    with open(trained_run / "metrics.csv", encoding="utf-8") as f:
        logged = {int(r["step"]): float(r["val_top1"]) for r in csv.DictReader(f)}
    step = report["checkpoint_step"]
    assert report["checkpoint_name"] == f"best-{step}" and max(logged.values()) == logged[step]
    assert abs(m["top1"] - logged[step]) <= 1e-6 and abs(m["top1"] - report["checkpoint_best_top1"]) <= 1e-6
    assert report["checkpoint_val_top1"] == logged[step]

    out = trained_run / "eval" / f"best-{step}"
    assert json.loads((out / "report.json").read_text())["metrics"]["top1"] == m["top1"]
    assert "## The 5 worst classes" in (out / "report.md").read_text()
    with open(out / "predictions.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(labels) == 100
    names = pipeline.data().source.wnids
    assert [r["predicted_wnid"] for r in rows] == [names[p] for p in predicted]
    assert not glob.glob(str(out / "events.out.tfevents.*"))  # Every evaluation of the run in one run, eval/.
    acc = event_tags(out.parent)
    assert IMAGE_TAGS <= set(acc.Tags()["tensors"])
    assert all(acc.SummaryMetadata(t).plugin_data.plugin_name == "images" for t in IMAGE_TAGS)
    assert acc.SummaryMetadata("eval/per_class_accuracy").plugin_data.plugin_name == "text"
    assert {e.step for e in acc.Tensors("eval/top1")} == {step}

    # Flip TTA (a gin switch): the mean of the two softmaxes decides.
    _parse(train_base_gin, trained_run, "trainer.evaluate.tta_flip = True")
    tta = evaluator.evaluate_model_dir(str(trained_run), "best")
    assert tta["checkpoint_name"] == f"best-{step}-flip" and tta["tta_flip"]
    probs = (metrics.softmax(logits) + metrics.softmax(flipped)) / 2
    assert tta["metrics"]["top1"] == pytest.approx(np.mean(probs.argmax(axis=1) == labels), abs=1e-12)


def test_cli_reads_the_operative_config_and_runs_under_two_mirrored_replicas(trained_run):
    """The latest checkpoint, evaluated over 2 replicas (MirroredStrategy on logical CPUs), as the run logged it."""
    result = evaluate_cli(f"--model_dir={trained_run}", "--checkpoint=latest",
                          "--gin_bindings=trainer.train.strategy = @trainer.strategy.mirrored",
                          "--gin_bindings=trainer.strategy.mirrored.logical_cpus = 2",
                          "--gin_bindings=trainer.strategy.mirrored.cross_device_ops = 'reduction_to_one_device'")
    assert result.returncode == 0, result.stderr[-3000:]
    out = trained_run / "eval" / "ckpt-30"
    said = (result.stdout + result.stderr).splitlines()
    results = [line for line in said if "top-1" in line]  # The result, said once, with where the reports are.
    assert len(results) == 1 and "Evaluated" in results[0] and "ckpt-30 on val (100 images)" in results[0] and \
        f"Reports in {out}" in results[0], said
    out = trained_run / "eval" / "ckpt-30"
    assert {"report.json", "report.md", "predictions.csv"} <= set(os.listdir(out))
    assert IMAGE_TAGS <= set(event_tags(out.parent).Tags()["tensors"])
    with open(trained_run / "metrics.csv", encoding="utf-8") as f:
        logged = {int(r["step"]): float(r["val_top1"]) for r in csv.DictReader(f)}
    report = json.loads((out / "report.json").read_text())
    assert report["replicas"] == 2 and abs(report["metrics"]["top1"] - logged[30]) <= 1e-6


def test_cli_help_and_missing_checkpoint(train_base_gin, tmp_path):
    result = evaluate_cli("--help")
    assert result.returncode == 0 and "--checkpoint" in result.stdout
    result = evaluate_cli(f"--gin_file={train_base_gin}", f"--model_dir={tmp_path / 'none'}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"expected a checkpoint in {tmp_path / 'none' / 'best'}" in errors[0], result.stderr


def test_scoring_batches_equal_the_pipelines_eval_batches(synthetic_dir):
    """Resize method and standardisation as `Data.eval`: the images the evaluator scores are the trainer's."""
    from trainer.data.sources.tiny_imagenet import TinyImageNet

    data = pipeline.Data(TinyImageNet(synthetic_dir), Preprocessing(24, "nearest", (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)),
                         batch_size=16)
    expected = [images.numpy() for images, _ in data.eval("val")]
    got = [images.numpy() for images, _ in evaluator._scoring_dataset(data, "val")]
    assert len(got) == len(expected) == 4  # 50 images in batches of 16, the last one padded.
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a[:len(b)], b)


def test_export_of_a_trainer_run_agrees_with_the_evaluator(train_base_gin, trained_run, tmp_path):
    """A real run's operative_config.gin exports (trainer.export) and the SavedModel scores as the evaluator does."""
    from trainer import export

    meta = export.export_checkpoint(str(trained_run), "latest", export_dir=str(tmp_path / "export"))
    assert meta["source"]["step"] == 30 and meta["source"]["kind"] == "latest"
    with open(trained_run / "metrics.csv", encoding="utf-8") as f:
        logged = {int(r["step"]): float(r["val_top1"]) for r in csv.DictReader(f)}
    assert meta["source"]["val_top1"] == logged[30] and meta["source"]["best_top1"] == max(logged.values())
    _parse(train_base_gin, trained_run)
    report = evaluator.evaluate_model_dir(str(trained_run), "latest")
    files, labels = pipeline.data().source.files("val")
    serve = tf.saved_model.load(str(tmp_path / "export" / "saved_model")).signatures["serving_default"]
    probabilities = serve(images=tf.constant([tf.io.read_file(f).numpy() for f in files]))["probabilities"].numpy()
    assert np.mean(probabilities.argmax(axis=1) == np.array(labels)) == pytest.approx(report["metrics"]["top1"])
