"""What one short training command costs from start to end, against a baseline revision, in the same run.

    python benchmarks/startup.py --baseline=3391b8b [--repeats=5]

Writes a small synthetic dataset (5 classes x 60 training images, 20 val
images a class, the size of the tests' training runs), then runs `python -m
trainer.main` on the small network (32 px, batch 20, 1 epoch of 15 steps, no
augmentation, no export) from a copy of the baseline revision's trainer/ and
gin/ (`git archive`) and from a copy of this checkout's, both in temporary
folders, so neither has compiled bytecode the other lacks: one unmeasured
run of each, then --repeats of each, taking turns at going first.
Prints each one's median wall time and CPU time (user + system) and this
checkout's ratio to the baseline. Most of such a run is start-up: importing
TensorFlow, building the network and tracing the steps and the input
pipeline, which every command and every test subprocess pays.
"""

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

GIN = """
include 'gin/common.gin'
include 'gin/models/small.gin'
include 'gin/strategy/default.gin'
DATA_DIR = '{data_dir}'
IMAGE_SIZE = 32
BATCH_SIZE = 20
EPOCHS = 1
NUM_CLASSES = 5
MODEL_DIR = None
AUGMENT = None
SEED = 1
trainer.train.export = False
trainer.train.evaluate_best = False
"""


def _children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(checkout, gin_file, model_dir):
    """(wall seconds, CPU seconds) of one training command run from `checkout`."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONPATH=checkout,
               TRAINER_CACHE_DIR=os.path.join(os.path.dirname(model_dir), "cache"))
    cpu, start = _children_cpu(), time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "trainer.main", f"--gin_file={gin_file}", f"--model_dir={model_dir}"],
                          cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          check=False)
    if proc.returncode:
        sys.exit(f"The run from {checkout} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start, _children_cpu() - cpu


def _measure(work, revision, repeats):
    """{name: [(wall, CPU) of each measured run]} for the baseline revision and this checkout."""
    from trainer.data import synthetic  # pylint: disable=import-outside-toplevel

    data_dir = synthetic.write_synthetic(os.path.join(work, "tiny-imagenet-200"), num_classes=5, per_class=60,
                                         val_per_class=20, test_images=5)
    gin_file = os.path.join(work, "run.gin")
    with open(gin_file, "w", encoding="utf-8") as f:
        f.write(GIN.format(data_dir=data_dir))
    baseline, this = os.path.join(work, "baseline"), os.path.join(work, "this")
    os.makedirs(baseline)
    archive = subprocess.run(["git", "-C", REPO, "archive", revision, "trainer", "gin"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", baseline], input=archive, check=True)
    for folder in ("trainer", "gin"):
        shutil.copytree(os.path.join(REPO, folder), os.path.join(this, folder),
                        ignore=shutil.ignore_patterns("__pycache__"))
    checkouts = {f"baseline {revision}": baseline, "this checkout": this}
    times = {name: [] for name in checkouts}
    for i in range(repeats + 1):
        for j, (name, checkout) in enumerate(list(checkouts.items())[::1 if i % 2 else -1]):  # Each first in turn.
            measured = _run(checkout, gin_file, os.path.join(work, f"run-{j}-{i}"))
            if i:  # The first run of each writes its bytecode.
                times[name].append(measured)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="HEAD", help="git revision whose trainer is the baseline")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be 1 or more")
    work = tempfile.mkdtemp(prefix="startup-")
    try:
        times = _measure(work, args.baseline, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base_wall, base_cpu = (statistics.median(t[k] for t in times[f"baseline {args.baseline}"]) for k in (0, 1))
    print(f"One training command (small network, 1 epoch of 15 steps), median of {args.repeats}, load "
          f"{os.getloadavg()[0]:.2f} (about 1 of it this benchmark's):")
    for name, measured in times.items():
        wall, cpu = (statistics.median(t[k] for t in measured) for k in (0, 1))
        print(f"  {name:<22}{wall:6.2f} s wall {cpu:6.2f} s CPU   {base_wall / wall:5.2f}x / {base_cpu / cpu:5.2f}x "
              "the baseline's speed")


if __name__ == "__main__":
    main()
