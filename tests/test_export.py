"""trainer.export: a run's checkpoint to a SavedModel on encoded images, model.keras and the class list.

The run is made here, in the trainer's model-directory format (operative_config.gin,
checkpoints/ and best/ holding `tf.train.Checkpoint(weights={path: variable}, step=...,
history=<JSON rows>)`), from the small network trained for a few epochs with Keras on the
synthetic dataset: the tests do not depend on the trainer's loop.
"""

import errno
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

from trainer import checkpoints
from trainer import config
from trainer import export
from trainer import run_dir
from trainer.data import pipeline
from trainer.data.preprocess import Preprocessing
from trainer.data.sources.tiny_imagenet import TinyImageNet
from trainer.errors import UserError

pytestmark = pytest.mark.slow  # Trains or starts TensorFlow in subprocesses: CI runs these.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
IMAGE_SIZE = 32
BEST_STEP, LATEST_STEP = 40, 50


def make_trained_run(root, data_dir):
    """A model directory as the trainer leaves it, with the small network trained on `data_dir` (5 classes).

    best/ holds the trained weights at step BEST_STEP; checkpoints/ holds them
    perturbed at step LATEST_STEP (so the two can be told apart).

    Returns:
      The model directory.
    """
    run = os.path.join(str(root), "run")
    gin.clear_config()
    config.parse_gin([], [f"""
include 'gin/common.gin'
include 'gin/models/small.gin'
include 'gin/strategy/default.gin'
DATA_DIR = '{data_dir}'
IMAGE_SIZE = {IMAGE_SIZE}
BATCH_SIZE = 20
EPOCHS = 10
NUM_CLASSES = 5
MODEL_DIR = '{run}'
AUGMENT = None
"""])
    keras.utils.set_random_seed(1)
    from trainer.models import builder

    data = pipeline.data()  # What the trainer calls before it writes operative_config.gin.
    model = builder.build_network(IMAGE_SIZE)
    files, labels = data.source.files("train")
    images = np.stack([helpers.decode_file(f, IMAGE_SIZE).numpy() for f in files]).astype(np.float32) / 255.0
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(images, np.array(labels), batch_size=20, epochs=10, shuffle=True, verbose=0)
    os.makedirs(run)
    with open(os.path.join(run, "operative_config.gin"), "w", encoding="utf-8") as f:
        f.write(gin.operative_config_str())
    run_dir.write_data_settings(run, data)  # What the trainer records when it starts.
    gin.clear_config()
    weights = checkpoints.weights_by_path(model)
    step = tf.Variable(0, dtype=tf.int64)
    rows = [{"epoch": 4, "step": BEST_STEP, "global_step": BEST_STEP, "val_top1": 0.9}]
    history = tf.Variable(json.dumps(rows), dtype=tf.string)
    checkpoint = tf.train.Checkpoint(weights=weights, step=step, history=history)
    step.assign(BEST_STEP)
    tf.train.CheckpointManager(checkpoint, os.path.join(run, "best"), 1).save(checkpoint_number=BEST_STEP)
    for w in model.trainable_weights:
        w.assign(w + np.random.default_rng(0).normal(0, 0.5, w.shape).astype(np.float32))
    step.assign(LATEST_STEP)
    history.assign(json.dumps(rows + [{"epoch": 5, "step": LATEST_STEP, "global_step": LATEST_STEP,
                                       "val_top1": 0.3}]))
    tf.train.CheckpointManager(checkpoint, os.path.join(run, "checkpoints"), 3).save(checkpoint_number=LATEST_STEP)
    return run


def exported_run(made_once, data_dir, copy_to):
    """A copy in `copy_to` of `make_trained_run`'s run exported (best checkpoint) to <run>/export, made once for
    the session (test_export and test_predict). Returns the copy's model directory."""

    def make(root):
        export.export_checkpoint(make_trained_run(root, data_dir))
        gin.clear_config()

    shutil.copytree(made_once("exported_run", make) / "run", copy_to / "run")
    return str(copy_to / "run")


