"""trainer.sweep: a sweep declared in gin, run unattended K at a time, resumable, reported; compare on sweeps.

One 4-point grid (2 epochs each, --parallel=2) is run once for the module
(`grid`): stopped with SIGTERM as soon as its first point finishes, then
rerun to the end. The tests read what it left.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import helpers
import pytest
from tensorboard.plugins.hparams import metadata as hparams_metadata

from trainer import compare, sweep
from trainer.errors import UserError

pytestmark = pytest.mark.slow  # Trains in subprocesses.

REPO = helpers.REPO
GRID = "{'trainer.optim.constant.learning_rate': [0.001, 0.003], 'AUGMENT': {'none': None, 'flip': 'flip(0.5)'}}"
NAMES = ["learning_rate=0.001,augment=none", "learning_rate=0.001,augment=flip",
         "learning_rate=0.003,augment=none", "learning_rate=0.003,augment=flip"]


def _sweep_file(path, base, output, grid=GRID, extra=""):
    path.write_text(f"# A test sweep.\nsweep.base = [{str(base)!r}]\nsweep.bindings = ['EPOCHS = 2']\n"
                    f"sweep.grid = {grid}\nsweep.output = {str(output)!r}\n{extra}")
    return path


def _live_locks(directory):
    """The model directories under `directory` whose LOCK is held by a live process."""
    live = set()
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        try:
            with open(os.path.join(directory, name, "LOCK"), encoding="utf-8") as f:
                pid = int(f.read().split()[1])
            os.kill(pid, 0)
            live.add(name)
        except (OSError, ValueError, IndexError):
            continue
    return live


def _starts(directory):
    """name -> the number of training runs the sweep started for it (the `=== start` lines of its log)."""
    logs = os.path.join(directory, "logs")
    return {f[:-4]: open(os.path.join(logs, f), encoding="utf-8").read().count("=== start ")
            for f in os.listdir(logs)}


@pytest.fixture(scope="module")
def grid(tmp_path_factory, train_base_gin):
    root = tmp_path_factory.mktemp("sweep")
    out = root / "out"
    sweep_file = _sweep_file(root / "grid.gin", train_base_gin, out)
    command = [sys.executable, "-m", "trainer.sweep", str(sweep_file), "--parallel=2"]
    started = time.time()
    proc = subprocess.Popen(command, cwd=REPO, env=helpers.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    most_locks, done = set(), threading.Event()

    def watch():  # The most model directories locked by live runs at one moment.
        nonlocal most_locks
        while not done.is_set():
            live = _live_locks(out)
            if len(live) > len(most_locks):
                most_locks = live
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    watchdog = threading.Timer(600, proc.kill)
    watchdog.start()
    first_log = []
    try:
        for line in proc.stdout:
            first_log.append(line)
            if line.startswith("[sweep] finished") and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # Stop the sweep mid-way.
        proc.wait()
    finally:
        watchdog.cancel()
        done.set()
        watcher.join()
    after_stop = json.loads((out / "sweep.json").read_text())
    starts_after_stop = _starts(out)
    with_checkpoint = {n for n in NAMES if os.path.isdir(out / n / "checkpoints")}
    second = subprocess.run(command, cwd=REPO, env=helpers.env(), capture_output=True, text=True, timeout=600)
    print(f"grid sweep: {time.time() - started:.0f} s")
    return {"root": root, "out": out, "sweep_file": sweep_file, "first": (proc.returncode, "".join(first_log)),
            "second": second, "after_stop": after_stop, "starts_after_stop": starts_after_stop,
            "with_checkpoint": with_checkpoint, "most_locks": most_locks}


def test_grid_runs_unattended_and_reports_every_point(grid):
    second, out = grid["second"], grid["out"]
    assert second.returncode == 0, second.stdout + second.stderr
    report = json.loads((out / "report.json").read_text())
    points = report["points"]
    assert sorted(p["point"] for p in points) == sorted(NAMES) and all(p["status"] == "finished" for p in points)
    assert [p["metric"] for p in points] == sorted((p["metric"] for p in points), reverse=True)
    assert report["best"] == points[0]["point"]
    for p in points:
        assert p["epochs"] == 2 and p["val_top1"] == p["metric"] and p["images_per_second"] > 0
        assert p["wall_time"] > 0 and 1 <= p["best_epoch"] <= 2
        assert p["labels"] == dict(x.split("=") for x in p["point"].split(","))
    markdown = (out / "report.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| point | learning_rate | augment | status | best val_top1 |") and len(table) == 5
    assert [line.split("|")[1].strip() for line in table[1:]] == [p["point"] for p in points]
    assert f"Best point: **{points[0]['point']}**" in markdown and points[0]["command"] in markdown
    assert points[0]["command"].startswith("python -m trainer.main --gin_file=")
    assert sorted(report["plots"]) == ["plots/learning_curves.png", "plots/val_top1_vs_augment.png",
                                       "plots/val_top1_vs_learning_rate.png"]
    for plot in report["plots"]:
        assert f"]({plot})" in markdown and (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # HParams: each point's first session (written by the sweep) holds the varied values.
    events = helpers.read_events(str(sorted((out / NAMES[1]).glob("events.out.tfevents.*"))[0]))
    content = events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    session = hparams_metadata.parse_session_start_info_plugin_data(content)
    assert session.hparams["AUGMENT"].string_value == "flip(0.5)"
    assert session.hparams["learning_rate"].number_value == pytest.approx(0.001)


def test_stopped_sweep_resumes_only_what_was_left(grid):
    code, first = grid["first"]
    assert code == 128 + signal.SIGTERM, first
    assert "[sweep] stopping" in first
    finished = {n for n, e in grid["after_stop"]["points"].items() if e["status"] == "finished"}
    assert 1 <= len(finished) < 4
    left = set(NAMES) - finished
    assert all(grid["after_stop"]["points"][n]["status"] in ("interrupted", "pending") for n in left)
    second = grid["second"].stdout
    assert {m for m in re.findall(r"^\[sweep\] skip (\S+): finished", second, re.M)} == finished
    assert set(re.findall(r"^\[sweep\] start (\S+):", second, re.M)) == left
    # Training runs started: the first run's, then one more for each point not finished.
    starts = _starts(grid["out"])
    assert sum(starts.values()) - sum(grid["starts_after_stop"].values()) == len(left)
    assert all(starts[n] == grid["starts_after_stop"].get(n, 0) + 1 for n in left)
    assert all(starts[n] == 1 for n in finished)
    for name in grid["with_checkpoint"] & left:  # Interrupted after a checkpoint: the rerun resumed from it.
        log = (grid["out"] / "logs" / f"{name}.log").read_text().split("=== start ")[-1]
        assert re.search(r"Start: +(resumes .*ckpt-\d+ at step [1-9]|phase already complete)", log), log


def test_parallel_runs_two_points_at_once(grid):
    assert len(grid["most_locks"]) == 2


def test_changed_sweep_file_is_refused_naming_the_changed_points(grid, tmp_path):
    changed = _sweep_file(tmp_path / "changed.gin", open(grid["sweep_file"]).read().split("'")[1], grid["out"],
                          grid=GRID.replace("0.003", "0.01"))
    state = sweep.read_state(str(grid["out"]))
    new = sweep.read_sweep_file(str(changed))
    with pytest.raises(UserError, match="changed") as err:
        sweep.check_unchanged(state, sweep.expand(new), new, str(grid["out"]))
    assert "learning_rate=0.003,augment=none" in str(err.value) and "learning_rate=0.003,augment=flip" in str(err.value)
    assert "learning_rate=0.001" not in str(err.value)
    # Adding a value alters no existing point.
    more = _sweep_file(tmp_path / "more.gin", new.base[0], grid["out"], grid=GRID.replace("0.003]", "0.003, 0.01]"))
    extended = sweep.read_sweep_file(str(more))
    sweep.check_unchanged(state, sweep.expand(extended), extended, str(grid["out"]))
    # The command line says so and trains nothing.
    proc = subprocess.run([sys.executable, "-m", "trainer.sweep", str(changed)], cwd=REPO, env=helpers.env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "learning_rate=0.003,augment=none" in proc.stderr.splitlines()[-1]
    assert json.loads((grid["out"] / "sweep.json").read_text()) == state


def test_compare_shows_varied_values_and_takes_several_sweeps(grid, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(grid["out"], other)
    rows = compare.compare([str(grid["out"])], compute_plan=False)
    assert sorted(r["run"] for r in rows) == sorted(NAMES)
    for r in rows:
        assert r["settings"]["learning_rate"] == r["run"].split(",")[0].split("=")[1]
        assert r["settings"]["augment"] == r["run"].split("=")[-1]
    table = compare.format_table(rows).splitlines()
    assert table[0].split()[-2:] == ["learning_rate", "augment"]
    both = compare.compare([str(grid["out"]), str(other)], compute_plan=False)
    assert len(both) == 8 and {r["sweep"] for r in both} == {"out", "other"}
    markdown = compare.format_markdown(both).splitlines()
    assert markdown[0].endswith("| sweep | learning_rate | augment |")


def test_invalid_point_fails_before_any_point_trains(tmp_path, train_base_gin, train_synthetic_dir):
    grid = ("{'trainer.optim.constant.learning_rate': [-0.001, 0.001], "
            f"'DATA_DIR': {{'ok': {train_synthetic_dir!r}, 'missing': {str(tmp_path / 'nowhere')!r}}}}}")
    out = tmp_path / "out"
    sweep_file = _sweep_file(tmp_path / "bad.gin", train_base_gin, out, grid=grid).read_text()
    (tmp_path / "bad.gin").write_text(sweep_file.replace("EPOCHS = 2", "EPOCHS = 1"))
    proc = subprocess.run([sys.executable, "-m", "trainer.sweep", str(tmp_path / "bad.gin"), "--parallel=2"],
                          cwd=REPO, env=helpers.env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "3 of 4 points failed" in proc.stderr, proc.stdout + proc.stderr
    events = re.findall(r"^\[sweep\] (\w+) (\S+?):? ", proc.stdout, re.M)
    first_start = next(i for i, (what, _) in enumerate(events) if what == "start")
    invalid = {"learning_rate=-0.001,data_dir=ok", "learning_rate=-0.001,data_dir=missing"}
    assert {name for what, name in events[:first_start] if what == "failed"} == invalid
    report = {p["point"]: p for p in json.loads((out / "report.json").read_text())["points"]}
    for name in invalid:
        assert report[name]["status"] == "failed" and report[name]["starts"] == 0
        assert "learning_rate" in report[name]["error"] and "\n" not in report[name]["error"]
    missing = report["learning_rate=0.001,data_dir=missing"]
    assert missing["error"].startswith("error: ")
    assert missing["status"] == "failed" and "nowhere" in missing["error"], missing
    assert report["learning_rate=0.001,data_dir=ok"]["status"] == "finished"
    assert "## Failed points" in (out / "report.md").read_text()
    assert not (out / "learning_rate=-0.001,data_dir=ok").exists()


def test_random_sweep_same_seed_same_points(tmp_path, train_base_gin):
    def write(name, seed):
        return _sweep_file(tmp_path / name, train_base_gin, tmp_path / "random", grid="{}", extra=(
            "sweep.random = {'trainer.optim.constant.learning_rate': ('log_uniform', 1e-4, 1e-1), "
            "'BATCH_SIZE': [10, 20, 30], 'SEED': ('int_uniform', 0, 1000)}\n"
            f"sweep.num_points = 5\nsweep.seed = {seed}\n"))

    def points(path):
        return [(p.name, p.values) for p in sweep.expand(sweep.read_sweep_file(str(path)))]

    first, again, other = points(write("a.gin", 7)), points(write("b.gin", 7)), points(write("c.gin", 8))
    assert first == again and first != other and len(first) == 5 and len({n for n, _ in first}) == 5
    for name, values in first:
        assert name.startswith(f"{first.index((name, values)):03d},")
        assert 1e-4 <= values["trainer.optim.constant.learning_rate"] <= 1e-1
        assert values["BATCH_SIZE"] in (10, 20, 30) and 0 <= values["SEED"] <= 1000
    # The dry run prints the same points, one name and one command each, and writes nothing.
    proc = subprocess.run([sys.executable, "-m", "trainer.sweep", str(tmp_path / "a.gin"), "--dry_run"], cwd=REPO,
                          env=helpers.env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert re.findall(r"^  (\S+)$", proc.stdout, re.M) == [n for n, _ in first]
    assert proc.stdout.count("python -m trainer.main --gin_file=") == 5 and "5 valid points" in proc.stdout
    assert not (tmp_path / "random").exists()


def test_sweep_file_errors_name_the_line(tmp_path):
    path = tmp_path / "typo.gin"
    path.write_text("sweep.base = ['gin/quickstart.gin']\nsweep.gird = {'EPOCHS': [1, 2]}\n")
    with pytest.raises(UserError, match=r"line 2: no field 'sweep.gird'. Did you mean 'sweep.grid'"):
        sweep.read_sweep_file(str(path))
    path.write_text("sweep.base = ['gin/quickstart.gin']\nsweep.grid = {'EPOCHS': [1, 2]}\nsweep.metric = 'top1'\n")
    with pytest.raises(UserError, match="sweep.metric = 'top1'"):
        sweep.read_sweep_file(str(path))


def test_shipped_sweep_expands_and_checks():
    shipped = sweep.read_sweep_file("gin/sweeps/quickstart_lr_aug.gin")
    points = sweep.expand(shipped)
    assert len(points) == 9 and points[4].name == "learning_rate=0.001,augment=flip"
    values = sweep.check_point(shipped, points[4], "/tmp/not-written")
    assert values["AUGMENT"] == "flip(0.5)" and values["learning_rate"] == 0.001 and values["EPOCHS"] == 6
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    assert "## Run a sweep" in readme and "python -m trainer.sweep gin/sweeps/quickstart_lr_aug.gin" in readme
