"""Reliability: a crash loses no result, bad input never passes silently, every error is one clear line.

Damaged run state, settings checked before the first step, full or read-only disks, stop signals, locks, one-line
errors. The SIGKILL tests over a run's timeline are in test_kills.py.
"""

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from helpers import REPO, STEPS_PER_EPOCH, csv_rows, env, latest, leftovers, main_command, one_line, run, \
    train_in_process, val_points, weights, write_image_folder


# --- Resuming with other settings; a finished phase; the other network's error ----------------------------------

@pytest.fixture(scope="module")
def one_epoch(finished_run):
    """A finished 1-epoch run (its files are read, never changed: tests copy it)."""
    return finished_run()


def copy_run(model_dir, tmp_path):
    import shutil  # pylint: disable=import-outside-toplevel

    target = tmp_path / "run"
    shutil.copytree(model_dir, target)
    return target


@pytest.mark.parametrize("binding, named", [
    ("IMAGE_SIZE = 40", "IMAGE_SIZE was 32, now 40"),
    ("BATCH_SIZE = 10", "BATCH_SIZE was 20, now 10"),
    ("AUGMENT = 'flip(0.5)'", "AUGMENT was None, now 'flip(0.5)'"),
    ("small/trainer.blocks.conv.filters = 8", None),
    ("DATA_DIR", "the dataset's classes differ: class 0 was 'n90000000', now 'other-n90000000'"),
])
@pytest.mark.slow
def test_resuming_with_a_setting_the_checkpoint_cannot_carry_is_refused(train_base_gin, train_synthetic_dir,
                                                                        one_epoch, tmp_path, binding, named):
    from trainer.errors import UserError  # pylint: disable=import-outside-toplevel

    model_dir = copy_run(one_epoch, tmp_path)
    bindings = [binding]
    if named is None:  # A network change: the declared blocks differ.
        bindings = ["trainer.network.blocks = [{'name': 'stem', 'kind': 'conv', 'filters': 8}, "
                    "{'name': 'pool', 'kind': 'global_avg_pool'}, {'name': 'head', 'kind': 'classifier', "
                    "'units': %NUM_CLASSES}]"]
        named = "trainer.network.blocks was another block list"
    elif binding == "DATA_DIR":  # Another dataset with as many classes, at another DATA_DIR: other class ids.
        other = write_image_folder(train_synthetic_dir, str(tmp_path / "other"))
        for split in ("train", "val"):
            for name in os.listdir(os.path.join(other, split)):
                os.rename(os.path.join(other, split, name), os.path.join(other, split, "other-" + name))
        bindings = [f"DATA_DIR = '{other}'", "trainer.data.source = @trainer.sources.image_folder"]
    before = {p: open(p, "rb").read() for p in glob.glob(str(model_dir / "**" / "*"), recursive=True)
              if os.path.isfile(p)}
    with pytest.raises(UserError) as err:
        train_in_process(train_base_gin, model_dir, "EPOCHS = 2", *bindings)
    message = one_line(err.value)
    assert message.startswith(f"Cannot resume {model_dir} with other settings ({named}") and "\n" not in message
    assert "Rerun with the old values" in message and "trainer.train.init_from" in message
    after = {p: open(p, "rb").read() for p in glob.glob(str(model_dir / "**" / "*"), recursive=True)
             if os.path.isfile(p)}
    assert after == before  # Refused before anything is written.


@pytest.mark.slow
def test_a_carried_change_is_logged_as_a_diff_and_the_new_config_saved(train_base_gin, train_synthetic_dir,
                                                                        one_epoch, tmp_path, caplog):
    import shutil  # pylint: disable=import-outside-toplevel

    model_dir = copy_run(one_epoch, tmp_path)
    moved = shutil.copytree(train_synthetic_dir, tmp_path / "moved")  # The same dataset elsewhere: carried.
    caplog.set_level("INFO")
    caplog.set_level("INFO", logger="absl")  # (Another test may have left absl at WARNING.)
    train_in_process(train_base_gin, model_dir, "EPOCHS = 2", "trainer.optim.constant.learning_rate = 0.0005",
                     f"DATA_DIR = '{moved}'")
    log = caplog.text
    assert json.loads((model_dir / "data.json").read_text())["source"]["location"] == str(moved)
    assert "The gin configuration changed since the last run of this phase" in log
    assert "-EPOCHS = 1" in log and "+EPOCHS = 2" in log
    assert re.search(r"\+(trainer\.)?optim\.constant\.learning_rate = 0\.0005", log)
    assert "\n  +#" not in log and "\n  +\n" not in log  # Comments and blank lines are not changes.
    assert f"resumes {model_dir}" in log
    assert re.search(r"optim\.constant\.learning_rate = 0\.0005", (model_dir / "operative_config.gin").read_text())
    assert [r["epoch"] for r in csv_rows(model_dir)] == ["1", "2"]
    assert [float(r["learning_rate"]) for r in csv_rows(model_dir)] == pytest.approx([1e-3, 5e-4])


