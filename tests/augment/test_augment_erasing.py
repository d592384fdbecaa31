"""Erasing ops: coarse dropout's grid (imgaug 0.2.9's 4x4 minimum by default, 3x3 on request)."""

import augment_helpers as h
import numpy as np
import pytest

from trainer.errors import UserError


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("spec, grid", [
    ("coarse_dropout(0.2, 0.02)", 4),              # The default: imgaug 0.2.9 (the reference's).
    ("coarse_dropout(0.2, 0.02, min_grid=4)", 4),
    ("coarse_dropout(0.2, 0.02, min_grid=3)", 3),  # imgaug 0.4.0's minimum.
])
def test_coarse_dropout_grid_at_reference_sizes(size, spec, grid):
    images = np.full([64, size, size, 3], 0.5, np.float32)
    dropped, _ = h.run(spec, images=images, labels=h.make_labels(64))
    zero = dropped[..., 0] == 0
    assert (zero == (dropped == 0).all(axis=-1)).all()  # All channels together.
    cells = (np.arange(size) * grid) // size
    dropped_cells = []
    for image in zero:
        blocks = [image[cells == r][:, cells == c] for r in range(grid) for c in range(grid)]
        assert all(block.all() or not block.any() for block in blocks)  # Each cell all black or untouched.
        dropped_cells.append(sum(block.all() for block in blocks))
    assert max(dropped_cells) >= 2  # Cells drop independently.
    assert 0.08 < zero.mean() < 0.35  # Expected 0.2 of the area.


def test_coarse_dropout_larger_images_use_size_percent():
    images = np.full([8, 256, 256, 3], 0.5, np.float32)
    dropped, _ = h.run("coarse_dropout(0.5, 0.02)", images=images, labels=h.make_labels(8))
    cells = (np.arange(256) * 5) // 256  # int(256 * 0.02) = 5 > 4.
    zero = dropped[..., 0] == 0
    for image in zero:
        for r in range(5):
            for c in range(5):
                block = image[cells == r][:, cells == c]
                assert block.all() or not block.any()


@pytest.mark.parametrize("value", [0, -1, 2.5, "4", True])
def test_coarse_dropout_min_grid_must_be_a_positive_integer(value):
    with pytest.raises(UserError, match=r"'coarse_dropout'.*min_grid must be an integer in \[1, 4096\]"):
        h.run(f"coarse_dropout(0.2, 0.02, min_grid={value!r})")
