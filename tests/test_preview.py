"""The preview tool: `make_grid` and a grid of augmented samples from a runnable gin file."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from trainer import config
from trainer.data import preview
from trainer.data import synthetic
from trainer.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("preview") / "tiny")
    return synthetic.write_synthetic(out, num_classes=2, per_class=8, val_per_class=1, test_images=0,
                                     image_size=32)


def _bindings(data_dir):
    return [f"DATA_DIR = {data_dir!r}", "NUM_CLASSES = 2", "BATCH_SIZE = 4", "IMAGE_SIZE = 32"]


def test_make_grid_tiles_row_by_row_with_white_lines():
    images = np.stack([np.full([4, 5, 3], i / 4.0, np.float32) for i in range(5)])
    grid = preview.make_grid(images, cols=2, pad=1).numpy()
    assert grid.dtype == np.uint8 and grid.shape == (3 * 5 + 1, 2 * 6 + 1, 3)
    for i in range(5):
        row, col = divmod(i, 2)
        tile = grid[1 + row * 5:1 + row * 5 + 4, 1 + col * 6:1 + col * 6 + 5]
        assert (tile == round(i / 4.0 * 255)).all()
    assert (grid[0] == 255).all() and (grid[:, 0] == 255).all()  # Outer lines.
    assert (grid[11:15, 7:12] == 255).all()  # The empty sixth tile.


def test_make_grid_uint8_clipping_and_fewer_images_than_columns():
    images = np.array([[[[-1.0, 0.5, 2.0]]], [[[0.0, 1.0, 0.25]]]], np.float32)
    grid = preview.make_grid(images, cols=8, pad=0).numpy()
    np.testing.assert_array_equal(grid, [[[0, 128, 255], [0, 255, 64]]])
    as_uint8 = np.arange(12, dtype=np.uint8).reshape([1, 2, 2, 3])
    np.testing.assert_array_equal(preview.make_grid(as_uint8, pad=0).numpy(), as_uint8[0])


@pytest.mark.parametrize("images, cols", [(np.zeros([0, 4, 4, 3]), 8), (np.zeros([4, 4, 3]), 8),
                                          (np.zeros([2, 4, 4, 3]), 0)])
def test_make_grid_rejects_bad_input(images, cols):
    with pytest.raises(UserError, match="make_grid expects"):
        preview.make_grid(images, cols=cols)


def test_write_preview_from_the_phase64_aug_configuration(data_dir, tmp_path):
    config.parse_gin(["gin/phase64_aug.gin"], _bindings(data_dir))
    out = str(tmp_path / "sub" / "grid.png")
    grid = preview.write_preview(out, n=6, cols=3, shuffle_buffer=16)
    assert grid.shape == (2 * 34 + 2, 3 * 34 + 2, 3)
    written = tf.io.decode_png(tf.io.read_file(out)).numpy()
    np.testing.assert_array_equal(written, grid.numpy())
    samples = preview.sample_training_images(6, shuffle_buffer=16).numpy()
    # phase64_aug's multiply is unclipped, as the reference's: values up to 1.5 reach the network.
    assert samples.shape == (6, 32, 32, 3) and samples.min() >= 0.0 and samples.max() <= 1.5
    assert ((samples == 0).all(axis=-1).mean(axis=(1, 2)) > 0.01).any()  # Black: dropout or borders.


def _run_preview(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", "trainer.data.preview", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
def test_command_line_writes_the_grid(data_dir, tmp_path):
    out = tmp_path / "grid.png"
    bindings = [f"--gin_bindings={b}" for b in _bindings(data_dir)]
    result = _run_preview("--gin_file=gin/phase32.gin", *bindings, f"--out={out}", "--n=5", "--cols=5")
    assert result.returncode == 0, result.stderr
    assert "Wrote" in result.stdout
    assert tf.io.decode_png(tf.io.read_file(str(out))).shape == (34 + 2, 5 * 34 + 2, 3)


@pytest.mark.slow
def test_command_line_bad_policy_is_one_paragraph(data_dir, tmp_path):
    bindings = [f"--gin_bindings={b}" for b in _bindings(data_dir)]
    typo = "--gin_bindings=trainer.data.augment = 'flp(0.5)'"
    result = _run_preview("--gin_file=gin/phase32.gin", *bindings, typo, f"--out={tmp_path / 'grid.png'}")
    assert result.returncode == 1
    assert "Did you mean 'flip'" in result.stderr and "Traceback" not in result.stderr