@pytest.mark.slow
def test_a_finished_phase_says_so_and_trains_nothing(train_base_gin, one_epoch, tmp_path, caplog):
    model_dir = copy_run(one_epoch, tmp_path)
    csv_before = (model_dir / "metrics.csv").read_bytes()
    checkpoints_before = sorted(os.listdir(model_dir / "checkpoints"))
    caplog.set_level("INFO")
    caplog.set_level("INFO", logger="absl")  # (Another test may have left absl at WARNING.)
    best = train_in_process(train_base_gin, model_dir)
    log = caplog.text
    assert re.search(r"Start: +phase already complete \(.*ckpt-15, step 15\): nothing to train", log), log
    assert "resumes" not in log and "step 1/15" not in log and "Compiling" not in log
    assert (model_dir / "metrics.csv").read_bytes() == csv_before
    assert sorted(os.listdir(model_dir / "checkpoints")) == checkpoints_before
    assert best["epoch"] == 1
    assert [s for s, _ in val_points(model_dir)] == [STEPS_PER_EPOCH]  # No second point.


@pytest.mark.slow
def test_the_other_network_error_is_the_last_line_of_stderr(train_base_gin, one_epoch, tmp_path):
    model_dir = copy_run(one_epoch, tmp_path)
    os.remove(model_dir / "settings.json")  # A model directory of an older version: the restore finds it out.
    other = ("trainer.network.blocks = [{'name': 'stem', 'kind': 'conv', 'filters': 8}, "
             "{'name': 'pool', 'kind': 'global_avg_pool'}, {'name': 'head', 'kind': 'classifier', "
             "'units': %NUM_CLASSES}]")
    returncode, log = run(main_command(train_base_gin, model_dir, "EPOCHS = 2", other))
    assert returncode == 1, log[-3000:]
    lines = log.strip().splitlines()
    assert lines[-1].startswith(f"error: {model_dir} holds checkpoints of another network (trainer.network.blocks)"), \
        lines[-5:]
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in log


# --- The network's output; memory ---------------------------------------------------------------------------------

HEAD_200 = "trainer.network.blocks = [{'name': 'stem', 'kind': 'conv', 'filters': 8}, " \
           "{'name': 'pool', 'kind': 'global_avg_pool'}, {'name': 'head', 'kind': 'classifier', 'units': 200}]"
POOL_32 = "trainer.network.blocks = [{'name': 'stem', 'kind': 'conv', 'filters': 32}, " \
          "{'name': 'features', 'kind': 'global_avg_pool'}]"


@pytest.mark.parametrize("blocks, shape, last", [(HEAD_200, "(200,)", "head"), (POOL_32, "(32,)", "features")])
def test_a_network_that_does_not_output_num_classes_logits_is_one_line(train_base_gin, tmp_path, blocks, shape,
                                                                       last):
    from trainer.errors import UserError  # pylint: disable=import-outside-toplevel

    with pytest.raises(UserError) as err:
        train_in_process(train_base_gin, tmp_path / "run", blocks)
    message = one_line(err.value)
    assert message.startswith(f"The network outputs shape {shape} per image (its last block: '{last}') but it must "
                              "output (5,)") and "\n" not in message
    assert "'classifier' block of 'units': %NUM_CLASSES" in message
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize("blocks, shape, last", [(HEAD_200, "(200,)", "head"), (POOL_32, "(32,)", "features")])
def test_the_plan_command_says_the_output_is_not_num_classes_logits(blocks, shape, last):
    out = plan_text(blocks, "NUM_CLASSES = 10")
    assert f"- Output: The network outputs shape {shape} per image (its last block: " \
                               f"'{last}') but it must output (10,)" in out, out


def plan_text(*bindings):
    """What `python -m trainer.plan --gin_file=gin/models/small.gin --gin_bindings=...` prints, in this process
    (the command itself: tests/test_plan.py)."""
    from trainer import config  # pylint: disable=import-outside-toplevel
    from trainer.models import plan  # pylint: disable=import-outside-toplevel

    config.parse_gin(["gin/models/small.gin"], bindings, defaults=["NUM_CLASSES = 200"])
    return plan.plan_text(plan.default_image_size())


@pytest.mark.slow
def test_memory_estimate_stops_with_a_batch_size_that_fits(train_base_gin, tmp_path, monkeypatch, caplog):
    from trainer.errors import UserError  # pylint: disable=import-outside-toplevel
    from trainer.data import pipeline  # pylint: disable=import-outside-toplevel
    from trainer.models import plan  # pylint: disable=import-outside-toplevel

    captured = {}
    real = plan.training_memory

    def spy(network_plan, *args, **kwargs):
        captured["memory"] = real(network_plan, *args, **kwargs)
        return captured["memory"]

    monkeypatch.setattr(plan, "training_memory", spy)
    monkeypatch.setattr(plan, "available_memory", lambda host=False: (1, "host RAM"))
    in_memory = "trainer.data.in_memory = True"  # The decoded training set counts: 300 images at 32 px.
    with pytest.raises(UserError, match=r"even the smallest batch does not fit"):
        train_in_process(train_base_gin, tmp_path / "a", in_memory)
    memory = captured["memory"]
    assert memory.per_image > 0 and memory.fixed > 0
    data_bytes = int(pipeline.DECODE_PEAK_FACTOR * 300 * 32 * 32 * 3)
    # Room for 7.5 images: BATCH_SIZE 20 does not fit, 7 does.
    memory = plan.counted_memory(memory)
    available = memory.fixed + int(7.5 * memory.per_image) + data_bytes
    monkeypatch.setattr(plan, "available_memory", lambda host=False: (available, "host RAM"))
    with pytest.raises(UserError) as err:
        train_in_process(train_base_gin, tmp_path / "b", in_memory)
    message = one_line(err.value)
    assert message.startswith("Training needs about") and "at BATCH_SIZE 20" in message
    assert "use BATCH_SIZE = 7 or less" in message and "\n" not in message
    assert f"{plan.format_bytes(data_bytes)} of decoded images in memory" in message
    assert not os.path.exists(tmp_path / "b" / "checkpoints")
    # Close: a warning, and the run goes on.
    monkeypatch.setattr(plan, "available_memory", lambda host=False: (int((memory.at(20) + data_bytes) / 0.8),
                                                                      "host RAM"))
    caplog.set_level("INFO")
    caplog.set_level("INFO", logger="absl")  # (Another test may have left absl at WARNING.)
    train_in_process(train_base_gin, tmp_path / "c", in_memory, stop_after_steps=1)
    assert "it may run out of memory" in caplog.text


