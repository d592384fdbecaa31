"""Images/s of the training input pipeline, ours side by side with a ceiling and two baselines, in one run.

    python benchmarks/input_pipeline.py [--data_dir /tmp/tiny-imagenet-bench-10k] [--num_images 10000]
                                        [--tfrecord_shards 8] [--only ours --only stream_tfrecord ...]
                                        [--drop_caches]

Each pipeline decodes the JPEGs of a synthetic dataset in the Tiny ImageNet
layout (written once, then reused), resizes to --image_size, augments with
the phase64_aug policy (gin/augment/reference_heavy.gin) and batches by
--batch_size:

- ours: `trainer.data.pipeline.data(..., in_memory=True).train()` as the
  trainer runs it (every image decoded once into memory as uint8, a full
  permutation every epoch, per-batch vectorised ops, one fused warp per batch).
- stream_files: the same `data(...)` with `in_memory=False`: each epoch reads
  and decodes every JPEG file again (file order drawn anew each epoch, then
  the shuffle buffer); no in-memory cache.
- stream_tfrecord: the same images converted once with
  `trainer.data.convert.convert` into --tfrecord_shards shards in
  `<data_dir>-tfrecord-<shards>` (reused when present), read by
  `data(..., source=trainer.sources.tfrecord, in_memory=False)`: shards
  interleaved in parallel, parsed, decoded every epoch.
- ceiling: the same `data(...).train()` with `augment=None`: the same
  decoded, permuted, batched and float-converted data, no augmentation. The
  table gives ours as a fraction of it: what the augmentation costs.
- python (a): the reference's path: PIL decode and per-image PIL/numpy
  augmentation of the same policy in a Python generator, one image at a time
  (as Keras' ImageDataGenerator with imgaug did). No cache: it decodes every
  epoch, so its warm epochs read the files from the OS cache. It is leaner
  than imgaug (one PIL warp per geometric op, no augmenter objects, uint8
  throughout, so its multiply clips where the reference's did not); the
  reference's own imgaug path ran about 1,100 images/s on one core of the
  development machine.
- keras (b): `keras.utils.image_dataset_from_directory`, cached, shuffled and
  batched like ours, then Keras 3 preprocessing layers with the closest policy Keras offers: flip, additive
  brightness (no multiplicative layer), zoom (scale 0.5-2: Keras zooms out at
  most 2x), rotation and random erasing on every image (no Sometimes, no
  coarse dropout).

Cold is the first epoch including building the dataset (for ours and the
ceiling that is where every image is decoded into memory), the median of
--cold_repeats such epochs each on a new pipeline, after an untimed
warm-up of every `trainer.data` path on a tiny dataset (so that the first
pipeline does not pay the process's start-up alone), warm the mean of
the next --warm_epochs (ours, the ceiling and keras read memory; the
streaming rows and python decode again, from the OS file cache: no row
reads a disk). With --drop_caches (Linux, root) the page cache is emptied
before each cold epoch, so the cold epochs read every file from the disk,
as every epoch of a dataset larger than the machine's memory does. The
table gives images/s, ours' ratio to each pipeline and each pipeline as
a fraction of the ceiling; then the three ratios issue 15 sets targets
for. Then `stages`: the streaming stages alone (read; read + decode;
read + bare decode; for TFRecord read + decode a batch at a time, as its
pipeline does) for files and TFRecord, and what the stages' rates
let TFRecord streaming warm / in-memory warm be at most (about). Last,
`mixing`: mean distinct classes per batch over one epoch, in memory and both
streamed, against a uniformly random permutation's expectation. The
machine's load average is printed first and last: run it when nothing else is.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import gin  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from PIL import Image  # pylint: disable=wrong-import-position
import tensorflow as tf  # pylint: disable=wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer import cli  # pylint: disable=wrong-import-position
from trainer import config  # pylint: disable=wrong-import-position
from trainer.data import synthetic  # pylint: disable=wrong-import-position
from trainer.data.sources.tiny_imagenet import TinyImageNet  # pylint: disable=wrong-import-position

POLICY_FILE = "gin/augment/reference_heavy.gin"
RUNS = ("ours", "ceiling", "stream_files", "stream_tfrecord", "python", "keras")  # In the order they run.
EXTRAS = ("stages", "mixing")  # Run after the table.


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default="/tmp/tiny-imagenet-bench-10k",
                        help="synthetic dataset directory (written once if missing)")
    parser.add_argument("--num_images", type=int, default=10_000, help="training images (500 a class)")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--warm_epochs", type=int, default=2, help="epochs averaged for the warm figure")
    parser.add_argument("--cold_repeats", type=int, default=3,
                        help="cold first epochs per pipeline, each on a new pipeline; the table gives their median")
    parser.add_argument("--drop_caches", action="store_true",
                        help="empty the page cache (Linux, root) before each cold epoch: cold reads go to the disk, "
                             "as every epoch's do for a dataset larger than memory")
    parser.add_argument("--tfrecord_shards", type=int, default=8,
                        help="training shards of the TFRecord copy (written once to <data_dir>-tfrecord-<shards>)")
    parser.add_argument("--only", choices=[*RUNS, *EXTRAS], action="append",
                        help="run only these pipelines (repeatable); 'stages': the streaming stages alone; "
                             "'mixing': the classes-per-batch figures")
    return parser.parse_args(argv)


def _ensure_data(data_dir, num_images):
    classes = max(1, num_images // 500)
    synthetic.ensure_synthetic(data_dir, num_classes=classes, per_class=500, val_per_class=1,
                               test_images=0, image_size=64)
    return TinyImageNet(data_dir)


def _ensure_tfrecord(data_dir, shards):
    """The TFRecord copy of `data_dir` (converted once, next to it; a finished conversion is reused)."""
    from trainer.data import convert  # pylint: disable=import-outside-toplevel

    out = f"{data_dir.rstrip('/')}-tfrecord-{shards}"
    start = time.perf_counter()
    _, state = convert.convert(data_dir, out, shards=shards)
    if state != "done":
        print(f"converted {data_dir} to {shards} TFRecord shards in {out} ({time.perf_counter() - start:.1f} s)")
    return out


def _drop_page_cache():
    """Empties the kernel's page cache (Linux, as root), so that the next read of every file goes to the disk."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
            f.write("3\n")
    except OSError as e:
        sys.exit(f"--drop_caches needs Linux and root: cannot write /proc/sys/vm/drop_caches ({e.strerror})")


