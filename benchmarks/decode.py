"""Images/s of `Preprocessing.decode` against another revision's and against a bare `tf.io.decode_image`.

    python benchmarks/decode.py                      # against HEAD's trainer/data/preprocess.py
    python benchmarks/decode.py --baseline=3c1963a --num_images=2000 --image_size=64

One process, the same encoded images in memory (random-pixel JPEGs at
--image_size, so no resize), a tf.data map with 2 parallel calls, batches of
100. Timed passes alternate between the four (this checkout's decode, the
baseline revision's, loaded from `git show`, this checkout's with what a
TFRecord index says of these images (`known`: all at --image_size, none WebP,
within max_pixels), and `tf.io.decode_image` with 3 channels alone: no header
check, no pixel limit, no resize test); the first pass of each is warm-up.
Prints the median images/s of each and its ratio to the baseline revision's.
"""

import argparse
import importlib.util
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _revision_module(revision):
    """trainer/data/preprocess.py as it was at `revision`, imported under another name."""
    source = subprocess.run(["git", "show", f"{revision}:trainer/data/preprocess.py"], capture_output=True,
                            text=True, check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(tempfile.mkdtemp(), "baseline_preprocess.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(source.stdout)
    spec = importlib.util.spec_from_file_location("baseline_preprocess", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default="HEAD", help="git revision whose decode is the baseline")
    parser.add_argument("--num_images", type=int, default=2000)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--passes", type=int, default=8)
    args = parser.parse_args()
    import numpy as np  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from PIL import Image  # pylint: disable=import-outside-toplevel

    from trainer.data.preprocess import KnownImages, Preprocessing  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(0)
    images = []
    for _ in range(args.num_images):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (args.image_size, args.image_size, 3), np.uint8)).save(buffer, "JPEG")
        images.append(buffer.getvalue())
    size = args.image_size
    known = KnownImages(size * size, (size, size), False)  # What a TFRecord index says of these images.
    decoders = {"this checkout": Preprocessing(args.image_size).decode,
                "this checkout, indexed": lambda e: Preprocessing(size).decode(e, known=known),
                f"baseline {args.baseline}": _revision_module(args.baseline).Preprocessing(args.image_size).decode,
                "decode_image alone": lambda e: tf.io.decode_image(e, channels=3, expand_animations=False)}
    datasets = {name: tf.data.Dataset.from_tensor_slices(images).map(fn, num_parallel_calls=2).batch(100)
                for name, fn in decoders.items()}
    seconds = {name: [] for name in datasets}
    for pass_ in range(args.passes + 1):
        for name, dataset in datasets.items():
            start = time.perf_counter()
            for _ in dataset:
                pass
            if pass_:
                seconds[name].append(time.perf_counter() - start)
    baseline = statistics.median(seconds[f"baseline {args.baseline}"])
    print(f"{args.num_images} JPEGs at {args.image_size} px, median of {args.passes} passes")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"  {name:<24}{args.num_images / median:>10,.0f} images/s  {baseline / median:5.2f}x the baseline")


if __name__ == "__main__":
    main()