def test_plan_prints_the_memory_estimate():
    from trainer.models import plan  # pylint: disable=import-outside-toplevel

    out = plan_text("BATCH_SIZE = 32", "NUM_CLASSES = 200")
    assert re.search(r"- Training memory \(estimate, float32, Adam\): [\d.]+ MB per image \(activations kept for "
                     r"the backward pass\), [\d.]+ KB for weights, gradients and optimizer state; [\d.]+ MB per "
                     r"batch of 32", out), out
    assert "- Measured (`python benchmarks/network_memory.py`, CPU, 64 px): the reference network at batch 4" in out
    assert (f"the check before training counts {plan.MEASURED_RATIO}x this estimate plus "
            f"{plan.format_bytes(plan.RUNTIME_ALLOWANCE)}, plus the decoded data") in out, out
    assert "- Output:" not in out


# --- The model directory's lock ------------------------------------------------------------------------------------

def test_a_lock_of_another_host_is_taken_over_only_once_its_heartbeat_stopped(tmp_path, monkeypatch):
    from trainer import run_dir  # pylint: disable=import-outside-toplevel
    from trainer.errors import UserError  # pylint: disable=import-outside-toplevel

    lock_path = tmp_path / "LOCK"
    lock_path.write_text("other-host 4242")
    with pytest.raises(UserError) as err:  # Fresh: refused, saying how to check.
        run_dir.ModelDirLock(str(tmp_path))
    message = one_line(err.value)
    assert message.startswith(f"Model directory {tmp_path} is in use by another run (host and pid: other-host 4242;")
    assert "it runs on other-host: check there with `ps -p 4242`" in message and "\n" not in message
    assert f"taken over automatically once {run_dir.STALE_AFTER_SECONDS} s pass without a refresh" in message
    assert lock_path.read_text() == "other-host 4242"

    old = time.time() - run_dir.STALE_AFTER_SECONDS - 60  # Its heartbeat stopped: taken over.
    os.utime(lock_path, (old, old))
    lock = run_dir.ModelDirLock(str(tmp_path))
    assert lock_path.read_text() == f"{socket.gethostname()} {os.getpid()}"
    # The holder's heartbeat refreshes the modification time.
    os.utime(lock_path, (old, old))
    monkeypatch.setattr(run_dir, "HEARTBEAT_SECONDS", 0)
    lock.heartbeat()
    assert time.time() - os.path.getmtime(lock_path) < 60
    lock.release()
    assert not lock_path.exists()


# --- A full disk, a read-only model directory ------------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """mount(options) -> a fresh tmpfs directory (root only; skipped elsewhere); unmounted at the end."""
    mounted = []

    def mount(options):
        path = tmp_path / f"fs{len(mounted)}"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                              check=False)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.slow
def test_a_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(train_base_gin, tmp_path, tmpfs):
    from trainer.errors import UserError  # pylint: disable=import-outside-toplevel

    model_dir = tmpfs("size=1100k") / "run"  # Room for two checkpoints of the small network (~450 KB each).
    with pytest.raises(UserError) as err:
        train_in_process(train_base_gin, model_dir, "EPOCHS = 3", "trainer.train.checkpoint_every_steps = 4")
    message = one_line(err.value)
    kept = latest(model_dir)
    assert kept, os.listdir(model_dir / "checkpoints")
    assert message == (f"Cannot write to the model directory {model_dir}: No space left on device. Free some space "
                       f"there (or use a writable --model_dir) and run the same command: it resumes from {kept}, "
                       "which is intact.")
    assert weights(kept)  # Readable.
    assert leftovers(model_dir) == []  # No ckpt-N_temp, no LOCK.


@pytest.mark.slow
def test_a_read_only_model_directory_is_one_line_and_left_as_it_was(train_base_gin, one_epoch, tmp_path, tmpfs):
    import shutil  # pylint: disable=import-outside-toplevel

    from trainer.errors import UserError  # pylint: disable=import-outside-toplevel

    mount_point = tmpfs("size=20m")
    model_dir = mount_point / "run"
    shutil.copytree(one_epoch, model_dir)
    subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)
    before = sorted(str(p) for p in model_dir.rglob("*"))
    with pytest.raises(UserError) as err:
        train_in_process(train_base_gin, model_dir, "EPOCHS = 2")
    message = one_line(err.value)
    assert message == (f"Cannot write the model directory {model_dir}: Read-only file system ({model_dir / 'LOCK'}). "
                       "Use a writable --model_dir.")
    assert sorted(str(p) for p in model_dir.rglob("*")) == before


