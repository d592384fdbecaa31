"""trainer.compare (the table of runs) and the TensorBoard comparison summaries (HParams, custom scalar layout)."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import helpers
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata

from trainer import compare, config, summaries
from trainer.errors import UserError

pytestmark = pytest.mark.slow  # Trains or starts TensorFlow in subprocesses: CI runs these.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, finished_run):
    """Two tiny runs of the small network: 'a' (batch 20, 2 epochs) and 'b' (batch 30, 1 epoch)."""
    root = tmp_path_factory.mktemp("runs")
    shutil.copytree(finished_run("EPOCHS = 2"), root / "a")
    shutil.copytree(finished_run("BATCH_SIZE = 30"), root / "b")
    bogus = root / "bogus"
    bogus.mkdir()
    (bogus / "notes.txt").write_text("not a run")
    return root


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _best(run_dir):
    rows = _csv(os.path.join(run_dir, "metrics.csv"))
    best = max(rows, key=lambda r: (float(r["val_top1"]), -int(r["step"])))
    return float(best["val_top1"]), int(best["epoch"]), len(rows)


def test_compare_rows_match_metrics_csv(runs):
    warnings = []
    rows = compare.compare([str(runs / "a"), str(runs / "b"), str(runs / "bogus")], warn=warnings.append)
    assert len(warnings) == 1 and "bogus" in warnings[0] and "not a training run" in warnings[0]
    by_name = {r["run"]: r for r in rows}
    assert set(by_name) == {"a", "b"}
    for name, batch in (("a", 20), ("b", 30)):
        row = by_name[name]
        top1, epoch, epochs = _best(runs / name)
        assert row["val_top1"] == pytest.approx(top1) and row["best_epoch"] == epoch and row["epochs"] == epochs
        assert (row["network"], row["image_size"], row["batch_size"]) == ("small", 32, batch)
        assert row["params"] > 0 and row["macs"] > 0 and row["epoch_time"] > 0 and row["images_per_second"] > 0
    assert by_name["a"]["epochs"] == 2 and by_name["b"]["epochs"] == 1
    assert (by_name["a"]["params"], by_name["a"]["macs"]) == (by_name["b"]["params"], by_name["b"]["macs"])
    assert [r["val_top1"] for r in rows] == sorted((r["val_top1"] for r in rows), reverse=True)
    # A directory of runs stands for its runs (the bogus one among them is not a run, and not warned about).
    assert sorted(r["run"] for r in compare.compare([str(runs)], compute_plan=False, warn=warnings.append)) == \
        ["a", "b"]
    assert len(warnings) == 1


def test_command_line_prints_both_runs_and_writes_markdown(runs, tmp_path):
    out = tmp_path / "table.md"
    proc = subprocess.run([sys.executable, "-m", "trainer.compare", str(runs / "a"), str(runs / "b"),
                           str(runs / "bogus"), f"--output={out}"], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("warning:")] == [
        f"warning: {runs / 'bogus'} is not a training run (no metrics.csv or operative_config.gin): skipped."]
    lines = proc.stdout.splitlines()
    header = lines[0].split()
    assert header[:3] == ["run", "network", "params"] and set(lines[1]) == {"-", " "}
    for name in ("a", "b"):
        top1, epoch, epochs = _best(runs / name)
        cells = next(line for line in lines if line.startswith(name + " ")).split()
        assert cells[1] == "small" and f"{top1:.4f}" in cells and cells[9] == str(epoch) and cells[6] == str(epochs)
    # The markdown table: a header, the alignment row, a row per run, every row with the same number of cells.
    table = out.read_text().splitlines()
    assert len(table) == 4 and all(line.startswith("| ") and line.endswith(" |") for line in table[:1] + table[2:])
    assert re.fullmatch(r"\|(:?-{3,}:?\|)+", table[1])
    cells = [len(line.strip("|").split("|")) for line in table]
    assert len(set(cells)) == 1 and cells[0] == len(compare.COLUMNS) + 2
    # The settings that differ between the runs are columns (issue 16 item 3), and only those.
    assert table[0].endswith("| BATCH_SIZE | EPOCHS |")
    assert {tuple(line.strip("|").split("|")[i].strip() for i in (0, -2, -1)) for line in table[2:]} == {
        ("a", "20", "2"), ("b", "30", "1")}
    assert {table[2].split("|")[1].strip(), table[3].split("|")[1].strip()} == {"a", "b"}


def test_no_run_is_an_error(tmp_path):
    with pytest.raises(UserError, match="No training run"):
        compare.compare([str(tmp_path), str(tmp_path / "missing")], warn=lambda _: None)
    proc = subprocess.run([sys.executable, "-m", "trainer.compare", str(tmp_path / "missing"), "--markdown"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines()[0].startswith("warning: ") and "does not exist" in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("error: No training run")


def _fake_run(root, name, val_top1, times, batch=50, recorded=True):
    """A run directory without training: metrics.csv (100 steps an epoch), operative_config.gin, run.json."""
    run = root / name
    run.mkdir()
    fields = ["epoch", "step", "global_step", "time", "learning_rate", "train_loss", "train_top1", "train_top5",
              "val_loss", "val_top1", "val_top5", "val_count"]
    with open(run / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for i, (top1, seconds) in enumerate(zip(val_top1, times)):
            writer.writerow([31 + i, 100 * (i + 1), 3100 + 100 * (i + 1), seconds, 0.001, 1.0, 0.5, 0.8, 1.2, top1,
                             min(1.0, top1 + 0.2), 10000])
    (run / "operative_config.gin").write_text(
        f"# Macros:\nBATCH_SIZE = {batch}\nIMAGE_SIZE = 64\n\n"
        "data.batch_size = %BATCH_SIZE\ndata.image_size = %IMAGE_SIZE\n"
        "network.blocks = \\\n    [{'kind': 'conv', 'name': 'stem'},\n     {'kind': 'classifier', 'name': 'head'}]\n"
        f"network.name = 'net_{name}'\ntrain.data = @trainer.data\n")
    if recorded:
        (run / "run.json").write_text(json.dumps({"network": f"net_{name}", "params": 1_234_567,
                                                  "macs": 456_700_000, "image_size": 64, "batch_size": batch}))
    return run


def test_figures_sorting_and_run_json(tmp_path):
    _fake_run(tmp_path, "x", [0.30, 0.42, 0.42, 0.41], [50.0, 10.0, 12.0, 14.0])
    _fake_run(tmp_path, "y", [0.50], [20.0], batch=100)
    _fake_run(tmp_path, "z", [], [], recorded=False)  # Started, no epoch done; params unknown (not measured).
    rows = compare.compare([str(tmp_path / "*")], compute_plan=False, warn=pytest.fail)
    assert [r["run"] for r in rows] == ["y", "x", "z"]  # Best top-1 first, the run without one last.
    x = rows[1]
    # Best: the earliest of equals; the first epoch (tracing) is left out of the speed.
    assert (x["val_top1"], x["val_top5"], x["best_epoch"], x["epochs"]) == (0.42, pytest.approx(0.62), 32, 4)
    assert x["epoch_time"] == pytest.approx(12.0) and x["images_per_second"] == pytest.approx(50 * 300 / 36.0)
    assert (x["network"], x["params"], x["macs"], x["image_size"]) == ("net_x", 1_234_567, 456_700_000, 64)
    assert rows[0]["epoch_time"] == 20.0 and rows[0]["images_per_second"] == pytest.approx(500.0)
    assert (rows[2]["network"], rows[2]["batch_size"], rows[2]["params"], rows[2]["epochs"]) == ("net_z", 50, None, 0)
    assert [r["run"] for r in compare.compare([str(tmp_path)], sort="run", compute_plan=False)] == ["x", "y", "z"]
    assert [r["run"] for r in compare.compare([str(tmp_path)], sort="epoch_time", reverse=True,
                                              compute_plan=False)] == ["x", "y", "z"]
    with pytest.raises(UserError, match="--sort=speed"):
        compare.compare([str(tmp_path)], sort="speed")
    table = compare.format_table(rows).splitlines()
    assert len({len(line) for line in table[:2]}) == 1 and "1,234,567" in table[3] and "456.7" in table[3]
    assert table[4].split()[2:4] == ["-", "-"]
    markdown = compare.format_markdown(rows).splitlines()
    assert markdown[1].startswith("|:---|:---|---:|") and "| y | net_y |" in markdown[2]


def _events(log_dir, exclude=()):
    """(tag, plugin name, plugin content, string tensor) of the summaries in the event files directly in `log_dir`
    (but those in `exclude`)."""
    found = []
    for path in set(helpers.event_files(log_dir, "")) - set(exclude):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                found.append((value.tag, value.metadata.plugin_data.plugin_name, value.metadata.plugin_data.content,
                              value.tensor.string_val[0] if value.tensor.string_val else None))
    return found


def _scalar_tags(log_dir):
    accumulator = event_accumulator.EventAccumulator(log_dir)
    accumulator.Reload()
    return set(accumulator.Tags()["tensors"]) | set(accumulator.Tags()["scalars"])


def test_hparams_name_the_run_and_the_val_scalars(runs):
    run = str(runs / "a")
    config.parse_gin([os.path.join(run, "operative_config.gin")])
    values = summaries.gin_hparams()
    assert {k: values[k] for k in ("BATCH_SIZE", "EPOCHS", "IMAGE_SIZE", "AUGMENT", "network", "optimizer",
                                   "schedule", "learning_rate")} == {
        "BATCH_SIZE": 20, "EPOCHS": 2, "IMAGE_SIZE": 32, "AUGMENT": "None", "network": "small",
        "optimizer": "adam", "schedule": "constant", "learning_rate": 0.001}
    assert "MODEL_DIR" not in values
    trainers = helpers.event_files(run, "")  # The trainer's own session, written where the run was trained (conftest).
    summaries.hparams(run, values)
    events = {tag: (plugin, content) for tag, plugin, content, _ in _events(run, exclude=trainers)}
    assert events[hparams_metadata.SESSION_START_INFO_TAG][0] == "hparams"
    start = hparams_metadata.parse_session_start_info_plugin_data(events[hparams_metadata.SESSION_START_INFO_TAG][1])
    # Integers as text (TensorBoard shows a float64 20 as 20.000); the run's name relative to the working directory.
    assert start.hparams["network"].string_value == "small" and start.hparams["BATCH_SIZE"].string_value == "20"
    assert start.group_name == summaries.trial_name(run) and not os.path.isabs(summaries.trial_name("runs/x"))
    experiment = hparams_metadata.parse_experiment_plugin_data(events[hparams_metadata.EXPERIMENT_TAG][1])
    assert {h.name for h in experiment.hparam_infos} == set(values)
    infos = {h.name: h for h in experiment.hparam_infos}
    assert [h.name for h in experiment.hparam_infos][:2] == ["network", "AUGMENT"]  # The telling columns first.
    # TensorBoard shows the first 5 `differs` columns: the network among them, DATA_DIR (the same everywhere) not.
    assert {k for k, h in infos.items() if h.differs} == {"network", "AUGMENT", "IMAGE_SIZE", "BATCH_SIZE", "EPOCHS"}
    assert "count" not in _scalar_tags(os.path.join(run, "val")) | _scalar_tags(os.path.join(run, "train"))
    metrics = [(m.name.group, m.name.tag) for m in experiment.metric_infos]
    assert metrics == [("val", "loss"), ("val", "top1"), ("val", "top5")]
    # Each metric is a scalar the trainer wrote: tag 'top1' in the run's val/ directory.
    assert {tag for _, tag in metrics} <= _scalar_tags(os.path.join(run, "val"))


def test_scalar_layout_charts_the_trainer_scalars(runs, tmp_path):
    layout = summaries.scalar_layout(str(tmp_path))
    [(tag, plugin, _, content)] = _events(str(tmp_path))  # The layout is the summary's string tensor.
    assert (tag, plugin) == ("custom_scalars__config__", "custom_scalars")
    read = layout_pb2.Layout()
    read.ParseFromString(content)
    assert read == layout
    assert [c.title for c in read.category] == ["metrics", "speed"]
    charts = [chart for category in read.category for chart in category.chart]
    assert [chart.title for chart in charts][:4] == ["loss (train, val)", "top-1 (train, val)", "top-5 (train, val)",
                                                     "learning rate"]
    train_tags, val_tags = _scalar_tags(str(runs / "a" / "train")), _scalar_tags(str(runs / "a" / "val"))
    for chart in charts:
        [regex] = chart.multiline.tag
        assert any(re.search(regex, t) for t in train_tags), chart.title  # Every chart has a line to draw.
    for title in ("loss (train, val)", "top-1 (train, val)", "top-5 (train, val)"):  # Train and val together.
        [regex] = next(c for c in charts if c.title == title).multiline.tag
        assert any(re.search(regex, t) for t in val_tags)


def test_settings_that_differ_are_columns(tmp_path):
    """Two runs identical but for AUGMENT and a scoped binding: those two, and only those, are columns."""
    for name, augment, momentum in (("p", "flip(0.5)", 0.9), ("q", None, 0.99)):
        run = _fake_run(tmp_path, name, [0.5], [10.0])
        (run / "operative_config.gin").write_text(
            f"# Macros:\nAUGMENT = {augment!r}\nBATCH_SIZE = 50\nIMAGE_SIZE = 64\nMODEL_DIR = '{run}'\n\n"
            "data.augment = %AUGMENT\ndata.batch_size = %BATCH_SIZE\ndata.image_size = %IMAGE_SIZE\n"
            f"small/batch_norm.momentum = {momentum}\nnetwork.name = 'small'\ntrain.model_dir = %MODEL_DIR\n")
    rows = compare.compare([str(tmp_path)], sort="run", compute_plan=False, warn=pytest.fail)
    assert [r["settings"] for r in rows] == [{"AUGMENT": "flip(0.5)", "small/batch_norm.momentum": "0.9"},
                                             {"AUGMENT": "None", "small/batch_norm.momentum": "0.99"}]
    assert compare.format_markdown(rows).splitlines()[0].endswith("| AUGMENT | small/batch_norm.momentum |")
    assert compare.format_table(rows).splitlines()[2].split()[-2:] == ["flip(0.5)", "0.9"]
    # One run alone: nothing differs, no column.
    assert compare.compare([str(tmp_path / "p")], compute_plan=False)[0]["settings"] == {}


def test_a_binding_to_a_macro_is_left_to_the_macros_column(tmp_path):
    """Two sources, each binding its own setting to a macro only it defines: the macros and the source are columns,
    not the `%MACRO` bindings that repeat them. A binding stays when the macro it names is defined in a run that
    does not bind it (VAL_FRACTION, C), or when it names another macro; lists are compared too."""
    for name, source, extra in (("p", "@tfrecord", "ON_CORRUPT = 'skip'\ntfrecord.on_corrupt = %ON_CORRUPT\n"),
                                ("q", "@image_folder", "image_folder.val_fraction = %VAL_FRACTION\n")):
        run = _fake_run(tmp_path, name, [0.5], [10.0])
        (run / "operative_config.gin").write_text(
            f"VAL_FRACTION = 0.1\nA = 1\nB = 2\ndata.source = {source}\n{extra}"
            f"train.seed = %{'A' if name == 'p' else 'B'}\nnetwork.blocks = [{'1, 2' if name == 'p' else '1, 3'}]\n"
            f"C = {1 if name == 'p' else 2}\n{'optim.warmup = %C' if name == 'p' else ''}\n")
    rows = compare.compare([str(tmp_path)], sort="run", compute_plan=False, warn=pytest.fail)
    assert [r["settings"] for r in rows] == [
        {"C": "1", "ON_CORRUPT": "skip", "data.source": "@tfrecord", "image_folder.val_fraction": "-",
         "network.blocks": "[1, 2]", "optim.warmup": "%C", "train.seed": "%A"},
        {"C": "2", "ON_CORRUPT": "-", "data.source": "@image_folder", "image_folder.val_fraction": "%VAL_FRACTION",
         "network.blocks": "[1, 3]", "optim.warmup": "-", "train.seed": "%B"}]
