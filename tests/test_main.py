"""The command line: gin resolution and errors, the missing-dataset message, one real end-to-end run."""

import fnmatch
import glob
import os
import re
import subprocess
import sys

import gin
import pytest

import helpers

from trainer import config
from trainer.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, cwd=REPO, timeout=600):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", "trainer.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_gin_files_resolve_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = config.resolve_gin_file("gin/phase64.gin")
    assert os.path.isfile(path) and path.endswith(os.path.join("gin", "phase64.gin"))
    config.parse_gin(["gin/phase64.gin"])  # Its include lines resolve too.
    assert gin.query_parameter("%IMAGE_SIZE") == 64


def test_missing_gin_file_names_the_nearest_one():
    with pytest.raises(UserError, match=r"gin/phase64\.gin"):
        config.resolve_gin_file("gin/phase46.gin")


def test_gin_typo_names_file_line_and_nearest_name(tmp_path):
    bad = tmp_path / "typo.gin"
    bad.write_text("include 'gin/phase64.gin'\n\ntrain.epoch = 3\n")
    with pytest.raises(UserError) as err:
        config.parse_gin([str(bad)])
    message = str(err.value)
    assert str(bad) in message and "line 3" in message
    assert "Did you mean 'trainer.train.epochs'?" in message


@pytest.mark.parametrize("binding, message", [
    ("AUGMENT=flip(0.5)", "'flip(0.5)' is not a gin value: quote text, AUGMENT = 'flip(0.5)' (on the command line: "
                          "--gin_bindings=\"AUGMENT = 'flip(0.5)'\")."),
    ("trainer.train.optimizer = trainer.optim.sgd", "'trainer.optim.sgd' names a configurable: write "
                                                    "@trainer.optim.sgd to pass it."),
])
def test_an_unquoted_value_says_how_to_write_it(binding, message):
    with pytest.raises(UserError) as err:
        config.parse_gin(["gin/quickstart.gin"], [binding])
    assert str(err.value) == f"Invalid gin configuration: --gin_bindings='{binding}', line 1: {message}"


def test_later_files_and_bindings_win_and_model_dir_overrides():
    config.parse_gin(["gin/phase32.gin", "gin/phase64.gin"], ["EPOCHS = 2"], model_dir="/tmp/x")
    assert gin.query_parameter("%IMAGE_SIZE") == 64
    assert gin.query_parameter("%EPOCHS") == 2
    assert gin.query_parameter("%MODEL_DIR") == "/tmp/x"