# --- The data scan ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_data_scan_reports_unreadable_images_tiny_classes_and_is_cached(train_base_gin, train_synthetic_dir,
                                                                           tmp_path, monkeypatch, caplog):
    import shutil  # pylint: disable=import-outside-toplevel

    from trainer.data import scan as scan_lib
    from trainer.data import synthetic
    from trainer.data.sources import tiny_imagenet  # pylint: disable=import-outside-toplevel

    data_dir = tmp_path / "data" / "tiny-imagenet-200"
    shutil.copytree(train_synthetic_dir, data_dir)
    bad = sorted(glob.glob(str(data_dir / "train" / synthetic.wnid(0) / "images" / "*")))[:4]
    for path in bad:
        with open(path, "wb") as f:
            f.write(b"\xff\xd8\xff\xe0 not a jpeg")
    for path in sorted(glob.glob(str(data_dir / "train" / synthetic.wnid(4) / "images" / "*")))[3:]:
        os.remove(path)  # Class 4 keeps 3 images of 60: tiny, and the split is imbalanced.
    bad_ids = [os.path.relpath(p, data_dir) for p in bad]  # The scan names images by their example ids.
    monkeypatch.setenv("TRAINER_CACHE_DIR", str(tmp_path / "cache"))
    caplog.set_level("INFO")
    caplog.set_level("INFO", logger="absl")  # (Another test may have left absl at WARNING.)
    scanned = []
    decodable = scan_lib.decodable
    monkeypatch.setattr(scan_lib, "decodable", lambda source, split: scanned.append(split) or decodable(source, split))
    train_in_process(train_base_gin, tmp_path / "run", f"DATA_DIR = '{data_dir}'", "BATCH_SIZE = 10")
    assert scanned == ["val", "test"]  # The training split's one decode pass is the in-memory load's.
    log = caplog.text
    assert re.search(r"Data check: train 243 images \(4 unreadable\), 3 to 60 a class; val 100 images \(0 "
                     r"unreadable\); test 5 images \(0 unreadable\) \(details: .*data_report\.json; cached in ", log)
    assert f"Data check: 4 of the 243 train images cannot be decoded and are skipped: {bad_ids[0]}, {bad_ids[1]}, " \
           f"{bad_ids[2]} and 1 more." in log
    assert f"1 classes have fewer than 10% of the median 60 training images: {synthetic.wnid(4)} (3)." in log
    assert "The training classes are imbalanced: 3 (" in log
    assert "(tiny_imagenet: 5 classes, 243 (239 readable) train / 100 val images)" in log  # The banner.
    assert "could not be read or decoded" not in log  # The data check said it: not again after the first epoch.
    caplog.clear()
    train_in_process(train_base_gin, tmp_path / "unchecked", f"DATA_DIR = '{data_dir}'", "BATCH_SIZE = 10",
                     "trainer.train.scan_data = False")
    assert "Data check" not in caplog.text and "243 train / 100 val images" in caplog.text
    assert f"4 of 243 training images in {data_dir} could not be read or decoded and were skipped." in caplog.text
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["splits"]["train"]["unreadable"] == bad_ids  # All of them, not only the first few.
    assert report["train_per_class"][synthetic.wnid(0)] == 56 and report["tiny_classes"] == [synthetic.wnid(4)]
    assert len(glob.glob(str(tmp_path / "cache" / "scan-*.json"))) == 1

    # A second run takes the cached scan: nothing is decoded for it.
    def no_decoding(source, split):
        raise AssertionError("the dataset was scanned again")

    monkeypatch.setattr(scan_lib, "decodable", no_decoding)
    again = scan_lib.scan(tiny_imagenet.TinyImageNet(str(data_dir)))
    assert again["splits"]["train"]["unreadable"] == bad_ids and again["cached"]
    # A cache of valid JSON but the wrong shape is scanned again, not trusted.
    [cache] = glob.glob(str(tmp_path / "cache" / "scan-*.json"))
    with open(cache, "w", encoding="utf-8") as f:
        json.dump(["not", "a", "report"], f)
    with pytest.raises(AssertionError, match="scanned again"):
        scan_lib.scan(tiny_imagenet.TinyImageNet(str(data_dir)))
    # Another file: another key, scanned again.
    os.remove(bad[0])
    with pytest.raises(AssertionError, match="scanned again"):
        scan_lib.scan(tiny_imagenet.TinyImageNet(str(data_dir)))


def test_a_missing_class_folder_is_the_headline(train_synthetic_dir, tmp_path):
    import shutil  # pylint: disable=import-outside-toplevel

    from trainer.data import synthetic
    from trainer.data.sources import tiny_imagenet  # pylint: disable=import-outside-toplevel

    data_dir = tmp_path / "tiny-imagenet-200"
    shutil.copytree(train_synthetic_dir, data_dir)
    shutil.rmtree(data_dir / "train" / synthetic.wnid(2))
    with pytest.raises(tiny_imagenet.DatasetNotFoundError) as err:
        tiny_imagenet.TinyImageNet(str(data_dir))
    message = str(err.value)
    assert message.startswith(f"1 of the 5 classes in {data_dir / 'wnids.txt'} have no training folder "
                              f"(train/{synthetic.wnid(2)} missing in {data_dir / 'train'})")
    assert "not found" not in message and "\n" not in message and "download" in message


# --- SIGTERM before and during the first execution ---------------------------------------------------------------

