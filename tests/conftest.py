"""Shared fixtures: small synthetic datasets in Tiny ImageNet's layout, a clean gin config per test."""

import contextlib
import fcntl
import gc
import hashlib
import os
import shutil

import gin
import keras
import pytest
from tensorflow.python.framework import config as tf_config  # disable_op_determinism: not in the public API.

from trainer import cli
from trainer.data import synthetic

cli.register_configurables()  # Every gin configurable, before any test parses a gin file (then `gc.freeze()`).

# The files whose tests take longest together, longest first (seconds summed over a file, `--durations=0`,
# 2026-12-07, two runs: 192, 134, 109, 77, 68, 66, 51, 40, 34, 34, 32, 29, 26, 21, 20 of 1,047 in the first;
# test_source_plugin.py, newer, 21 alone),
# handed out first; the rest, a few seconds each, after them as collected. `--dist loadfile` gives a worker a whole
# file at a time; xdist would otherwise order files by their number of tests, so that test_kills.py (2 tests,
# 113 s) and test_precise_bn.py (9 tests, then 215 s) came last and one worker ran them while the other had
# finished: 748 s in all, where replaying the measured durations in this order gives 701 s (BUILD_NOTES.md).
LONGEST_FIRST = ("test_train.py", "test_kills.py", "test_reliability.py", "test_strategy.py",
                 "test_sources_end_to_end.py", "test_sweep.py", "test_predict.py", "test_main.py", "test_recipes.py",
                 "test_tfrecord.py", "test_precise_bn.py", "test_evaluate.py", "test_model_declarations.py",
                 "test_synthetic.py", "test_source_plugin.py", "test_export.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order of the collection (below).
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    """LONGEST_FIRST's files first, in that order; the others after them as collected."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: a file's tests keep their order.


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """The data scan's cache goes to a temporary directory, not the user's ~/.cache."""
    os.environ["TRAINER_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def made_once(tmp_path_factory):
    """`made_once(name, make)`: `make(path)` runs once for the whole session, in whichever xdist worker asks first
    (the other waits for it); both get `path`. For what tests only read, or copy before they change it."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER") and shared.name.startswith("popen-"):
        shared = shared.parent  # The session's own directory, above each local worker's (popen-gw0, popen-gw1).

    def get(name, make):
        path, done = shared / name, shared / f"{name}.done"
        with open(shared / f"{name}.lock", "a", encoding="utf-8") as lock, contextlib.ExitStack() as unlock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            unlock.callback(fcntl.flock, lock, fcntl.LOCK_UN)
            if not done.exists():
                shutil.rmtree(path, ignore_errors=True)  # What a failed attempt left.
                make(path)
                done.touch()
        return path

    return get


@pytest.fixture(scope="session")
def synthetic_dir(made_once):
    """5 classes x 40 training images (64 px), 10 val images a class, 12 test images."""
    return _synthetic(made_once, "synthetic", num_classes=5, per_class=40, val_per_class=10, test_images=12)


@pytest.fixture(autouse=True)
def clean_state():
    """Every test starts and ends with an empty gin configuration, and ends with a fresh Keras session.

    `clear_session` collects the test's cyclic garbage; what is still alive is then frozen, so the next test's
    collection walks only the objects made since: a full collection of all of TensorFlow and Keras took about
    0.3 s after each test (184 s of the suite's 1,317 s of test time, measured). The cost: what a test leaves
    alive (a failed test's traceback) and drops later is never collected as a cycle.
    """
    gin.clear_config()
    yield
    gin.clear_config()
    keras.backend.clear_session()
    tf_config.disable_op_determinism()  # A run with trainer.train.deterministic_ops leaves it on for the process.
    gc.freeze()


@pytest.fixture(scope="session")
def train_synthetic_dir(made_once):
    """For the trainer's tests: 5 classes x 60 training images (64 px), 20 val images a class."""
    return _synthetic(made_once, "train_synthetic", num_classes=5, per_class=60, val_per_class=20, test_images=5)


@pytest.fixture(scope="session")
def train_base_gin(made_once, train_synthetic_dir):
    """A runnable gin file for the trainer's tests: the small network on `train_synthetic_dir`.

    32 px, batch 20 (15 steps an epoch), 1 epoch, no augmentation, deterministic
    data order and seeded weights; MODEL_DIR comes from --model_dir.
    """
    return str(made_once("train_gin", lambda path: _write_base_gin(path, train_synthetic_dir)) / "base.gin")


@pytest.fixture(scope="session")
def finished_run(made_once, train_base_gin):
    """`finished_run(*bindings)`: the model directory of a finished run of `train_base_gin` with `bindings`
    (in-process), trained once for the session whichever test file asks first. Read it; copy it to change it."""
    import helpers  # pylint: disable=import-outside-toplevel

    def get(*bindings):
        name = "finished_run_" + hashlib.sha1("\n".join(bindings).encode()).hexdigest()[:12]

        def train(path):
            try:
                helpers.train_in_process(train_base_gin, path / "run", *bindings)
            finally:
                gin.clear_config()
                keras.backend.clear_session()

        return made_once(name, train) / "run"

    return get


def _synthetic(made_once, name, **sizes):
    """A synthetic dataset in Tiny ImageNet's layout (`synthetic.write_synthetic`), written once for the session."""
    return str(made_once(name, lambda path: synthetic.write_synthetic(str(path / "tiny-imagenet-200"), **sizes))
               / "tiny-imagenet-200")


def _write_base_gin(directory, train_synthetic_dir):
    path = directory / "base.gin"
    directory.mkdir()
    path.write_text(f"""
include 'gin/common.gin'
include 'gin/models/small.gin'
include 'gin/strategy/default.gin'
DATA_DIR = '{train_synthetic_dir}'
IMAGE_SIZE = 32
BATCH_SIZE = 20
EPOCHS = 1
NUM_CLASSES = 5
MODEL_DIR = None
AUGMENT = None
SEED = 1
trainer.data.deterministic = True
trainer.train.steps_per_execution = 5
trainer.train.log_every_steps = 1
trainer.train.export = False
trainer.train.evaluate_best = False
""")
