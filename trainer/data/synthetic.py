"""A synthetic dataset in exactly the Tiny ImageNet layout, for tests and the quickstart.

    python -m trainer.data.synthetic --out /tmp/synthetic --classes 10 --per_class 100

A class is a *shape*, never a colour: each image draws one or more
objects of its class's kind (disk, ring, cross, triangle, striped patch,
checkered patch, bar pair, star, frame, dotted patch, square,
half-disk, target) with random colours, position, size, rotation, aspect
ratio and noise, so the classes survive the reference augmentations (flip,
independent x/y zoom, channel shuffle, coarse dropout, brightness, ±45°
rotation) and a small CNN learns them in a minute on a CPU. With more
classes than kinds, further classes combine a kind with the number of
objects (1-4), the polarity (light on dark or dark on light) and the
background (plain or noisy): 13 x 4 x 2 x 2 = 208 distinct classes.

Like the real dataset, some images are stored as one-channel (greyscale)
JPEGs, words.txt names more ids than wnids.txt, and every training and
validation image has a bounding box.

Flags:
  --out                 dataset directory to create (local or gs://); required.
  --classes             number of classes (10).
  --per_class           training images per class (100).
  --val_per_class       validation images per class (20).
  --test_images         unlabelled test images (50).
  --image_size          image side in pixels (64).
  --greyscale_fraction  share of one-channel JPEGs (0.1).
  --seed                random seed (0).
"""
if __name__ == "__main__":  # `--help` answers before TensorFlow loads.
    from trainer import cli as _cli

    _cli.fast_help(__doc__)


import inspect
import json
import os
import uuid

from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf

from trainer import cli
from trainer.data.sources import tiny_imagenet
from trainer.errors import UserError

PARAMS_FILE = "synthetic.json"  # The arguments a synthetic dataset was written with.
_SUPERSAMPLE = 2  # Shapes are drawn at 2x and averaged down (anti-aliased edges).
_EXTRA_WORDS = 25  # words.txt lines for ids not in wnids.txt, like the real file.


def _square(u, v):
    return np.maximum(np.abs(u), np.abs(v))


def _radius(u, v):
    return np.sqrt(u * u + v * v)


def _triangle(u, v):
    inside = np.ones(u.shape, bool)
    for angle in np.deg2rad([270.0, 30.0, 150.0]):  # Outward normals of the three edges.
        inside &= u * np.cos(angle) + v * np.sin(angle) < 0.5
    return inside


def _star(u, v):
    return _radius(u, v) < 0.55 + 0.45 * np.cos(5 * np.arctan2(v, u))


def _cross(u, v):
    return (np.abs(u) < 0.3) & (np.abs(v) < 1) | (np.abs(v) < 0.3) & (np.abs(u) < 1)


def _checkered(u, v):
    return (_square(u, v) < 1) & (np.cos(2 * np.pi * u) * np.cos(2 * np.pi * v) > 0)


def _dotted(u, v):  # A 3 x 3 grid of dots.
    cell = 2 / 3
    du, dv = (u + 1) % cell - cell / 2, (v + 1) % cell - cell / 2
    return (_square(u, v) < 1) & (_radius(du, dv) < 0.2)


# Each kind maps object coordinates (u, v) -- the object spans about [-1, 1]^2 --
# to a boolean mask. Order matters: the first ten are the default classes.
KINDS = (
    ("disk", lambda u, v: _radius(u, v) < 1),
    ("ring", lambda u, v: (_radius(u, v) > 0.55) & (_radius(u, v) < 1)),
    ("cross", _cross),
    ("triangle", _triangle),
    ("striped patch", lambda u, v: (_square(u, v) < 1) & ((u + 1) % 0.5 < 0.25)),
    ("checkered patch", _checkered),
    ("bar pair", lambda u, v: (np.abs(v) > 0.2) & (np.abs(v) < 0.65) & (np.abs(u) < 1)),
    ("star", _star),
    ("frame", lambda u, v: (_square(u, v) > 0.5) & (_square(u, v) < 0.9)),
    ("dotted patch", _dotted),
    ("square", lambda u, v: _square(u, v) < 0.85),
    ("half-disk", lambda u, v: (_radius(u, v) < 1) & (v > -0.1)),
    ("target", lambda u, v: (_radius(u, v) < 1) & (np.cos(2.5 * np.pi * _radius(u, v)) > 0)),
)
_COPIES = (1, 2, 3, 4)
_NUM_RECIPES = len(KINDS) * len(_COPIES) * 2 * 2


