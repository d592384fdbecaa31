"""Peak memory of training a network on CPU, against the plan's training-memory estimate (`plan.MEASURED_RATIO`).

    python benchmarks/network_memory.py [--networks gin/models/small.gin,...] [--batches 2,4] [--steps 3]

For each network gin file and each batch size, a fresh process parses the gin
file (a model file gets NUM_CLASSES = 200; gin/phase64.gin stands for the
reference network, its default network), imports TensorFlow and starts its
runtime (one tiny op, one batch of random float32 images in [0, 1] and one-hot
labels in a repeated tf.data dataset), then reads its resident memory
(/proc/self/status VmRSS): the baseline. Then, as `trainer.train.train` does
under the default strategy, it builds the network at --image_size px
(`builder.build_network`), the optimizer (`trainer.optim.adam`, built on the
trainable variables) and the trainer's own compiled step
(`trainer.steps.build_steps`: forward, loss, `tf.GradientTape`,
`apply_gradients`), and runs --steps training steps, one `tf.function` call
each, on that batch. Its peak resident memory (VmHWM, reset to the baseline
through /proc/self/clear_refs where the kernel allows) above the baseline is
what the estimate, `training_memory(plan).at(batch)`, should cover: weights,
their gradients and Adam's two slots (the estimate's fixed part) plus
activations kept for the backward pass (its per-image part); TensorFlow's
workspace and the gradients in flight are what the ratio measures. Two batch
sizes split the measured peak into a fixed and a per-image part, next to the
estimate's.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

NETWORKS = ["gin/models/small.gin", "gin/models/resnet18.gin", "gin/models/densenet_bc.gin", "gin/phase64.gin"]
GB = 2 ** 30  # As `plan.format_bytes` prints it.


def _status(field):
    """A field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def _reset_peak():
    """Resets VmHWM to the current VmRSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measure(gin_file, image_size, batch_size, num_steps):
    import gin  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    from trainer import cli, config, optim, steps  # pylint: disable=import-outside-toplevel
    from trainer.models import builder, plan  # pylint: disable=import-outside-toplevel

    cli.register_configurables()
    config.parse_gin([gin_file], defaults=["NUM_CLASSES = 200"])
    name, _ = builder.declared()
    num_classes = int(gin.query_parameter("%NUM_CLASSES"))
    strategy = tf.distribute.get_strategy()
    images = tf.random.uniform([batch_size, image_size, image_size, 3], seed=1)
    labels = tf.one_hot(tf.random.uniform([batch_size], maxval=num_classes, dtype=tf.int32, seed=2), num_classes)
    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
    iterator = iter(strategy.distribute_datasets_from_function(lambda ctx: dataset))
    float((tf.constant(1.0) + 1.0).numpy())  # TensorFlow's runtime, started before the baseline.
    baseline = _status("VmRSS")
    reset = _reset_peak()
    peak_before = _status("VmHWM")
    with strategy.scope():
        model = builder.build_network(image_size)
        optimizer = optim.adam(learning_rate=1e-3)
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    train_steps, _ = steps.build_steps(strategy, model, optimizer, step, batch_size, num_classes)
    built = _status("VmRSS")
    seconds = []
    for _ in range(num_steps):
        start = time.perf_counter()
        train_steps(iterator, tf.constant(1, tf.int32)).numpy()
        seconds.append(time.perf_counter() - start)
    peak = _status("VmHWM")
    after = _status("VmRSS")
    memory = plan.training_memory(plan.make_plan(image_size))  # After the peak is read: it builds a graph model.
    print(json.dumps({"network": name, "batch": batch_size, "baseline": baseline, "peak_reset": reset,
                      "peak_before": peak_before, "built": built, "peak": peak, "after": after,
                      "fixed": memory.fixed, "per_image": memory.per_image, "estimate": memory.at(batch_size),
                      "seconds": seconds}))


def measure(gin_file, image_size, batch_size, num_steps):
    """One (network, batch) in a fresh process: the measurement's JSON as a dict."""
    out = subprocess.run([sys.executable, __file__, "--measure", f"--networks={gin_file}",
                          f"--batches={batch_size}", f"--image_size={image_size}", f"--steps={num_steps}"],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{gin_file} at batch {batch_size} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(header, rows):
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
              + " |" for r in rows]
    return "\n".join(lines)