@pytest.fixture(scope="module")
def trained_run(made_once, tmp_path_factory, synthetic_dir):
    """The model directory of `make_trained_run`, exported to <run>/export."""
    return exported_run(made_once, synthetic_dir, tmp_path_factory.mktemp("export_run"))


def tiny_model(num_classes=3, size=8):
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes, name="logits")(x))


def export_tiny(export_dir, source="first"):
    return export.export_model(tiny_model(), Preprocessing(8), ["a", "b", "c"], ["A", "B", "C"], str(export_dir),
                               source=source, top_k=2)


def dead_pid():
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# --- A run's checkpoint. ------------------------------------------------------------


def test_best_checkpoint_export_layout_and_metadata(trained_run, synthetic_dir):
    export_dir = os.path.join(trained_run, "export")
    assert sorted(os.listdir(export_dir)) == ["README.txt", "classes.json", "export.json", "model.keras",
                                              "saved_model"]
    readme = open(os.path.join(export_dir, "README.txt"), encoding="utf-8").read()
    assert "LOGITS out" in readme and "stretched to a square (not cropped)" in readme
    dataset = TinyImageNet(synthetic_dir)
    meta = read_json(os.path.join(export_dir, "export.json"))
    assert read_json(os.path.join(export_dir, "classes.json")) == {"wnids": dataset.wnids, "names": dataset.class_names}
    assert meta["wnids"] == dataset.wnids and meta["names"] == dataset.class_names
    assert meta["image_size"] == IMAGE_SIZE and meta["input_scale"] == pytest.approx(1 / 255)
    assert meta["resize_method"] == "bilinear" and meta["antialias"] is True and meta["top_k"] == 5
    assert meta["source"]["kind"] == "best" and meta["source"]["step"] == BEST_STEP
    assert meta["source"]["checkpoint"].endswith(os.path.join("best", f"ckpt-{BEST_STEP}"))
    assert meta["source"]["best_top1"] == pytest.approx(0.9)
    assert meta["source"]["val_top1"] == pytest.approx(0.9) and meta["source"]["epoch"] == 4
    assert meta["mean"] is None and meta["std"] is None
    assert not [p for p in os.listdir(trained_run) if p.startswith(("partial.", "previous."))]


def test_exported_model_classifies_val_images_in_label_order(trained_run, synthetic_dir):
    files, labels = TinyImageNet(synthetic_dir).files("val")
    serve = tf.saved_model.load(os.path.join(trained_run, "export", "saved_model")).signatures["serving_default"]
    out = serve(images=tf.constant([tf.io.read_file(f).numpy() for f in files]))
    top1 = out["top_k_indices"].numpy()[:, 0]
    assert np.mean(top1 == np.array(labels)) >= 0.5  # Chance: 0.2. A shuffled class list would fail.
    wnids = TinyImageNet(synthetic_dir).wnids
    assert [w.decode() for w in out["top_k_wnids"].numpy()[:, 0]] == [wnids[i] for i in top1]
    np.testing.assert_allclose(out["probabilities"].numpy().sum(axis=1), 1.0, rtol=1e-5)
    assert out["top_k_names"].shape == (len(files), 5) and out["top_k_names"].dtype == tf.string

    # The .keras model loads with stock Keras (no custom objects) and gives the same probabilities.
    model = keras.saving.load_model(os.path.join(trained_run, "export", "model.keras"))
    images = np.stack([helpers.decode_file(f, IMAGE_SIZE).numpy() for f in files]).astype(np.float32) / 255.0
    np.testing.assert_allclose(tf.nn.softmax(model(images)).numpy(), out["probabilities"].numpy(), atol=1e-5)


