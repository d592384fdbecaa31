"""Any file system: a dataset and a model directory on TensorFlow's in-memory `ram://`, the stand-in for gs://.

Every read and write of the data and of the model directory goes through
`tf.io.gfile`, so a run that works on `ram://` (nothing of it on the local
disk) works on a bucket as it does for TensorFlow itself.
"""

import json
import os
import re

import gin
import pytest
import tensorflow as tf
from helpers import train_in_process

from trainer.data import synthetic


def _read(path):
    with tf.io.gfile.GFile(path) as f:
        return f.read()


@pytest.mark.slow
def test_train_resume_evaluate_export_and_predict_on_ram(train_base_gin, tmp_path, monkeypatch, caplog):
    from trainer import predict
    from trainer.evaluation import evaluator

    caplog.set_level("INFO", logger="absl")
    monkeypatch.chdir(tmp_path)  # Anything written to a relative local path would show up here.
    data_dir, model_dir = "ram://bucket/tiny-imagenet-200", "ram://bucket/runs/r"
    synthetic.write_synthetic(data_dir, num_classes=3, per_class=20, val_per_class=6, test_images=4, image_size=32)
    bindings = [f"DATA_DIR = '{data_dir}'", "NUM_CLASSES = 3", "BATCH_SIZE = 10", "EPOCHS = 2",
                "trainer.train.export = True", "trainer.train.evaluate_best = True"]
    assert train_in_process(train_base_gin, model_dir, *bindings, stop_after_steps=4) is None  # 6 steps an epoch.
    assert tf.train.latest_checkpoint(f"{model_dir}/checkpoints").endswith("ckpt-4")
    best = train_in_process(train_base_gin, model_dir, *bindings)  # Resumes at step 4.
    assert best is not None and best["step"] in (6, 12)
    # 3 classes: the 'top5' metric is top-3, and the epoch line says so.
    assert re.search(r"epoch 2/2 done in .* top1 [0-9.]+ top3 [0-9.]+ \(18 images\)", caplog.text), caplog.text
    rows = _read(f"{model_dir}/metrics.csv").splitlines()
    assert len(rows) == 3 and rows[1].split(",")[0] == "1" and rows[2].split(",")[0] == "2"  # Once each.
    data = json.loads(_read(f"{model_dir}/data.json"))
    assert data["source"] == {"kind": "tiny_imagenet", "location": data_dir,
                              "module": "trainer.data.sources.tiny_imagenet"}
    assert data["preprocessing"]["image_size"] == 32
    for name in ("operative_config.gin", "settings.json", "data_report.json", "export/saved_model/saved_model.pb",
                 "export/export.json", f"eval/best-{best['step']}/report.json"):
        assert tf.io.gfile.exists(f"{model_dir}/{name}"), name
    assert tf.io.gfile.glob(f"{model_dir}/train/events.out.tfevents.*")

    gin.clear_config()
    from trainer import config
    config.parse_gin([train_base_gin], bindings, model_dir=model_dir)
    report = evaluator.evaluate_model_dir(model_dir, "latest")
    assert report["data"]["num_scored"] == 18 and tf.io.gfile.exists(f"{model_dir}/eval/ckpt-12/report.md")

    predictor = predict.Predictor(predict.find_export(model_dir))
    source = predict.open_split_source(model_dir)
    predictions, failures = predict.predict_split(predictor, source, "test", f"{model_dir}/predictions_test.txt")
    assert len(predictions) == 4 and not failures
    assert len(_read(f"{model_dir}/predictions_test.txt").splitlines()) == 4
    from trainer import compare
    [row] = compare.compare([model_dir], compute_plan=False)
    assert row["val_top1"] == pytest.approx(best["val_top1"])
    assert os.listdir(tmp_path) == []  # Nothing landed on the local disk.
