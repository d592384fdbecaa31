"""Writes a grid of augmented training samples, to see what a gin configuration feeds the network.

    python -m trainer.data.preview --gin_file=gin/phase64_aug.gin --out grid.png [--n 64]

The samples come from the training pipeline exactly as configured
(`trainer.data` and its training pipeline: dataset, resolution,
augmentation policy, seed), except that nothing is cached and the shuffle
buffer is small (--shuffle_buffer), so the first grid appears after decoding
a few hundred images rather than the whole training set.
`make_grid` is also what the trainer uses for its TensorBoard image summaries.

Flags:
  --gin_file        gin files, repeatable; later files win.
  --gin_bindings    gin bindings, repeatable; applied after the files.
  --out             PNG file to write (local or gs://; default preview.png).
  --n               number of samples (64).
  --cols            samples per row (8).
  --shuffle_buffer  shuffle buffer in images (512).
"""
if __name__ == "__main__":  # `--help` answers before TensorFlow loads.
    from trainer import cli as _cli

    _cli.fast_help(__doc__)


import os

from trainer import cli  # noqa: I001  (first: it quiets TensorFlow's start-up)
from absl import flags  # pylint: disable=wrong-import-position
import tensorflow as tf  # pylint: disable=wrong-import-position

from trainer.errors import UserError  # pylint: disable=wrong-import-position

_PAD_VALUE = 255  # White lines between tiles: black is what coarse dropout draws.


def make_grid(images, cols=8, pad=2):
    """Tiles a batch of images into one picture, row by row, with white lines between tiles.

    Args:
      images: [N, H, W, C] float in [0, 1] (clipped) or uint8; C is 1 or 3.
      cols: tiles per row (fewer when N < cols).
      pad: width in pixels of the lines between and around tiles.

    Returns:
      A uint8 tensor [rows * (H + pad) + pad, cols * (W + pad) + pad, C].

    Raises:
      UserError: `images` is not a non-empty rank-4 batch, or cols < 1.
    """
    images = tf.convert_to_tensor(images)
    if images.shape.rank != 4 or images.shape[0] == 0:
        raise UserError(f"make_grid expects a non-empty batch of images [N, H, W, C], "
                        f"got shape {images.shape}.")
    if cols < 1:
        raise UserError(f"make_grid expects cols >= 1, got {cols}.")
    if images.dtype != tf.uint8:
        images = tf.cast(tf.round(tf.clip_by_value(tf.cast(images, tf.float32), 0.0, 1.0) * 255.0), tf.uint8)
    count = tf.shape(images)[0]
    cols = tf.minimum(cols, count)
    rows = (count + cols - 1) // cols
    images = tf.pad(images, [[0, rows * cols - count], [0, pad], [0, pad], [0, 0]],
                    constant_values=_PAD_VALUE)
    height, width, channels = tf.shape(images)[1], tf.shape(images)[2], tf.shape(images)[3]
    grid = tf.reshape(images, [rows, cols, height, width, channels])
    grid = tf.reshape(tf.transpose(grid, [0, 2, 1, 3, 4]), [rows * height, cols * width, channels])
    return tf.pad(grid, [[pad, 0], [pad, 0], [0, 0]], constant_values=_PAD_VALUE)


def sample_training_images(n, shuffle_buffer=512):
    """Returns the first `n` augmented training images of the configured pipeline.

    Gin must already be parsed (`trainer.config.parse_gin`).

    Args:
      n: number of images.
      shuffle_buffer: shuffle buffer in images (replaces the configured one).

    Returns:
      float32 [n, S, S, 3] in [0, 1] (above 1 where the policy has an unclipped op, e.g.
      `brightness(clip=False)`; `make_grid` clips).
    """
    import dataclasses  # pylint: disable=import-outside-toplevel

    from trainer.data import pipeline  # pylint: disable=import-outside-toplevel

    settings = dataclasses.replace(pipeline.data(), in_memory=False, shuffle_buffer=shuffle_buffer)  # Streamed.
    dataset = settings.train()
    images = dataset.unbatch().map(lambda image, label: image).take(n)
    return tf.stack(list(images))


def write_preview(out, n=64, cols=8, shuffle_buffer=512):
    """Writes a PNG grid of `n` augmented training samples to `out` (local or gs://).

    Args:
      out: PNG path; its directory is created.
      n: number of samples.
      cols: tiles per row.
      shuffle_buffer: shuffle buffer in images.

    Returns:
      The grid as uint8 [H, W, 3].
    """
    grid = make_grid(sample_training_images(n, shuffle_buffer), cols=cols)
    directory = os.path.dirname(out)
    if directory:
        tf.io.gfile.makedirs(directory)
    with tf.io.gfile.GFile(out, "wb") as f:
        f.write(tf.io.encode_png(grid).numpy())
    return grid


FLAGS = flags.FLAGS


def _define_flags():
    """Defined only when run as a program: the trainer imports `make_grid` beside its own flags."""
    cli.define_gin_flags(model_dir=False)
    flags.DEFINE_string("out", "preview.png", "PNG file to write (local or gs://).")
    flags.DEFINE_integer("n", 64, "Number of samples.", lower_bound=1)
    flags.DEFINE_integer("cols", 8, "Samples per row.", lower_bound=1)
    flags.DEFINE_integer("shuffle_buffer", 512, "Shuffle buffer in images.", lower_bound=1)


def main(argv):
    cli.no_arguments(argv)
    if not FLAGS.gin_file:
        raise UserError("Give the configuration to preview with --gin_file, "
                        "e.g. --gin_file=gin/phase64_aug.gin.")
    cli.parse_gin_flags()
    grid = write_preview(FLAGS.out, FLAGS.n, FLAGS.cols, FLAGS.shuffle_buffer)
    print(f"Wrote {FLAGS.out}: {FLAGS.n} augmented training samples "
          f"({grid.shape[1]}x{grid.shape[0]} px).")


def run():
    """The command; its console script `tiny-preview` runs this module as `python -m` does (trainer.cli)."""
    _define_flags()
    cli.run(main)


if __name__ == "__main__":
    run()