def test_another_checkpoint_never_replaces_the_runs_export_unless_asked(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = read_json(run / "export" / "export.json")["source"]["checkpoint"]
    with pytest.raises(UserError, match=r"export holds the export of .*best/ckpt-\d+; exporting .*ckpt-\d+ there "
                                        r"would replace it. Export elsewhere with --export_dir=DIR, or replace it "
                                        r"with --force"):
        export.export_checkpoint(str(run), "latest")
    assert read_json(run / "export" / "export.json")["source"]["checkpoint"] == before
    gin.clear_config()
    export.export_checkpoint(str(run), "best")  # The same checkpoint again: allowed.
    gin.clear_config()
    assert export.export_checkpoint(str(run), "latest", force=True)["source"]["kind"] == "latest"


def test_latest_and_path_checkpoints(trained_run, tmp_path):
    latest = export.export_checkpoint(trained_run, "latest", export_dir=str(tmp_path / "latest"))
    assert latest["source"]["kind"] == "latest" and latest["source"]["step"] == LATEST_STEP
    gin.clear_config()
    path = os.path.join(trained_run, "checkpoints", f"ckpt-{LATEST_STEP}")
    by_path = export.export_checkpoint(trained_run, path, export_dir=str(tmp_path / "path"))
    assert by_path["source"] == {**latest["source"], "kind": "path"}
    assert latest["source"]["val_top1"] == pytest.approx(0.3) and latest["source"]["best_top1"] == pytest.approx(0.9)
    with pytest.raises(UserError, match=r"ckpt-7.*neither 'best', 'latest' nor a checkpoint"):
        checkpoints.find_checkpoint(trained_run, os.path.join(trained_run, "checkpoints", "ckpt-7"))


def test_no_run_or_no_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=rf"No operative_config.gin in {tmp_path}"):
        export.export_checkpoint(str(tmp_path))
    with pytest.raises(UserError, match=r"No 'best' checkpoint in .*best.*--checkpoint=latest"):
        checkpoints.find_checkpoint(str(tmp_path), "best")


def test_export_needs_no_dataset_and_a_damaged_data_json_is_one_line(trained_run, tmp_path):
    """The classes and the preprocessing come from the run's data.json, not from the dataset."""
    run = tmp_path / "moved_run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("export"))
    config_path = run / "operative_config.gin"
    text = config_path.read_text()
    config_path.write_text("\n".join(f"DATA_DIR = '{tmp_path}/gone'" if line.startswith("DATA_DIR =") else line
                                     for line in text.splitlines()))
    meta = export.export_checkpoint(str(run))
    assert meta["wnids"] == read_json(os.path.join(trained_run, "export", "classes.json"))["wnids"]
    assert os.path.isdir(run / "export" / "saved_model") and not os.path.exists(f"{tmp_path}/gone")
    gin.clear_config()
    (run / "data.json").write_text('{"source": {"kind": "tiny_imagenet"}, "class_ids": [')
    with pytest.raises(UserError, match=r"Cannot read .*data.json .*damaged. Rerun the same training command"):
        export.export_checkpoint(str(run))
    (run / "data.json").unlink()
    with pytest.raises(UserError, match=r"No data.json in .*moved_run"):
        export.export_checkpoint(str(run))


# --- export_model: atomic replacement. ---------------------------------------------


def test_failed_export_keeps_the_previous_one(tmp_path, monkeypatch):
    export_dir = tmp_path / "export"
    export_tiny(export_dir, source="first")
    before = sorted(os.listdir(export_dir))
    real_write_json = export._write_json

    def disk_full(path, value):
        if path.endswith("export.json"):  # After the SavedModel, model.keras and classes.json.
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real_write_json(path, value)

    monkeypatch.setattr(export, "_write_json", disk_full)
    with pytest.raises(UserError) as err:
        export_tiny(export_dir, source="second")
    message = str(err.value)
    assert str(export_dir) in message and "No space left on device" in message and "\n" not in message
    assert sorted(os.listdir(export_dir)) == before
    assert read_json(export_dir / "export.json")["source"] == "first"
    assert os.listdir(tmp_path) == ["export"]  # No temporary directory left.