def _time_epochs(make_batches, images_per_epoch, args):
    """Images/s of a cold first epoch (building the dataset included) and of the next `args.warm_epochs` epochs.

    `make_batches` builds a new pipeline at each call (nothing cached from the previous one). The cold
    figure is the median of `args.cold_repeats` such first epochs (a few seconds each, so another process's burst
    of work on a shared machine moves a single one a lot); the warm one continues the last pipeline. Freeing
    the previous pipeline is not timed (it was, in the figures recorded before 2026-12-07), nor, with
    `args.drop_caches`, emptying the page cache before each cold epoch: its reads go to the disk.
    """
    batch_size = args.batch_size
    colds = []
    for _ in range(args.cold_repeats):
        iterator = None  # Frees the previous pipeline (and its decoded images) first.
        if args.drop_caches:
            _drop_page_cache()
        start = time.perf_counter()
        iterator = iter(make_batches())
        seen = 0
        for _ in range(images_per_epoch // batch_size):
            seen += len(next(iterator)[0])
        colds.append(seen / (time.perf_counter() - start))
    start, seen = time.perf_counter(), 0
    for _ in range(args.warm_epochs * (images_per_epoch // batch_size)):
        seen += len(next(iterator)[0])
    return float(np.median(colds)), seen / (time.perf_counter() - start), colds


# ---------------------------------------------------------------------------
# Ours, and the ceiling: the same data without augmentation.


def _policy():
    """The phase64_aug policy string, read from its gin file."""
    config.parse_gin([POLICY_FILE])
    return gin.query_parameter("%AUGMENT")


def _data(args, data_dir, augment, in_memory=True, tfrecord_source=False):
    """`trainer.data.pipeline.data(...)` of the benchmark: in memory, or streamed from files or TFRecord shards."""
    from trainer.data import pipeline  # pylint: disable=import-outside-toplevel
    from trainer.data.sources import tfrecord  # pylint: disable=import-outside-toplevel

    source = {"source": tfrecord.tfrecord} if tfrecord_source else {}
    return pipeline.data(data_dir, image_size=args.image_size, batch_size=args.batch_size, augment=augment,
                         in_memory=in_memory, **source)


def _timed(args, dataset, data_dir, augment, in_memory=True, tfrecord_source=False):
    """`_time_epochs` of `_data(...).train()`, a new `Data` (so a new decode into memory) for each cold epoch."""
    make = lambda: _data(args, data_dir, augment, in_memory, tfrecord_source).train()  # noqa: E731
    count = len(dataset.files("train")[0])
    return _time_epochs(make, count, args)


def _ours(args, dataset, augment):
    return _timed(args, dataset, dataset.data_dir, augment)


def warm_up(args):
    """Runs ours and the ceiling for a few batches on a tiny dataset, untimed.

    The first pipeline of a process otherwise pays TensorFlow's and the
    augmentation package's one-off start-up (imports, thread pools, kernel
    set-up) in its cold figure: ours measured 599 images/s cold when run
    first, 1,683 when run after the ceiling.
    """
    small = synthetic.ensure_synthetic(args.data_dir.rstrip("/") + "-warmup", num_classes=1, per_class=256,
                                       val_per_class=1, test_images=0, image_size=64)
    small_tfrecord = _ensure_tfrecord(small, 2)
    for augment in (_policy(), None):
        for data in (_data(args, small, augment), _data(args, small, augment, in_memory=False),
                     _data(args, small_tfrecord, augment, in_memory=False, tfrecord_source=True)):
            for _ in data.train().take(2):
                pass


def ours(args, dataset):
    return _ours(args, dataset, _policy())


def ceiling(args, dataset):
    return _ours(args, dataset, None)


# ---------------------------------------------------------------------------
# Streaming: every image read and decoded again each epoch, from its file or from TFRecord shards.


def stream_files(args, dataset):
    return _timed(args, dataset, dataset.data_dir, _policy(), in_memory=False)


def stream_tfrecord(args, dataset):
    return _timed(args, dataset, _ensure_tfrecord(dataset.data_dir, args.tfrecord_shards), _policy(), in_memory=False,
                  tfrecord_source=True)


def stages(args, dataset):
    """Prints images/s of the streaming stages alone (one epoch, shuffled order, no augmentation, no batch).

    Read: the source's (encoded bytes, label, id); + decode: then `Preprocessing.decode` as the pipeline
    maps it (with what the source knows of its images: a TFRecord index's sizes); + bare decode: then
    `tf.io.decode_image` alone (no pixel check, no WebP branch, no resize test), the least any decode costs.
    Median of 3 passes each. Shows which stage the TFRecord source speeds up and which dominates.
    """
    tfrecord_dir = _ensure_tfrecord(dataset.data_dir, args.tfrecord_shards)
    print("\nstreaming stages alone (images/s, median of 3 passes; min-max):")
    medians = {}
    bare = lambda image: tf.io.decode_image(image, channels=3, expand_animations=False)  # noqa: E731
    for name, data in (("files", _data(args, dataset.data_dir, None, in_memory=False)),
                       ("TFRecord", _data(args, tfrecord_dir, None, in_memory=False, tfrecord_source=True))):
        known = data.source.known_images("train")
        decode = lambda image, d=data, k=known: d.preprocess.decode(image, known=k)  # noqa: E731
        batched = lambda images, d=data, k=known: d.preprocess.decode_batch(images, known=k)  # noqa: E731
        for stage, fn in (("read", None), ("read + decode", decode), ("read + bare decode", bare),
                          ("read + batch decode", batched)):
            if fn is batched and (known is None or not known.decoded):
                continue  # The pipeline decodes a batch at a time only what the converter decoded.

            def make(d=data, fn=fn):
                examples = d.source.examples("train", shuffle_seed=0)
                if fn is batched:
                    ds = examples.batch(256).map(lambda images, labels, _: (fn(images), labels),
                                                 num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
                else:
                    ds = (examples if fn is None else examples.map(
                        lambda image, label, id_: (fn(image), label), num_parallel_calls=tf.data.AUTOTUNE,
                        deterministic=False)).batch(256)
                options = tf.data.Options()
                options.deterministic = False  # The reads out of order, as training's are by default.
                return ds.with_options(options)
            rates = []
            for _ in range(3):
                start, seen = time.perf_counter(), 0
                for batch in make().prefetch(2):
                    seen += int(batch[1].shape[0])
                rates.append(seen / (time.perf_counter() - start))
            medians[name, stage] = float(np.median(rates))
            print(f"  {name:<9}{stage:<20}{np.median(rates):>10,.0f}  ({min(rates):,.0f}-{max(rates):,.0f})"
                  + ("" if fn is not decode or known is None else f"  (index: {known})"), flush=True)
    return medians


# ---------------------------------------------------------------------------
# How well an epoch is mixed: distinct classes per batch.


def _expected_classes(num_images, num_classes, batch_size):
    """Expected distinct classes in `batch_size` images drawn without replacement (equal classes)."""
    per_class = num_images // num_classes
    absent = 1.0  # P(a given class has none of the batch) = C(N - n, b) / C(N, b).
    for i in range(batch_size):
        absent *= (num_images - per_class - i) / (num_images - i)
    return num_classes * (1.0 - absent)


def mixing(args, dataset):
    """Prints mean (min) distinct classes per batch over the first epoch: in memory and both streamed."""
    tfrecord_dir = _ensure_tfrecord(dataset.data_dir, args.tfrecord_shards)
    count, classes = len(dataset.files("train")[0]), dataset.num_classes
    batches = count // args.batch_size
    print(f"\nmixing: distinct classes per batch of {args.batch_size}, first epoch ({batches} batches) of "
          f"{count} images, {classes} classes; a uniformly random permutation gives "
          f"{_expected_classes(count, classes, args.batch_size):.2f} on average")
    for name, data in (("in memory (full permutation)", _data(args, dataset.data_dir, None)),
                       ("file streaming", _data(args, dataset.data_dir, None, in_memory=False)),
                       ("TFRecord streaming", _data(args, tfrecord_dir, None, in_memory=False,
                                                    tfrecord_source=True))):
        distinct = [len(np.unique(np.argmax(labels, axis=1)))
                    for _, labels in data.train().take(batches).as_numpy_iterator()]
        print(f"  {name:<30} mean {np.mean(distinct):.2f}, min {min(distinct)}, max {max(distinct)}", flush=True)


# ---------------------------------------------------------------------------
# (a) The reference's style: PIL and numpy, one image at a time, in Python.


def _affine_about_centre(image, matrix):
    """PIL warp with output->input 2x2 `matrix` about the centre, bilinear, black fill."""
    width, height = image.size
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    a, b, d, e = matrix
    data = (a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy)
    return image.transform(image.size, Image.Transform.AFFINE, data, Image.Resampling.BILINEAR, fillcolor=0)


def _python_augment(image, rng):
    """phase64_aug on one uint8 HxWx3 array, as imgaug applied it (each op its own pass)."""
    if rng.random() < 0.5:
        image = image[:, ::-1]
    factors = rng.uniform(0.5, 1.5, 3) if rng.random() < 0.5 else rng.uniform(0.5, 1.5)
    image = np.clip(image * np.asarray(factors, np.float32), 0, 255).astype(np.uint8)
    picture = Image.fromarray(image)
    inverse = 1.0 / rng.uniform(0.25, 2.0)
    picture = _affine_about_centre(picture, (inverse, 0.0, 0.0, inverse))
    if rng.random() < 0.7:
        cells = np.arange(picture.size[0]) * 4 // picture.size[0]  # imgaug 0.2.9's minimum 4x4 grid.
        keep = (rng.random((4, 4)) >= 0.2)[cells][:, cells]
        return np.asarray(picture) * keep[..., None].astype(np.uint8)
    angle = np.deg2rad(rng.uniform(-45, 45))
    picture = _affine_about_centre(picture, (np.cos(angle), np.sin(angle), -np.sin(angle), np.cos(angle)))
    return np.asarray(picture)


def _python_batches(files, labels, num_classes, image_size, batch_size):
    rng = np.random.default_rng(0)
    while True:
        order = rng.permutation(len(files))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            images = []
            for i in order[start:start + batch_size]:
                with Image.open(files[i]) as f:
                    picture = f.convert("RGB")
                if picture.size != (image_size, image_size):
                    picture = picture.resize((image_size, image_size), Image.Resampling.BILINEAR)
                images.append(_python_augment(np.asarray(picture), rng))
            batch_labels = np.eye(num_classes, dtype=np.float32)[labels[order[start:start + batch_size]]]
            yield np.stack(images).astype(np.float32) / 255.0, batch_labels


def python_baseline(args, dataset):
    files, labels = dataset.files("train")

    def make():
        return _python_batches(files, np.asarray(labels), dataset.num_classes, args.image_size, args.batch_size)

    return _time_epochs(make, len(files), args)


# ---------------------------------------------------------------------------
# (b) Keras 3: image_dataset_from_directory and preprocessing layers.


def keras_baseline(args, dataset):
    import keras  # pylint: disable=import-outside-toplevel

    def make():
        return _keras_dataset(keras, args, dataset)

    return _time_epochs(make, len(dataset.files("train")[0]), args)


def _keras_dataset(keras, args, dataset):
    ds = keras.utils.image_dataset_from_directory(
        os.path.join(dataset.data_dir, "train"), label_mode="categorical", batch_size=None,
        image_size=(args.image_size, args.image_size), shuffle=True, seed=0, verbose=False)
    augmentation = keras.Sequential([
        keras.layers.Rescaling(1.0 / 255),
        keras.layers.RandomFlip("horizontal"),
        keras.layers.RandomBrightness(0.5, value_range=(0.0, 1.0)),
        keras.layers.RandomZoom(height_factor=(-0.5, 1.0), fill_mode="constant"),  # Scale 0.5-2 (not 0.25).
        keras.layers.RandomRotation(45.0 / 360.0, fill_mode="constant"),
        keras.layers.RandomErasing(factor=0.7, scale=(0.02, 0.33), fill_value=0.0, value_range=(0.0, 1.0)),
    ])
    ds = ds.cache().shuffle(20_000, seed=0).repeat().batch(args.batch_size, drop_remainder=True)
    return ds.map(lambda x, y: (augmentation(x, training=True), y),
                  num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------


def main(argv=None):
    args = _parse_args(argv)
    cli.register_configurables()
    if args.drop_caches:
        _drop_page_cache()  # Fails now, not after the set-up, without Linux and root.
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    dataset = _ensure_data(args.data_dir, args.num_images)
    count = len(dataset.files("train")[0])
    print(f"{count} training JPEGs in {dataset.data_dir}, {args.image_size} px, batch {args.batch_size}, "
          f"policy {POLICY_FILE}")
    _ensure_tfrecord(dataset.data_dir, args.tfrecord_shards)
    warm_up(args)
    runs = {"ours": ours, "ceiling": ceiling, "stream_files": stream_files, "stream_tfrecord": stream_tfrecord,
            "python": python_baseline, "keras": keras_baseline}
    results = {}
    for name in args.only or RUNS:
        if name in EXTRAS:
            continue
        cold, warm, colds = runs[name](args, dataset)
        results[name] = cold, warm
        print(f"  {name}: cold {cold:,.0f} images/s (median of {', '.join(f'{c:,.0f}' for c in colds)}), "
              f"warm {warm:,.0f} images/s", flush=True)
    if results:
        _print_table(results)
        _print_targets(results)
    if not args.only or "stages" in args.only:
        medians = stages(args, dataset)
        if "ours" in results:
            _print_bound(medians, results["ours"][1])
    if not args.only or "mixing" in args.only:
        mixing(args, dataset)
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def _print_table(results):
    labels = {"ours": "ours, in memory", "ceiling": "ceiling (no augment)",
              "stream_files": "streaming, files", "stream_tfrecord": "streaming, TFRecord",
              "python": "(a) python PIL/numpy", "keras": "(b) keras layers"}
    print()
    print(f"{'pipeline':<24}{'cold img/s':>12}{'warm img/s':>12}{'ours/this cold':>16}{'ours/this warm':>16}"
          f"{'of ceiling cold':>17}{'of ceiling warm':>17}")
    for name, (cold, warm) in results.items():
        ratios = ("", "")
        if "ours" in results:
            ratios = (f"{results['ours'][0] / cold:.2f}x", f"{results['ours'][1] / warm:.2f}x")
        fractions = ("", "")
        if "ceiling" in results:
            top = results["ceiling"]
            fractions = (f"{cold / top[0]:.0%}", f"{warm / top[1]:.0%}")
        print(f"{labels[name]:<24}{cold:>12,.0f}{warm:>12,.0f}{ratios[0]:>16}{ratios[1]:>16}"
              f"{fractions[0]:>17}{fractions[1]:>17}")


def _print_bound(medians, ours_warm):
    """About the most TFRecord streaming warm / in-memory warm can be on these cores, from the stages' rates.

    A streamed epoch reads and decodes every image on the cores that also augment it; in-memory warm is the
    augmentation (and a gather) alone. If the two costs add, streaming warm is about
    1 / (1 / read_and_decode + 1 / ours_warm), a fraction R / (R + ours_warm) of ours. An estimate: the stages
    and the warm epochs run at different moments, so another process's load moves it.
    """
    for stage in ("read + bare decode", "read + decode", "read + batch decode"):
        if ("TFRecord", stage) not in medians:
            continue
        rate = medians["TFRecord", stage]
        print(f"estimate (costs add), TFRecord streaming warm / in-memory warm with {stage:<19}"
              f"{rate / (rate + ours_warm):6.2f}x  (R = {rate:,.0f}, in-memory warm {ours_warm:,.0f} images/s)")


def _print_targets(results):
    """The three ratios issue 15 sets targets for (those whose two pipelines ran)."""
    targets = (("TFRecord streaming cold / file streaming cold", ("stream_tfrecord", 0), ("stream_files", 0), 2.0),
               ("TFRecord streaming warm / in-memory warm", ("stream_tfrecord", 1), ("ours", 1), 0.8),
               ("in-memory cold / PIL cold", ("ours", 0), ("python", 0), 1.5))
    print()
    for label, (top, i), (bottom, j), target in targets:
        if top in results and bottom in results:
            ratio = results[top][i] / results[bottom][j]
            print(f"{label:<48}{ratio:>6.2f}x  (target >= {target}x: {'met' if ratio >= target else 'NOT met'})")


if __name__ == "__main__":
    main()