def last_line(log):
    """The last line of stderr (cli.run prints gin's "In call to configurable" suffix after `stopped:` messages:
    a cli.py fix for the lead; it is dropped here)."""
    lines = log.strip().splitlines()
    return lines[-2] if lines[-1].startswith("  In call to configurable") else lines[-1]


def run_until_signal(command, pattern, sig=signal.SIGTERM, timeout=300):
    """Runs `command`, sends `sig` when a log line matches: (returncode, log, seconds from the signal to exit)."""
    proc = subprocess.Popen(command, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    lines, sent = [], None
    try:
        for line in proc.stderr:
            lines.append(line)
            if sent is None and re.search(pattern, line):
                proc.send_signal(sig)
                sent = time.time()
        proc.wait()
    finally:
        watchdog.cancel()
    return proc.returncode, "".join(lines), (time.time() - sent) if sent else None


@pytest.mark.slow
def test_sigterm_before_the_first_step_stops_at_once(train_base_gin, tmp_path):
    """Opening the data, decoding it into memory and tracing are not waited for: nothing is saved yet."""
    model_dir = tmp_path / "run"
    returncode, log, latency = run_until_signal(main_command(train_base_gin, model_dir, "EPOCHS = 2"),
                                                r"Start: +fresh weights")
    assert returncode == 128 + signal.SIGTERM, log[-3000:]
    assert last_line(log) == ("stopped: SIGTERM before the first training step: nothing new to save, "
                                            "the model directory holds what it held. Run the same command to start "
                                            "again."), log[-3000:]
    assert latency < 10, latency
    assert latest(model_dir) is None and leftovers(model_dir) == [] and "Traceback" not in log
    # During the first call (tracing, then one step, then the rest of the first execution): stopped at once, or
    # at most one execution (5 steps) later, after a checkpoint.
    returncode, log, latency = run_until_signal(main_command(train_base_gin, model_dir, "EPOCHS = 2"),
                                                r"Compiling the training step")
    assert returncode == 128 + signal.SIGTERM, log[-3000:]
    last = last_line(log)
    assert last.startswith("stopped: SIGTERM before the first training step") or re.fullmatch(
        r"stopped: SIGTERM at step [1-5] \(epoch 1\), after a checkpoint in .*", last), last
    assert latency < 10, latency
    assert leftovers(model_dir) == []


def read_only_copy(run, tmpfs):
    """A copy of `run` on a small tmpfs remounted read-only: its model directory."""
    import shutil  # pylint: disable=import-outside-toplevel

    mount_point = tmpfs("size=20m")
    model_dir = mount_point / "run"
    shutil.copytree(run, model_dir)
    subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)
    return model_dir


@pytest.mark.slow
def test_a_read_only_model_directory_from_the_command_line(train_base_gin, one_epoch, tmpfs):
    model_dir = read_only_copy(one_epoch, tmpfs)
    returncode, log = run(main_command(train_base_gin, model_dir, "EPOCHS = 2"))
    assert returncode == 1, log[-3000:]
    assert log.strip().splitlines()[-1] == (f"error: Cannot write the model directory {model_dir}: Read-only file "
                                            f"system ({model_dir / 'LOCK'}). Use a writable --model_dir.")
    assert "Traceback" not in log


# --- Issue 17: settings that name a metric or a block are checked before the first step -------------------------

def test_a_misspelled_select_best_by_is_refused_before_the_first_step(train_base_gin, tmp_path):
    """In this process (the command line's last `error:` line: test_the_other_network_error_is_...)."""
    from trainer.errors import UserError  # pylint: disable=import-outside-toplevel

    model_dir = tmp_path / "run"
    with pytest.raises(UserError) as err:
        train_in_process(train_base_gin, model_dir, "trainer.train.select_best_by = 'val_acc'")
    assert one_line(err.value) == (
        "trainer.train.select_best_by is 'val_acc': expected one of 'val_top1', 'val_top5', 'val_loss' "
        "(a val column of metrics.csv).")
    assert not model_dir.exists()


@pytest.mark.parametrize("binding, message", [
    ("trainer.train.keep_checkpoints = 0", "trainer.train.keep_checkpoints is 0: expected an integer >= 1"),
    ("trainer.train.keep_checkpoints = -1", "trainer.train.keep_checkpoints is -1: expected an integer >= 1"),
    ("trainer.train.early_stopping_patience = -1",
     "trainer.train.early_stopping_patience is -1: expected None (never stop early) or an integer >= 0"),
    ("trainer.train.schedule = @trainer.optim.reduce_on_plateau\ntrainer.optim.reduce_on_plateau.metric = 'val_acc'",
     "trainer.optim.reduce_on_plateau.metric is 'val_acc': expected 'val_loss', 'val_top1' or 'val_top5'"),
    ("trainer.train.evaluate_best = True\ntrainer.evaluate.gradcam_layer = 'nope'",
     "trainer.evaluate.gradcam_layer = 'nope': expected a block or layer name"),
])
def test_settings_naming_a_metric_or_block_are_checked_before_the_first_step(train_base_gin, tmp_path, binding,
                                                                             message):
    from trainer.errors import UserError  # pylint: disable=import-outside-toplevel

    model_dir = tmp_path / "run"
    with pytest.raises(UserError) as err:
        train_in_process(train_base_gin, model_dir, *binding.split("\n"), stop_after_steps=1)
    assert one_line(err.value).startswith(message) and "\n" not in one_line(err.value)
    assert latest(model_dir) is None and not (model_dir / "metrics.csv").exists()


