"""A data source of one's own, outside the trainer package: one module and one gin file that imports it
(tests/plugin_source/), nothing of the trainer changed. Training reads it through the gin file's `import`; a later
process that reads only the run's data.json (predict --split) imports the module the run recorded."""

import json
import os
import shutil
import subprocess
import sys

import gin
import pytest

import helpers
from trainer import config, registry
from trainer.data import sources
from trainer.data.sources.tiny_imagenet import TinyImageNet
from trainer.errors import UserError

PLUGIN = os.path.join(helpers.REPO, "tests", "plugin_source")
GIN = os.path.join(PLUGIN, "csv_list.gin")


def _env(with_plugin=True):
    env = helpers.env()
    if with_plugin:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PLUGIN, env.get("PYTHONPATH")) if p)
    return env


@pytest.fixture(scope="module")
def csv_dir(train_synthetic_dir, tmp_path_factory):
    """The trainer's synthetic dataset as images in one folder a split plus train.csv / val.csv."""
    root = tmp_path_factory.mktemp("csv") / "data"
    tiny = TinyImageNet(train_synthetic_dir)
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        rows = []
        for path, label in zip(*tiny.files(split)):
            name = f"{split}/{os.path.basename(path)}"
            shutil.copyfile(path, root / name)
            rows.append(f"{name},{tiny.wnids[label]}\n")
        (root / f"{split}.csv").write_text("".join(rows))
    return root