def report(results, image_size, num_steps):
    """The rows (estimate, measured peak above the baseline, ratio), the largest ratio, the fixed/per-image split."""
    rows = []
    for r in results:
        extra = r["peak"] - r["baseline"]
        rows.append((f"{r['network']} ({os.path.basename(r['gin_file'])})", str(r["batch"]), f"{r['estimate']:,}",
                     f"{r['estimate'] / GB:.2f}", f"{extra / GB:.2f}", f"{(r['built'] - r['baseline']) / GB:.2f}",
                     f"{extra / r['estimate']:.2f}", f"{max(r['seconds'][1:] or r['seconds']):.1f}"))
    print(f"\nTraining memory at {image_size} px, {num_steps} steps, fresh process each; peak resident memory "
          f"(VmHWM) above the baseline (VmRSS after starting TensorFlow, before the network is built); GB = 2^30 "
          f"bytes:\n")
    print(_table(("network", "batch", "estimate (bytes)", "estimate GB", "peak GB", "built GB", "peak / estimate",
                  "step s"), rows))
    worst = max(results, key=lambda r: (r["peak"] - r["baseline"]) / r["estimate"])
    ratio = (worst["peak"] - worst["baseline"]) / worst["estimate"]
    print(f"\nLargest ratio: {ratio:.3f} ({worst['network']}, batch {worst['batch']}: "
          f"{(worst['peak'] - worst['baseline']) / GB:.2f} GB measured, estimate {worst['estimate'] / GB:.2f} GB)")
    split, slopes = [], []
    for gin_file in dict.fromkeys(r["gin_file"] for r in results):
        mine = sorted((r for r in results if r["gin_file"] == gin_file), key=lambda r: r["batch"])
        if len(mine) < 2 or mine[0]["batch"] == mine[-1]["batch"]:
            continue
        lo, hi = mine[0], mine[-1]
        per_image = ((hi["peak"] - hi["baseline"]) - (lo["peak"] - lo["baseline"])) / (hi["batch"] - lo["batch"])
        fixed = (lo["peak"] - lo["baseline"]) - lo["batch"] * per_image
        slopes.append(per_image / lo["per_image"])
        split.append((lo["network"], f"{lo['batch']}-{hi['batch']}", f"{fixed / GB:.2f}", f"{lo['fixed'] / GB:.2f}",
                      f"{per_image / GB:.3f}", f"{lo['per_image'] / GB:.3f}"))
    if split:
        print("\nSplit from the two batch sizes (measured: the line through the two peaks):\n")
        print(_table(("network", "batches", "fixed GB measured", "fixed GB estimate", "per image GB measured",
                      "per image GB estimate"), split))
        slope = max(slopes)
        rounded = math.ceil(slope * 10 - 1e-9) / 10
        allowance = max((r["peak"] - r["baseline"]) - rounded * r["estimate"] for r in results)
        print(f"\nLargest per-image ratio (measured / estimate): {slope:.3f}, rounded up {rounded}; the most any "
              f"row's peak exceeds {rounded}x its estimate: {allowance / GB:.3f} GB "
              f"(`plan.MEASURED_RATIO` and `plan.RUNTIME_ALLOWANCE`)")
    return ratio


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--networks", default=",".join(NETWORKS), help="Comma-separated gin files.")
    parser.add_argument("--batches", default="2,4", help="Comma-separated batch sizes.")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="Training steps in each process.")
    parser.add_argument("--json", default=None, help="Also write the raw measurements to this file.")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    networks = [n for n in args.networks.split(",") if n]
    batches = [int(b) for b in args.batches.split(",") if b]
    if args.measure:
        _measure(networks[0], args.image_size, batches[0], args.steps)
        return
    results = []
    for gin_file in networks:
        for batch_size in batches:
            result = measure(gin_file, args.image_size, batch_size, args.steps)
            result["gin_file"] = gin_file
            results.append(result)
            print(f"{result['network']} batch {batch_size}: peak {(result['peak'] - result['baseline']) / GB:.2f} GB "
                  f"above the baseline, estimate {result['estimate'] / GB:.2f} GB; steps "
                  f"{', '.join(f'{s:.1f}' for s in result['seconds'])} s", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    report(results, args.image_size, args.steps)


if __name__ == "__main__":
    main()