# --- Issue 17: a damaged settings.json refuses; the refusal names the setting -------------------------------------

def files_of(model_dir):
    return {p: open(p, "rb").read() for p in glob.glob(str(model_dir / "**" / "*"), recursive=True)
            if os.path.isfile(p)}


@pytest.mark.slow
@pytest.mark.parametrize("damage, why", [(b"", "Expecting value"),
                                         (b'{"IMAGE_SIZE": 32, "BATCH_', "Unterminated string"),
                                         (b"[32, 20]", "a JSON list, not an object")])
def test_a_damaged_settings_file_refuses_the_resume(train_base_gin, one_epoch, tmp_path, damage, why):
    from trainer.errors import UserError  # pylint: disable=import-outside-toplevel

    model_dir = copy_run(one_epoch, tmp_path)
    (model_dir / "settings.json").write_bytes(damage)
    before = files_of(model_dir)
    with pytest.raises(UserError) as err:
        train_in_process(train_base_gin, model_dir, "EPOCHS = 3", "BATCH_SIZE = 10")
    message = one_line(err.value)
    assert message.startswith(f"Cannot resume {model_dir}: its settings.json is damaged (") and why in message
    assert message.endswith("Restore that file, or delete it to resume without the check, or train in a new "
                            "--model_dir.") and "\n" not in message
    assert files_of(model_dir) == before


@pytest.mark.slow
def test_a_schedule_change_is_named(train_base_gin, one_epoch, tmp_path):
    from trainer.errors import UserError  # pylint: disable=import-outside-toplevel

    model_dir = copy_run(one_epoch, tmp_path)
    before = files_of(model_dir)
    with pytest.raises(UserError) as err:
        train_in_process(train_base_gin, model_dir, "EPOCHS = 2",
                         "trainer.train.schedule = @trainer.optim.reduce_on_plateau")
    assert one_line(err.value).startswith(f"{model_dir} holds checkpoints of another learning-rate schedule "
                                          "(trainer.train.schedule) (")
    after = files_of(model_dir)
    assert {p: v for p, v in after.items() if p in before and "checkpoints" in p} == \
        {p: v for p, v in before.items() if "checkpoints" in p}


# --- Issue 17: a damaged run never starts over; a damaged checkpoint is skipped, best/ rebuilt ---------------------

@pytest.fixture(scope="module")
def two_epochs(finished_run):
    """A finished 2-epoch run, ckpt-15 and ckpt-30 (read, never changed: tests copy it)."""
    return finished_run("EPOCHS = 2")


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["deleted", "garbage"])
def test_a_run_without_its_checkpoint_index_is_refused_not_restarted(train_base_gin, two_epochs, tmp_path, damage):
    from trainer.errors import UserError  # pylint: disable=import-outside-toplevel

    model_dir = copy_run(two_epochs, tmp_path)
    index = model_dir / "checkpoints" / "checkpoint"
    os.remove(index) if damage == "deleted" else index.write_text("garbage\n")
    before = files_of(model_dir)
    with pytest.raises(UserError) as err:
        train_in_process(train_base_gin, model_dir, "EPOCHS = 2")
    assert one_line(err.value) == (
        f"{model_dir} holds a run (ckpt-30, ckpt-15, best/{os.path.basename(latest(model_dir, 'best'))}, "
        f"metrics.csv) but no readable checkpoint index ({index} is missing "
        f"or damaged): refusing to start it over. Resume from the newest intact checkpoint with "
        f"trainer.train.resume_from = '{model_dir / 'checkpoints' / 'ckpt-30'}', or move the folder aside to start "
        "afresh.")
    assert files_of(model_dir) == before  # Nothing overwritten, metrics.csv not rewritten.
    # The way out the message names: the phase is complete at ckpt-30, nothing trained, nothing rewritten.
    assert train_in_process(train_base_gin, model_dir, "EPOCHS = 2",
                            f"trainer.train.resume_from = '{model_dir / 'checkpoints' / 'ckpt-30'}'")["epoch"] == 2
    assert [r["epoch"] for r in csv_rows(model_dir)] == ["1", "2"]
    assert {p: v for p, v in files_of(model_dir).items() if "ckpt-" in p} == \
        {p: v for p, v in before.items() if "ckpt-" in p}


@pytest.mark.slow
def test_a_truncated_checkpoint_falls_back_to_the_newest_intact_one(train_base_gin, two_epochs, tmp_path, caplog):
    model_dir = copy_run(two_epochs, tmp_path)
    data = model_dir / "checkpoints" / "ckpt-30.data-00000-of-00001"
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    ckpt15 = {p: v for p, v in files_of(model_dir).items() if "ckpt-15" in p}
    caplog.set_level("WARNING", logger="absl")
    best = train_in_process(train_base_gin, model_dir, "EPOCHS = 2")
    assert (f"{model_dir / 'checkpoints' / 'ckpt-30'} is damaged (Read less bytes than requested): resuming from "
            f"{model_dir / 'checkpoints' / 'ckpt-15'}, the newest intact checkpoint; steps 16-30 are trained again."
            ) in caplog.text
    assert best["epoch"] in (1, 2)
    assert [r["epoch"] for r in csv_rows(model_dir)] == ["1", "2"]
    assert latest(model_dir).endswith("ckpt-30") and weights(latest(model_dir))  # Rewritten whole.
    assert {p: v for p, v in files_of(model_dir).items() if "ckpt-15" in p} == ckpt15
    assert leftovers(model_dir) == []


