"""What the evaluation's image grids cost to draw, against a baseline revision's figures.py, in the same process.

    python benchmarks/figures.py --baseline=HEAD~1 [--repeats=5]

Loads trainer/evaluation/figures.py as it is at --baseline (`git show`) and as
it is in this checkout, and draws the three grids a run draws (a run's 16
augmented inputs, 8 a row; 16 mistakes with two-line captions; 8 Grad-CAM
pairs) from the same 64 px images with each, taking turns at going first.
Prints each one's median time a grid and this checkout's ratio.
"""

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = "trainer/evaluation/figures.py"


def load(name, source):
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(name, f.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.remove(f.name)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="a git revision")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    baseline = subprocess.run(["git", "show", f"{args.baseline}:{PATH}"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout
    with open(os.path.join(REPO, PATH), encoding="utf-8") as f:
        current = f.read()
    modules = {f"baseline {args.baseline}": load("figures_baseline", baseline),
               "this checkout": load("figures_now", current)}
    rng = np.random.default_rng(0)
    images = rng.random((16, 64, 64, 3)).astype(np.float32)
    grids = {
        "run's augmented inputs": lambda m: m.image_grid(images, [f"n0144353{i} (63%)" for i in range(16)],
                                                         "augmented training images", cols=8),
        "mistakes": lambda m: m.image_grid(images, [f"true: goldfish {i}\npred: tabby cat 0.50" for i in range(16)],
                                           "Most confident mistakes, val"),
        "Grad-CAM": lambda m: m.image_grid(images[:8], [f"true: goldfish {i}\npred: tabby 0.5" for i in range(8)],
                                           "Grad-CAM", overlays=rng.random((8, 64, 64))),
    }
    print(f"One image grid, median of {args.repeats}, load {os.getloadavg()[0]:.2f}:")
    for grid, draw in grids.items():
        times = {name: [] for name in modules}
        for module in modules.values():
            draw(module)  # Unmeasured: matplotlib's font cache and first imports.
        for repeat in range(args.repeats):
            order = list(modules.items())
            for name, module in order if repeat % 2 else order[::-1]:
                start = time.perf_counter()
                draw(module)
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times[next(iter(modules))])
        for name, t in times.items():
            print(f"  {grid:24s} {name:22s} {statistics.median(t) * 1000:6.0f} ms  {base / statistics.median(t):5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