def class_recipe(label):
    """What class `label` draws: (kind index, number of objects, dark_on_light, noisy_background).

    The kind varies fastest, so the first len(KINDS) classes differ by shape alone.
    Beyond 208 classes the recipes repeat (those classes cannot be told apart).
    """
    c = label % _NUM_RECIPES
    kind, c = c % len(KINDS), c // len(KINDS)
    copies, c = _COPIES[c % len(_COPIES)], c // len(_COPIES)
    return kind, copies, bool(c % 2), bool(c // 2)


def class_name(label):
    """A readable name for a class, e.g. 'disk' or '3 dark rings on noise'."""
    kind, copies, dark, noisy = class_recipe(label)
    name = KINDS[kind][0]
    if copies > 1:
        name = f"{copies} {name}{'es' if name.endswith(('s', 'h')) else 's'}"
    if dark:
        name = f"dark {name}"
    if noisy:
        name += " on noise"
    if label >= _NUM_RECIPES:
        name += f" #{label // _NUM_RECIPES + 1}"
    return name


def wnid(label):
    """The fake WordNet id of a class: n90000000, n90000001, ..."""
    return f"n9{label:07d}"


def is_synthetic(class_ids):
    """True for a dataset whose classes are those this module writes (n90000000, n90000001, ... in order)."""
    return list(class_ids) == [wnid(i) for i in range(len(class_ids))]


def _object_params(rng, n, copies, size):
    """Centres, radii, angles and aspect ratios [n, copies] of the objects, in pixels."""
    if copies == 1:
        centres = rng.uniform(0.32, 0.68, (n, 1, 2)) * size
        radii = rng.uniform(0.2, 0.36, (n, 1)) * size
    else:
        phase = rng.uniform(0, 2 * np.pi, (n, 1)) + 2 * np.pi * np.arange(copies) / copies
        offsets = np.stack([np.cos(phase), np.sin(phase)], axis=-1) * 0.27
        jitter = rng.uniform(-0.04, 0.04, (n, copies, 2))
        centres = (0.5 + offsets + jitter) * size
        radii = rng.uniform(0.12, 0.17, (n, 1)) * size * np.ones((1, copies))
    angles = rng.uniform(0, 2 * np.pi, (n, copies))
    aspects = np.exp(rng.uniform(-0.2, 0.2, (n, copies)))
    return centres, radii, angles, aspects


def render(label, n, size, rng):
    """Draws `n` images of class `label`.

    Args:
      label: the class index.
      n: number of images.
      size: image side in pixels.
      rng: a numpy Generator.

    Returns:
      (images uint8 [n, size, size, 3], boxes int [n, 4] as x0, y0, x1, y1).
    """
    kind, copies, dark, noisy = class_recipe(label)
    centres, radii, angles, aspects = _object_params(rng, n, copies, size)
    fine = size * _SUPERSAMPLE
    grid = (np.arange(fine, dtype=np.float32) + 0.5) / _SUPERSAMPLE
    dx = grid[None, None, None, :] - centres[..., 0, None, None]  # [n, copies, 1, fine]
    dy = grid[None, None, :, None] - centres[..., 1, None, None]  # [n, copies, fine, 1]
    cos, sin = np.cos(angles)[..., None, None], np.sin(angles)[..., None, None]
    scale_u = (radii * aspects)[..., None, None]
    scale_v = (radii / aspects)[..., None, None]
    u = ((cos * dx + sin * dy) / scale_u).astype(np.float32)
    v = ((cos * dy - sin * dx) / scale_v).astype(np.float32)
    mask = KINDS[kind][1](u, v).any(axis=1).astype(np.float32)  # [n, fine, fine]
    mask = mask.reshape(n, size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(2, 4))

    light = rng.uniform(0.55, 1.0, (n, 1, 1, 3))
    darkc = rng.uniform(0.0, 0.4, (n, 1, 1, 3))
    fg, bg = (darkc, light) if dark else (light, darkc)
    m = mask[..., None]
    images = fg * m + bg * (1 - m)
    noise_level = rng.uniform(*((0.15, 0.25) if noisy else (0.0, 0.04)), size=(n, 1, 1, 1))
    images = images + rng.normal(0, 1, images.shape) * noise_level
    images = np.clip(np.round(images * 255), 0, 255).astype(np.uint8)
    return images, _boxes(mask > 0.5)


def _boxes(masks):
    """Bounding boxes (x0, y0, x1, y1), inclusive pixel indices, of boolean masks [n, H, W]."""
    n, h, w = masks.shape
    cols, rows = masks.any(axis=1), masks.any(axis=2)
    empty = ~cols.any(axis=1)
    x0 = np.where(empty, 0, cols.argmax(axis=1))
    x1 = np.where(empty, w - 1, w - 1 - cols[:, ::-1].argmax(axis=1))
    y0 = np.where(empty, 0, rows.argmax(axis=1))
    y1 = np.where(empty, h - 1, h - 1 - rows[:, ::-1].argmax(axis=1))
    return np.stack([x0, y0, x1, y1], axis=1).reshape(n, 4)


def _local_expanded(path):
    """`path` without a trailing '/', with `~` expanded unless it is a URL like gs://."""
    path = path.rstrip("/")
    return path if "://" in path else os.path.expanduser(path)


def _write_jpeg(path, image, greyscale):
    """Writes one JPEG; greyscale ones are stored with one channel, like the real dataset."""
    if greyscale:
        image = np.round(image.mean(axis=-1, keepdims=True)).astype(np.uint8)
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(tf.io.encode_jpeg(image, quality=92).numpy())


def _write_text(path, lines):
    with tf.io.gfile.GFile(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))