@pytest.mark.slow
def test_a_truncated_best_is_refused_by_export_and_rebuilt_by_the_rerun(train_base_gin, two_epochs, tmp_path,
                                                                        caplog):
    from trainer import checkpoints  # pylint: disable=import-outside-toplevel
    from trainer.errors import UserError  # pylint: disable=import-outside-toplevel

    model_dir = copy_run(two_epochs, tmp_path)
    best = latest(model_dir, "best")
    data = best + ".data-00000-of-00001"
    with open(data, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(UserError) as err:  # What export and evaluate call first.
        checkpoints.find_checkpoint(str(model_dir), "best")
    assert one_line(err.value) == (f"{best} is damaged (Read less bytes than requested). Rerun the phase's training "
                                   "command (it rebuilds best/ from checkpoints/ when it can) or name another "
                                   "checkpoint with --checkpoint.")
    caplog.set_level("WARNING", logger="absl")
    train_in_process(train_base_gin, model_dir, "EPOCHS = 2")
    source = model_dir / "checkpoints" / os.path.basename(best)
    assert f"{best} was damaged (Read less bytes than requested): rebuilt from {source}, the same step." in caplog.text
    assert open(data, "rb").read() == open(str(source) + ".data-00000-of-00001", "rb").read()
    assert checkpoints.find_checkpoint(str(model_dir), "best") == best


# --- Issue 17: a signal stops the phase's tail; a finished phase's rerun redoes only what is missing ---------------

@pytest.mark.slow
def test_sigterm_during_export_and_evaluation_stops_and_the_rerun_redoes_only_them(train_base_gin, tmp_path):
    model_dir = tmp_path / "run"
    command = main_command(train_base_gin, model_dir, "trainer.train.export = True",
                           "trainer.train.evaluate_best = True")
    returncode, log, _ = run_until_signal(command, r"Exporting best checkpoint")
    assert returncode == 128 + signal.SIGTERM, log[-3000:]
    assert last_line(log) == ("stopped: SIGTERM during the phase's export and evaluation: every checkpoint is saved. "
                              "Run the same command to redo them."), log[-3000:]
    assert latest(model_dir).endswith("ckpt-15") and latest(model_dir, "best").endswith("ckpt-15")
    # Stopped at once, or (when TensorFlow held the signal back) right after the export: never evaluated.
    assert (model_dir / "export" / "export.json").exists() or not (model_dir / "export").exists()
    assert not (model_dir / "eval").exists()
    checkpoints_before = files_of(model_dir / "checkpoints")
    # The rerun trains nothing, exports if it has to, and is stopped in the evaluation.
    returncode, log, _ = run_until_signal(command, r"Exported .* \(5 classes|The export in .* is already of")
    assert returncode == 128 + signal.SIGTERM, log[-3000:]
    assert "phase already complete" in log and "step 1/15" not in log
    assert last_line(log).startswith("stopped: SIGTERM during the phase's export and evaluation"), log[-3000:]
    assert json.loads((model_dir / "export" / "export.json").read_text())["source"]["step"] == 15
    # The next one evaluates only; the one after does nothing but say so.
    for again in range(2):
        returncode, log = run(command)
        assert returncode == 0 and "Traceback" not in log, log[-3000:]
        assert "The export in" in log and "is already of" in log and "Exporting" not in log
        assert ("is already evaluated in" in log) == bool(again)
    assert files_of(model_dir / "checkpoints") == checkpoints_before
    assert len(glob.glob(str(model_dir / "eval" / "events.out.tfevents.*.best-15"))) == 1
    assert [r["epoch"] for r in csv_rows(model_dir)] == ["1"] and leftovers(model_dir) == []


# --- Issue 17: the model directory deleted under a live run ------------------------------------------------------

@pytest.mark.slow
def test_the_model_directory_deleted_under_the_run_stops_it(train_base_gin, tmp_path):
    import shutil  # pylint: disable=import-outside-toplevel

    model_dir = tmp_path / "run"
    proc = subprocess.Popen(main_command(train_base_gin, model_dir, "EPOCHS = 3",
                                         "trainer.train.steps_per_execution = 1"),
                            cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "epoch 2/3 step 3/15" in line:
            shutil.rmtree(model_dir)
    log = "".join(lines)
    assert proc.wait(timeout=300) == 1, log[-3000:]
    assert log.strip().splitlines()[-1] == (
        f"error: The model directory {model_dir} vanished under the run (its lock {model_dir / 'LOCK'} is gone): "
        "stopped without writing anything more. Put it back and run the same command to resume, or run it to start "
        "afresh."), log[-3000:]
    assert not model_dir.exists() and "Traceback" not in log


# --- Issue 17: one line, not a traceback; a stale lock of any shape is taken over ---------------------------------

def test_a_gin_file_that_is_not_utf8_is_one_line(tmp_path):
    from trainer import config  # pylint: disable=import-outside-toplevel
    from trainer.errors import UserError  # pylint: disable=import-outside-toplevel

    path = tmp_path / "latin1.gin"
    path.write_bytes("# Réglages\nEPOCHS = 1\n".encode("latin-1"))
    with pytest.raises(UserError) as err:
        config.parse_gin([str(path)], [])
    assert str(err.value) == (f"{path} is not UTF-8 text (byte 0xe9 at offset 3): expected a gin file in UTF-8; "
                              "save it as UTF-8.")


@pytest.mark.parametrize("lock, why", [
    (b"\x00\xff\xfe\x13garbage", "garbled: "),
    (None, "a directory, not a lock file"),
    (f"{socket.gethostname()} 99999999999999999999".encode(), "99999999999999999999: no such process"),
    (f"{socket.gethostname()} 0".encode(), f"{socket.gethostname()} 0: no such process"),
])
def test_a_lock_of_garbage_a_directory_or_an_impossible_pid_is_stale(tmp_path, caplog, lock, why):
    from trainer import run_dir  # pylint: disable=import-outside-toplevel

    path = tmp_path / "LOCK"
    if lock is None:
        (path / "sub").mkdir(parents=True)
    else:
        path.write_bytes(lock)
    caplog.set_level("WARNING", logger="absl")
    held = run_dir.ModelDirLock(str(tmp_path))
    assert f"Taking over the stale lock {path} (" in caplog.text and why in caplog.text
    assert path.read_text() == f"{socket.gethostname()} {os.getpid()}"
    held.release()
    assert not path.exists()


def test_temp_files_of_killed_writes_are_removed_when_the_run_starts(tmp_path):
    import types  # pylint: disable=import-outside-toplevel

    from trainer import run_dir  # pylint: disable=import-outside-toplevel

    dead = tmp_path / "settings.json.tmp-99999999"
    alive = tmp_path / f"metrics.csv.tmp-{os.getppid()}"  # Another live process's write: left alone.
    dead.write_text('{"IMAGE_')
    alive.write_text("epoch,")
    with run_dir.claimed(str(tmp_path), types.SimpleNamespace(chief=True, multi_worker=False)):
        assert not dead.exists() and alive.exists()


def test_compare_names_and_skips_a_run_whose_metrics_csv_is_garbage(tmp_path):
    good, binary, text = tmp_path / "good", tmp_path / "binary", tmp_path / "text"
    for run_dir in (good, binary, text):
        run_dir.mkdir()
    (good / "metrics.csv").write_text("epoch,step,time,val_top1,val_top5\n1,15,2.0,0.5,0.9\n")
    (binary / "metrics.csv").write_bytes(bytes(range(256)) * 8)
    (text / "metrics.csv").write_text("epoch,step,val_top1\n1,x,0.5\n")
    proc = subprocess.run([sys.executable, "-m", "trainer.compare", str(good), str(binary), str(text)], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    for run_dir in (binary, text):
        assert re.search(rf"warning: {run_dir / 'metrics.csv'} is not a metrics.csv the trainer writes \(.+\): run "
                         rf"{run_dir} skipped\.", proc.stderr), proc.stderr
    table = proc.stdout.splitlines()
    assert len(table) == 3 and table[2].startswith("good") and "0.5" in table[2], proc.stdout


@pytest.mark.slow
def test_evaluate_on_a_read_only_model_directory_says_where_and_offers_output_dir(one_epoch, tmp_path, tmpfs):
    model_dir = read_only_copy(one_epoch, tmpfs)
    command = [sys.executable, "-m", "trainer.evaluate", f"--model_dir={model_dir}"]
    returncode, log = run(command)
    assert returncode == 1 and "Traceback" not in log, log[-3000:]
    assert log.strip().splitlines()[-1] == (
        f"error: Cannot write the evaluation to {model_dir / 'eval'}: Read-only file system. Give a writable "
        "--output_dir (its reports go to <output_dir>/<checkpoint name>/)."), log[-3000:]
    returncode, log = run(command + [f"--output_dir={tmp_path / 'out'}"])
    assert returncode == 0, log[-3000:]
    assert (tmp_path / "out" / "best-15" / "report.json").exists() and not (model_dir / "eval").exists()


def test_predict_does_not_follow_directory_symlinks(tmp_path):
    from PIL import Image  # pylint: disable=import-outside-toplevel

    from trainer import predict  # pylint: disable=import-outside-toplevel

    images, outside = tmp_path / "images", tmp_path / "outside"
    images.mkdir()
    outside.mkdir()
    for path in (images / "a.png", images / "b.jpg", outside / "c.png"):
        Image.new("RGB", (8, 8)).save(path)
    os.symlink("..", images / "up")  # A cycle: the 81 predictions from 2 images.
    os.symlink(outside, images / "elsewhere")
    os.symlink(outside / "c.png", images / "c_link.png")  # A symlinked file is an image of the directory.
    found, problems = predict.list_images([str(images)])
    assert found == [str(images / n) for n in ("a.png", "b.jpg", "c_link.png")] and problems == []


@pytest.mark.slow
def test_a_truncated_init_from_checkpoint_is_one_line(train_base_gin, two_epochs, tmp_path):
    from trainer.errors import UserError  # pylint: disable=import-outside-toplevel

    previous = copy_run(two_epochs, tmp_path)
    data = previous / "checkpoints" / "ckpt-30.data-00000-of-00001"
    with open(data, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(UserError) as err:
        train_in_process(train_base_gin, tmp_path / "next", f"trainer.train.init_from = '{previous}'")
    assert one_line(err.value) == (f"trainer.train.init_from = '{previous}': {previous / 'checkpoints' / 'ckpt-30'} is "
                                   "damaged (Read less bytes than requested). Rerun the previous phase (it resumes "
                                   "from its newest intact checkpoint), or name an intact checkpoint.")
    assert not (tmp_path / "next").exists()
