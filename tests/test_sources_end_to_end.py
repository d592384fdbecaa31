"""The same small dataset as Tiny ImageNet's layout, as class folders and as TFRecord shards, in memory or streamed:
the trainer, evaluation, export and predict work the same on each, and learn as well from each."""

import json
import os

import gin
import keras
import pytest

import helpers
from trainer import config
from trainer import predict
from trainer import train as train_lib
from trainer.data import convert

BINDINGS = ["EPOCHS = 3"]
EXPORT_AND_EVALUATE = ("trainer.train.export = True", "trainer.train.evaluate_best = True")  # Read for two sources.


@pytest.fixture(scope="module")
def layouts(train_synthetic_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    folders = helpers.write_image_folder(train_synthetic_dir, str(root / "folders"))
    shards = str(root / "shards")
    convert.convert(train_synthetic_dir, shards, shards=3)
    return {"tiny_imagenet": train_synthetic_dir, "image_folder": folders, "tfrecord": shards}


def _train(base_gin, model_dir, extra_gin=(), bindings=(), **kwargs):
    gin.clear_config()
    config.parse_gin([base_gin, *extra_gin], [*BINDINGS, *bindings], model_dir=str(model_dir))
    try:
        return train_lib.train(**kwargs)
    finally:
        gin.clear_config()
        keras.backend.clear_session()


@pytest.fixture(scope="module")
def runs(train_base_gin, layouts, tmp_path_factory):
    """One 3-epoch run a way of feeding the data (exported and evaluated for the two other sources; the small
    budget's, which only shows the choice, stops after its first step); {name: (model_dir, best row, log)}."""
    import logging

    root = tmp_path_factory.mktemp("source_runs")
    ways = {
        "tiny_imagenet": ((), ()),
        "image_folder": (("gin/data/image_folder.gin",), (f"DATA_DIR = '{layouts['image_folder']}'",
                                                          *EXPORT_AND_EVALUATE)),
        "tfrecord": (("gin/data/tfrecord.gin",), (f"DATA_DIR = '{layouts['tfrecord']}'", *EXPORT_AND_EVALUATE)),
        "streamed": ((), ("trainer.data.in_memory = False", "trainer.data.shuffle_buffer = 100")),
        "small_budget": ((), ("trainer.data.memory_budget = 100000",)),
    }
    stop = {"small_budget": {"stop_after_steps": 1}}
    results = {}
    logger = logging.getLogger("absl")
    for name, (extra_gin, bindings) in ways.items():
        records = []
        handler = logging.Handler()
        handler.emit = lambda record, records=records: records.append(record.getMessage())
        logger.addHandler(handler)
        level = logger.level
        logger.setLevel("INFO")
        try:
            best = _train(train_base_gin, root / name, extra_gin, bindings, **stop.get(name, {}))
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
        results[name] = (root / name, best, "\n".join(records))
    return results


@pytest.mark.slow
def test_every_source_counts_the_same_images_and_learns_as_well(runs):
    counts = {name: json.loads((model_dir / "data_report.json").read_text())["splits"]
              for name, (model_dir, _, _) in runs.items()}
    for name, splits in counts.items():
        assert {s: v["images"] for s, v in splits.items()} == {"train": 300, "val": 100, "test": 5}, name
    top1 = {name: best["val_top1"] for name, (_, best, _) in runs.items() if name != "small_budget"}
    assert min(top1.values()) >= 0.35, top1  # Chance: 0.2 (3 short epochs: measured 0.45 to 0.51).
    for name, value in top1.items():
        assert abs(value - top1["tiny_imagenet"]) <= 0.15, top1
    for name, (model_dir, _, log) in runs.items():
        assert "Dataset:   " in log and "300 train / 100 val images" in log, name
    assert "(image_folder: 5 classes" in runs["image_folder"][2] and "(tfrecord: 5 classes" in runs["tfrecord"][2]
    assert "Feeding:   in memory: decoded training set 900.0 KB <= budget" in runs["tiny_imagenet"][2]
    assert "Strategy:  default (one device, no tf.distribute strategy), 1 replica\n" in runs["tiny_imagenet"][2]


@pytest.mark.slow
def test_streaming_is_chosen_by_the_budget_or_forced_and_says_why(runs):
    assert "Feeding:   streaming: forced by trainer.data.in_memory = False (decoded training set 900.0 KB)" in \
        runs["streamed"][2]
    assert "Feeding:   streaming: decoded training set 900.0 KB > budget 97.7 KB (trainer.data.memory_budget)" in \
        runs["small_budget"][2]
    assert "Decoded 300 training images into memory" not in runs["small_budget"][2]
    assert "Decoded 300 training images into memory (900.0 KB)." in runs["tiny_imagenet"][2]  # As the banner says.


@pytest.mark.slow
@pytest.mark.parametrize("name", ["image_folder", "tfrecord"])
def test_evaluation_export_and_predict_work_on_every_source(runs, train_synthetic_dir, name):
    from trainer.data.sources.tiny_imagenet import TinyImageNet

    model_dir, best, _ = runs[name]
    tiny = TinyImageNet(train_synthetic_dir)
    classes = json.loads((model_dir / "export" / "classes.json").read_text())
    assert classes == {"wnids": tiny.wnids, "names": tiny.class_names}
    report = json.loads((model_dir / "eval" / f"best-{best['step']}" / "report.json").read_text())
    assert report["data"]["num_scored"] == 100 and report["data"]["source"]["kind"] == name
    assert abs(report["metrics"]["top1"] - best["val_top1"]) <= 1e-6  # The evaluator scores what training did.
    rows = (model_dir / "eval" / f"best-{best['step']}" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 101 and rows[1].split(",")[0].endswith(".JPEG")  # Named by example id.
    predictor = predict.Predictor(predict.find_export(str(model_dir)))
    source = predict.open_split_source(str(model_dir))  # The run's own dataset, from its data.json.
    output = str(model_dir / "val.txt")
    predictions, failures = predict.predict_split(predictor, source, "val", output)
    assert len(predictions) == 100 and not failures
    truth = {os.path.basename(i): tiny.wnids[label] for i, label in zip(*source.listing("val"))}
    right = sum(truth[p.file] == p.wnids[0] for p in predictions)
    assert right / 100 == pytest.approx(report["metrics"]["top1"], abs=0.011)