def test_phase64_without_dataset_is_one_paragraph_naming_the_download(tmp_path):
    """In this process, as the bad values below (the command line's one `error:` line: test_wiring_error_...)."""
    with pytest.raises(UserError) as err:
        helpers.train_in_process(os.path.join(REPO, "gin", "phase64.gin"), tmp_path / "run",
                                 f"DATA_DIR='{tmp_path}/none/tiny-imagenet-200'")
    message = helpers.one_line(err.value)
    assert "python -m trainer.data.download" in message and "\n\n" not in message.strip(), message
    assert not os.path.exists(tmp_path / "run"), "a failed start must not create the model directory"


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    """The README's run command, shortened: trains, logs train and val to TensorBoard, learns."""
    from tensorboard.backend.event_processing import event_accumulator

    model_dir = tmp_path / "run"
    result = run_main("--gin_file=gin/quickstart.gin", f"--model_dir={model_dir}",
                      f"--gin_bindings=DATA_DIR='{tmp_path}/synthetic'", "--gin_bindings=EPOCHS = 3",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (model_dir / "operative_config.gin").read_text().count("train.") > 3
    tags = {}
    for split in ("train", "val"):
        [events] = glob.glob(str(model_dir / split / "events.out.tfevents.*"))
        acc = event_accumulator.EventAccumulator(events, size_guidance={"tensors": 0})
        acc.Reload()
        tags[split] = {t: [scalar(e) for e in acc.Tensors(t)] for t in acc.Tags()["tensors"]
                       if acc.SummaryMetadata(t).plugin_data.plugin_name == "scalars"}
    assert {"loss", "top1", "top5", "learning_rate"} <= set(tags["train"])
    assert {"loss", "top1", "top5"} <= set(tags["val"])
    top1 = tags["val"]["top1"]
    assert top1[-1] > 0.3 and top1[-1] > top1[0], top1  # Chance is 0.1 (10 classes); 0.37-0.53 seen here.


def scalar(event):
    import tensorflow as tf

    return float(tf.make_ndarray(event.tensor_proto))


def test_undefined_macro_is_a_clear_error(tmp_path):
    with pytest.raises(UserError) as err:
        helpers.train_in_process(os.path.join(REPO, "gin", "quickstart.gin"), tmp_path / "run",
                                 "trainer.train.epochs = %EPOCH", f"DATA_DIR='{tmp_path}/data'")
    assert "the macro %EPOCH is used but never defined. Did you mean '%EPOCHS'?" in str(err.value)


@pytest.mark.slow
def test_wiring_error_is_one_line_naming_the_block(tmp_path):
    result = run_main("--gin_file=gin/quickstart.gin", f"--gin_bindings=DATA_DIR='{tmp_path}/data'",
                      "--gin_bindings=trainer.network.blocks = [{'name': 'a', 'kind': 'conv', 'filters': 4, "
                      "'inputs': ['nope']}]", f"--model_dir={tmp_path}/run")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [line] = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert line == "error: Block 'a': unknown input 'nope'; inputs must name earlier blocks or 'image'."


@pytest.mark.parametrize("binding, message", [
    ("EPOHCS = 2", "the macro EPOHCS is set but no gin file uses it. Did you mean 'EPOCHS'?"),
    ("EPOCHS = 'three'", "EPOCHS must be an integer in [1, 100000], got 'three'."),
    ("EPOCHS = -1", "EPOCHS must be an integer in [1, 100000], got -1."),
    ("IMAGE_SIZE = '32'", "IMAGE_SIZE must be an integer in [8, 1024], got '32'."),
    ("IMAGE_SIZE = 7", "IMAGE_SIZE must be an integer in [8, 1024], got 7."),
    ("BATCH_SIZE = 0", "BATCH_SIZE must be an integer in [1, 1048576], got 0."),
    ("BATCH_SIZE = -64", "BATCH_SIZE must be an integer in [1, 1048576], got -64."),
    ("trainer.train.epoch = 3", "'trainer.train' has no parameter 'epoch'. Did you mean 'trainer.train.epochs'?"),
])
def test_bad_values_are_one_line_before_anything_is_written(tmp_path, binding, message):
    """In this process (the command line's `error:` line and exit status 1 for a UserError are tested through
    `python -m trainer.main` by test_wiring_error_is_one_line_naming_the_block and the sources' tests)."""
    with pytest.raises(UserError) as err:
        helpers.train_in_process(os.path.join(REPO, "gin", "quickstart.gin"), tmp_path / "run", binding,
                                 f"DATA_DIR='{tmp_path}/data'")
    assert message in str(err.value) and "\n" not in str(err.value).split("\n\n")[0], str(err.value)
    assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "data")


def test_batch_larger_than_the_training_set_names_the_largest(train_base_gin, tmp_path):
    with pytest.raises(UserError) as err:
        helpers.train_in_process(train_base_gin, tmp_path / "r", "BATCH_SIZE = 400")
    assert helpers.one_line(err.value) == (
        "BATCH_SIZE 400 is larger than the training set (300 images): use at most 300.")


def test_help_is_fast_and_lists_the_gin_files_and_macros():
    result = run_main("--help")
    assert result.returncode == 0
    assert "gin/phase64_aug.gin" in result.stdout and "EPOCHS" in result.stdout and "IMAGE_SIZE" in result.stdout
    probe = subprocess.run([sys.executable, "-c", "import sys, runpy; sys.argv = ['x', '--help']\n"
                            "try:\n    runpy.run_module('trainer.main', run_name='__main__')\n"
                            "except SystemExit as e:\n    print('tensorflow' in sys.modules, e.code)"],
                           cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert probe.stdout.strip().splitlines()[-1] == "False 0"


def test_the_readmes_report_glob_matches_the_val_evaluation_only():
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    [pattern] = re.findall(r"^cat runs/quickstart/eval/(\S+)/report\.md", readme, re.M)
    folders = ["best-414", "best-414-train", "best-414-flip", "ckpt-460", "best-1000"]
    assert [f for f in folders if fnmatch.fnmatchcase(f, pattern)] == ["best-414", "best-1000"]


def test_without_tensorflow_installed_the_error_is_pythons_own():
    """The quiet-import hook steps aside when TensorFlow is not installed (it raised an AttributeError from inside
    trainer/__init__.py). `-S` leaves site-packages, and with it TensorFlow, off the path."""
    probe = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {REPO!r})\nimport trainer\n"
                            "try:\n    import tensorflow\nexcept ModuleNotFoundError as e:\n    print(e)"],
                           capture_output=True, text=True, timeout=60, check=False)
    assert probe.returncode == 0 and probe.stdout.strip() == "No module named 'tensorflow'", probe.stderr