def _draw(seed, split_id, label, n, image_size, greyscale_fraction):
    """Images, boxes and greyscale flags of one class of one split (independently seeded)."""
    rng = np.random.default_rng([seed, split_id, label])
    images, boxes = render(label, n, image_size, rng)
    return images, boxes, rng.uniform(size=n) < greyscale_fraction


def _write_words(out_dir, num_classes, seed):
    extra = np.random.default_rng([seed, 99]).choice(10_000_000, _EXTRA_WORDS, replace=False)
    lines = [f"{wnid(c)}\t{class_name(c)}, synthetic class {c}" for c in range(num_classes)]
    lines += [f"n8{k:07d}\tunused synset {k}, not a class" for k in sorted(extra)]
    _write_text(f"{out_dir}/words.txt", sorted(lines))


def _write_train(out_dir, num_classes, per_class, image_size, greyscale_fraction, seed):
    for c in range(num_classes):
        folder = f"{out_dir}/train/{wnid(c)}"
        tf.io.gfile.makedirs(f"{folder}/images")
        images, boxes, grey = _draw(seed, 0, c, per_class, image_size, greyscale_fraction)
        lines = []
        for k in range(per_class):
            name = f"{wnid(c)}_{k}.JPEG"
            _write_jpeg(f"{folder}/images/{name}", images[k], grey[k])
            lines.append("\t".join([name] + [str(b) for b in boxes[k]]))
        _write_text(f"{folder}/{wnid(c)}_boxes.txt", lines)


def _write_val(out_dir, num_classes, val_per_class, image_size, greyscale_fraction, seed):
    tf.io.gfile.makedirs(f"{out_dir}/val/images")
    order = np.random.default_rng([seed, 98]).permutation(num_classes * val_per_class)
    lines = {}
    for c in range(num_classes):
        images, boxes, grey = _draw(seed, 1, c, val_per_class, image_size, greyscale_fraction)
        for k in range(val_per_class):
            index = order[c * val_per_class + k]
            name = f"val_{index}.JPEG"
            _write_jpeg(f"{out_dir}/val/images/{name}", images[k], grey[k])
            lines[index] = "\t".join([name, wnid(c)] + [str(b) for b in boxes[k]])
    _write_text(f"{out_dir}/val/val_annotations.txt", [lines[i] for i in sorted(lines)])