def test_stale_partial_is_removed_and_a_killed_swap_is_undone(tmp_path):
    export_dir = tmp_path / "export"
    stale = tmp_path / f"partial.export-{dead_pid()}"
    os.makedirs(stale / "saved_model")
    export_tiny(export_dir, source="first")
    assert not stale.exists() and os.listdir(tmp_path) == ["export"]

    # Killed between moving the old export away and moving the new one in: the old one comes back first.
    previous = tmp_path / f"previous.export-{dead_pid()}"
    os.rename(export_dir, previous)
    os.makedirs(tmp_path / f"partial.export-{dead_pid()}")
    with pytest.raises(UserError):  # (Fails on purpose: 2 wnids for 3 outputs.) Nothing is touched.
        export.export_model(tiny_model(), 8, ["a", "b"], ["A", "B"], str(export_dir))
    export_tiny(export_dir, source="second")
    assert os.listdir(tmp_path) == ["export"]
    assert read_json(export_dir / "export.json")["source"] == "second"


def test_a_swap_killed_midway_never_leaves_the_export_missing(tmp_path, monkeypatch):
    export_dir = tmp_path / "export"
    export_tiny(export_dir, source="first")
    exchange = export._exchange

    def exchange_then_die(a, b):
        assert exchange(a, b)  # (Linux: renameat2 RENAME_EXCHANGE.)
        assert read_json(export_dir / "export.json")["source"] == "second"  # In place, the old one beside it.
        raise KeyboardInterrupt  # Killed before the old export is removed.

    monkeypatch.setattr(export, "_exchange", exchange_then_die)
    with pytest.raises(KeyboardInterrupt):
        export_tiny(export_dir, source="second")
    assert read_json(export_dir / "export.json")["source"] == "second"
    monkeypatch.undo()
    export_tiny(export_dir, source="third")  # Removes the leftover (the old export).
    assert os.listdir(tmp_path) == ["export"] and read_json(export_dir / "export.json")["source"] == "third"


def test_classes_must_match_the_network(tmp_path):
    with pytest.raises(UserError, match=r"outputs 3 classes but 2 wnids and 3 class names"):
        export.export_model(tiny_model(), Preprocessing(8), ["a", "b"], ["A", "B", "C"], str(tmp_path / "e"))


# --- The command line. ----------------------------------------------------------------


def run_export(*args):
    return subprocess.run([sys.executable, "-m", "trainer.export", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300, check=False)


def test_cli_help_and_one_line_error(tmp_path):
    result = run_export("--help")
    assert result.returncode == 0 and "--checkpoint" in result.stdout + result.stderr
    result = run_export(f"--model_dir={tmp_path}")
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "operative_config.gin" in errors[0] and "Traceback" not in result.stderr


def test_export_trained_under_mixed_precision_exports_float32(trained_run, tmp_path):
    """As the trainer calls it at a phase's end: the gin config in force, maybe a mixed-precision policy."""
    config.parse_gin([os.path.join(trained_run, "operative_config.gin")])
    data = pipeline.data()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        meta = export.export_trained(trained_run, data, export_dir=str(tmp_path / "export"))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert meta["source"]["step"] == BEST_STEP
    model = keras.saving.load_model(tmp_path / "export" / "model.keras")
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}


@pytest.mark.parametrize("resize, mean, std", [("nearest", (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)), ("area", None, None)])
def test_signature_prepares_images_as_the_evaluation_pipeline(tmp_path, synthetic_dir, resize, mean, std):
    """The signature on raw JPEG bytes == the network on `Data.eval('val')`: resize method, antialias, mean/std."""
    keras.utils.set_random_seed(2)
    model = tiny_model(num_classes=5, size=8)
    reader = TinyImageNet(synthetic_dir)
    data = pipeline.Data(reader, Preprocessing(8, resize, mean, std), batch_size=50)
    meta = export.export_model(model, data.preprocess, reader.wnids, reader.class_names, str(tmp_path / "e"))
    assert meta["resize_method"] == resize and meta["antialias"] == (resize != "nearest")
    assert meta["mean"] == (None if mean is None else list(mean))
    assert meta["std"] == (None if std is None else list(std))
    [(images, _)] = list(data.eval("val"))
    files = reader.files("val")[0]
    serve = tf.saved_model.load(str(tmp_path / "e" / "saved_model")).signatures["serving_default"]
    served = serve(images=tf.constant([tf.io.read_file(f).numpy() for f in files]))["probabilities"].numpy()
    np.testing.assert_allclose(served, tf.nn.softmax(model(images)).numpy(), atol=1e-6)