@pytest.fixture(scope="module")
def plugin_run(train_base_gin, csv_dir, tmp_path_factory):
    """A run of `python -m trainer.main` on the csv_list source (exported): (model_dir, stderr)."""
    model_dir = tmp_path_factory.mktemp("plugin") / "run"
    command = helpers.main_command(train_base_gin, model_dir, f"--gin_file={GIN}", f"DATA_DIR = '{csv_dir}'",
                                   "EPOCHS = 2", "trainer.train.export = True")
    result = subprocess.run(command, cwd=helpers.REPO, env=_env(), capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return model_dir, result.stderr


@pytest.mark.slow
def test_a_source_of_ones_own_trains_and_is_found_again_from_the_run(plugin_run, csv_dir):
    model_dir, log = plugin_run
    assert f"Dataset:   {csv_dir} (csv_list: 5 classes, 300 train / 100 val images)" in log
    report = json.loads((model_dir / "data_report.json").read_text())
    assert {s: v["images"] for s, v in report["splits"].items()} == {"train": 300, "val": 100}
    rows = helpers.csv_rows(model_dir)
    assert len(rows) == 2 and float(rows[-1]["val_top1"]) > 0.3  # Chance: 0.2.
    # The run's settings name the module; its operative config imports it (evaluate and export re-read that).
    assert json.loads((model_dir / "data.json").read_text())["source"]["module"] == "csv_list_source"
    assert "import csv_list_source" in (model_dir / "operative_config.gin").read_text().splitlines()
    # New processes: evaluate reads the run's operative config, predict only its data.json (with --data_dir, which
    # the layouts the trainer knows would take for class folders: the run's own kind is kept).
    for tool, *flags in (("evaluate", "--checkpoint=latest"),
                         ("predict", "--split=val", f"--output={model_dir}/val.txt", f"--data_dir={csv_dir}")):
        result = subprocess.run([sys.executable, "-m", f"trainer.{tool}", f"--model_dir={model_dir}", *flags],
                                cwd=helpers.REPO, env=_env(), capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads((model_dir / "eval" / f"ckpt-{rows[-1]['global_step']}" / "report.json").read_text())
    assert evaluated["data"]["source"]["kind"] == "csv_list" and evaluated["data"]["num_scored"] == 100
    assert evaluated["metrics"]["top1"] == pytest.approx(float(rows[-1]["val_top1"]), abs=1e-6)
    output = model_dir / "val.txt"
    lines = output.read_text().splitlines()
    truth = dict(line.strip().split(",") for line in (csv_dir / "val.csv").read_text().splitlines())
    assert len(lines) == 100
    right = sum(truth[f"val/{name}"] == wnid for name, wnid in (line.split(" ") for line in lines))
    best = max(float(r["val_top1"]) for r in rows)  # The export is of the best epoch.
    assert right / 100 == pytest.approx(best, abs=0.02)  # As the run's own evaluation.


def test_a_module_that_cannot_be_imported_is_one_line(tmp_path, monkeypatch):
    """Without the module's directory on the path: the gin file's import, and a run's recorded module (what
    predict --split reopens), each say what to do in one line; so does a module whose own import fails."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if os.path.abspath(p) != PLUGIN])
    assert "csv_list_source" not in sys.modules
    with pytest.raises(UserError) as error:
        config.parse_gin([GIN])
    assert helpers.one_line(error.value) == (
        f"Invalid gin configuration: {GIN}, line 3: csv_list_source cannot be imported (No module named "
        "'csv_list_source'): put the directory holding it on PYTHONPATH, or install its package.")
    gin.clear_config()
    description = {"kind": "csv_list", "location": str(tmp_path), "module": "csv_list_source"}
    with pytest.raises(UserError, match=r"^The data source 'csv_list' is defined in csv_list_source, which cannot be "
                                        r"imported \(No module named 'csv_list_source'\): put the directory holding "
                                        r"it on PYTHONPATH, or install its package\.$"):
        sources.open_source(description)
    (tmp_path / "needs_more.py").write_text("import not_installed_anywhere\n")
    (tmp_path / "registers_nothing.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=r"^The data source 'csv_list' is defined in needs_more, which imports "
                                        r"not_installed_anywhere, which is not installed \(No module named "
                                        r"'not_installed_anywhere'\): install it\.$"):
        sources.open_source({**description, "module": "needs_more"})
    with pytest.raises(UserError, match=r"^The data source 'csv_list' is defined in registers_nothing, which was "
                                        r"imported but registers no trainer\.sources\.csv_list\.$"):
        sources.open_source({**description, "module": "registers_nothing"})


def test_a_source_that_could_not_be_reopened_is_refused_before_training():
    """A run reopens its source by kind, through the gin factory in the module of the source's class."""
    class Unregistered(sources.FileSource):
        kind = "unregistered"

    class Elsewhere(sources.FileSource):
        kind = "image_folder"

    with pytest.raises(UserError, match=r"^The data source Unregistered has kind 'unregistered', but none is "
                                        r"registered: a run reopens its source by kind, so name its gin factory "
                                        rf"trainer\.sources\.unregistered and define it in {__name__}, next to"):
        sources.check_reopenable(Unregistered())
    with pytest.raises(UserError, match=r"but that one is defined in trainer\.data\.sources\.image_folder: "):
        sources.check_reopenable(Elsewhere())
    sources.check_reopenable(TinyImageNet.__new__(TinyImageNet))  # The shipped ones pass.
    with pytest.raises(UserError, match=rf"^{__name__} defines trainer\.sources\.image_folder, which "
                                        r"trainer\.data\.sources\.image_folder already defines: give it another "
                                        r"name\.$"):
        registry.configurable("trainer.sources", "image_folder")(lambda data_dir: None)


def test_a_run_recorded_before_sources_named_their_module_reopens_its_source(synthetic_dir):
    """data.json of a run from before `module` was recorded: the shipped sources open by kind alone."""
    source = sources.open_source({"kind": "tiny_imagenet", "location": synthetic_dir})
    assert source.kind == "tiny_imagenet" and source.count("val") == 50
    with pytest.raises(UserError, match=r"^Unknown data source 'csv_list': expected one of image_folder, tfrecord, "
                                        r"tiny_imagenet\.$"):
        sources.open_source({"kind": "csv_list", "location": synthetic_dir})