def _write_test(out_dir, num_classes, test_images, image_size, greyscale_fraction, seed):
    tf.io.gfile.makedirs(f"{out_dir}/test/images")
    rng = np.random.default_rng([seed, 97])
    labels = rng.integers(0, num_classes, test_images)
    names = iter(rng.permutation(test_images))  # Classes mixed across file names.
    for c in range(num_classes):
        count = int((labels == c).sum())
        if not count:
            continue
        images, _, grey = _draw(seed, 2, c, count, image_size, greyscale_fraction)
        for k in range(count):
            _write_jpeg(f"{out_dir}/test/images/test_{next(names)}.JPEG", images[k], grey[k])


def write_synthetic(out_dir, num_classes=10, per_class=100, val_per_class=20, test_images=50,
                    image_size=64, greyscale_fraction=0.1, seed=0):
    """Writes a synthetic dataset in the Tiny ImageNet layout (deterministic given the arguments).

    The directory holds `tiny_imagenet.INCOMPLETE_MARKER` until the last file is
    written, so an interrupted write is never read as a dataset. Use
    `ensure_synthetic` to write atomically and only once.

    Args:
      out_dir: the dataset directory to create (local or gs://).
      num_classes: number of classes (up to 208 distinct ones, see module docstring).
      per_class: training images per class.
      val_per_class: validation images per class.
      test_images: unlabelled test images in all.
      image_size: side of the square images in pixels.
      greyscale_fraction: share of images stored as one-channel JPEGs.
      seed: random seed.

    Returns:
      `out_dir`.

    Raises:
      UserError: a non-positive count or size, or a fraction outside [0, 1].
    """
    _check_args(num_classes, per_class, val_per_class, test_images, image_size, greyscale_fraction)
    if num_classes > _NUM_RECIPES:
        logging.warning("Only %d synthetic classes are distinct; classes %d..%d repeat them.",
                        _NUM_RECIPES, _NUM_RECIPES, num_classes - 1)
    out_dir = _local_expanded(out_dir)
    tf.io.gfile.makedirs(out_dir)
    marker = f"{out_dir}/{tiny_imagenet.INCOMPLETE_MARKER}"
    _write_text(marker, ["synthetic dataset being written"])
    _write_text(f"{out_dir}/wnids.txt", [wnid(c) for c in range(num_classes)])
    _write_words(out_dir, num_classes, seed)
    _write_train(out_dir, num_classes, per_class, image_size, greyscale_fraction, seed)
    _write_val(out_dir, num_classes, val_per_class, image_size, greyscale_fraction, seed)
    _write_test(out_dir, num_classes, test_images, image_size, greyscale_fraction, seed)
    params = dict(num_classes=num_classes, per_class=per_class, val_per_class=val_per_class,
                  test_images=test_images, image_size=image_size,
                  greyscale_fraction=greyscale_fraction, seed=seed)
    _write_text(f"{out_dir}/{PARAMS_FILE}", [json.dumps(params, sort_keys=True)])
    tf.io.gfile.remove(marker)
    return out_dir


_DEFAULTS = {name: p.default for name, p in inspect.signature(write_synthetic).parameters.items()
             if name != "out_dir"}


def _check_args(num_classes, per_class, val_per_class, test_images, image_size, greyscale_fraction):
    counts = dict(num_classes=num_classes, per_class=per_class, val_per_class=val_per_class,
                  image_size=image_size)
    bad = [f"{k}={v!r}" for k, v in counts.items() if not isinstance(v, int) or v < 1]
    if not isinstance(test_images, int) or test_images < 0:
        bad.append(f"test_images={test_images!r}")
    if not 0 <= greyscale_fraction <= 1:
        bad.append(f"greyscale_fraction={greyscale_fraction!r}")
    if bad:
        raise UserError(f"Invalid synthetic dataset arguments: {', '.join(bad)}. Expected "
                        "positive integer counts and image size (test_images may be 0) and "
                        "greyscale_fraction in [0, 1].")


def _requested_params(kwargs):
    """The full argument set of `write_synthetic` for `kwargs` (defaults filled in)."""
    params = dict(_DEFAULTS)
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise UserError(f"Unknown synthetic dataset option(s) {', '.join(unknown)}: expected "
                        f"some of {', '.join(sorted(params))}.")
    params.update(kwargs)
    return params


