"""Peak memory of decoding a training set into memory, against the decoded size the memory check counts.

    python benchmarks/decode_memory.py [--num_images 4000] [--image_size 256]

Writes (once) a synthetic dataset of --num_images JPEGs at --image_size px,
then in a fresh process starts tf.data's runtime on two images and builds the
in-memory training set as the trainer does (`Data.load_train`: decoded in parallel straight into one array that
the tensor shares) and prints the process's peak resident memory above its
resident memory before the load, as a multiple of the decoded size
(N x S x S x 3 bytes) that `trainer.models.plan.check_memory` counts.
"""

import argparse
import json
import os
import resource
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _rss():
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure(data_dir, image_size):
    from trainer.data import pipeline  # pylint: disable=import-outside-toplevel

    data = pipeline.data(data_dir, image_size=image_size, batch_size=64, in_memory=True)
    data.num_train  # Listed before the baseline.
    start = _rss()
    for _ in pipeline._decoded(data, "val").take(2):  # TensorFlow's tf.data runtime, started once a process.
        pass
    before = _rss()
    images, _, _ = data.load_train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"decoded": data.decoded_bytes(), "runtime": before - start, "rss_before": before,
                      "peak": peak, "after": _rss(), "shape": images.shape.as_list()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_images", type=int, default=4000)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    data_dir = args.data_dir or f"/tmp/decode-memory-{args.num_images}x{args.image_size}"
    if args.measure:
        _measure(data_dir, args.image_size)
        return
    from trainer.data import synthetic  # pylint: disable=import-outside-toplevel

    classes = 10
    if not (args.data_dir and os.path.isdir(data_dir)):  # A given dataset is used as it is.
        synthetic.ensure_synthetic(data_dir, num_classes=classes, per_class=args.num_images // classes,
                                   val_per_class=1, test_images=0, image_size=args.image_size)
    out = subprocess.run([sys.executable, __file__, "--measure", f"--data_dir={data_dir}",
                          f"--image_size={args.image_size}"], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    mb = 2 ** 20
    extra = result["peak"] - result["rss_before"]
    print(f"{result['shape'][0]} images at {args.image_size} px: decoded {result['decoded'] / mb:,.0f} MB; peak "
          f"resident memory {extra / mb:,.0f} MB above the {result['rss_before'] / mb:,.0f} MB before the load "
          f"= {extra / result['decoded']:.2f}x the decoded size; {(result['after'] - result['rss_before']) / mb:,.0f}"
          f" MB held after it. (Starting tf.data took {result['runtime'] / mb:,.0f} MB first, whatever the data.)")


if __name__ == "__main__":
    main()