def _check_existing(out_dir, params):
    """Accepts an existing dataset at `out_dir` if it was written with `params`."""
    try:
        tiny_imagenet.TinyImageNet(out_dir)
    except UserError as err:
        raise UserError(f"'{out_dir}' exists but is not a complete dataset, so no synthetic "
                        f"dataset was written there. Delete it or choose another directory. "
                        f"({err})") from None
    params_path = f"{out_dir}/{PARAMS_FILE}"
    if not tf.io.gfile.exists(params_path):
        return
    with tf.io.gfile.GFile(params_path) as f:
        found = json.load(f)
    if found != params:
        diff = ", ".join(f"{k}={found.get(k)!r} (asked {params[k]!r})"
                         for k in sorted(params) if found.get(k) != params[k])
        raise UserError(f"The synthetic dataset in '{out_dir}' was written with other "
                        f"options: {diff}. Delete it or choose another directory.")


def ensure_synthetic(out_dir, **kwargs):
    """Writes the synthetic dataset to `out_dir` unless it is already there.

    The dataset is written to a uniquely named temporary sibling directory
    and renamed into place when complete, so an interrupted write never
    leaves a dataset behind and concurrent callers are safe (the first
    rename wins; the others discard their copy).

    Args:
      out_dir: the dataset directory.
      **kwargs: arguments of `write_synthetic`.

    Returns:
      `out_dir`.

    Raises:
      UserError: `out_dir` holds something else, or a synthetic dataset
        written with other arguments.
    """
    out_dir = _local_expanded(out_dir)
    params = _requested_params(kwargs)
    if tf.io.gfile.isdir(out_dir) and tf.io.gfile.listdir(out_dir):
        _check_existing(out_dir, params)
        return out_dir
    tmp = f"{out_dir}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        write_synthetic(tmp, **params)
        if "://" not in out_dir and os.path.isdir(out_dir):
            _remove_if_empty(out_dir)
        tf.io.gfile.rename(tmp, out_dir)
    except tf.errors.OpError:
        if not tf.io.gfile.isdir(out_dir):
            raise
        _check_existing(out_dir, params)  # Another caller finished first: use theirs.
    finally:
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.rmtree(tmp)
    return out_dir


def _remove_if_empty(local_dir):
    """Removes an empty local directory (made by a caller) so the dataset can take its name."""
    try:
        os.rmdir(local_dir)  # Atomic: fails if another caller has just put a dataset there.
    except OSError:
        pass


def _define_flags():
    flags.DEFINE_string("out", None, "Dataset directory to create (local or gs://).", required=True)
    flags.DEFINE_integer("classes", 10, "Number of classes.")
    flags.DEFINE_integer("per_class", 100, "Training images per class.")
    flags.DEFINE_integer("val_per_class", 20, "Validation images per class.")
    flags.DEFINE_integer("test_images", 50, "Unlabelled test images.")
    flags.DEFINE_integer("image_size", 64, "Image side in pixels.")
    flags.DEFINE_float("greyscale_fraction", 0.1, "Share of one-channel (greyscale) JPEGs.")
    flags.DEFINE_integer("seed", 0, "Random seed.")


def main(argv):
    """Writes the dataset given by the flags (or reports that it is already there)."""
    del argv
    f = flags.FLAGS
    existed = tf.io.gfile.isdir(f.out) and bool(tf.io.gfile.listdir(f.out))
    out = ensure_synthetic(f.out, num_classes=f.classes, per_class=f.per_class,
                           val_per_class=f.val_per_class, test_images=f.test_images,
                           image_size=f.image_size, greyscale_fraction=f.greyscale_fraction,
                           seed=f.seed)
    state = "already there" if existed else "written"
    print(f"Synthetic dataset {state}: {out} ({f.classes} classes). Train with "
          f"--gin_bindings=\"DATA_DIR='{out}'\" --gin_bindings=\"NUM_CLASSES={f.classes}\".")


def run():
    """The command; its console script `tiny-synthetic` runs this module as `python -m` does (trainer.cli)."""
    _define_flags()
    cli.run(main)


if __name__ == "__main__":
    run()
