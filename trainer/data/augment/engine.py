"""The batch engine: the batch being augmented, its pending fused warp, resampling, random draws.

Every draw is stateless (`tf.random.stateless_*`), so the same seed gives the
same output.

Speed: geometric ops (flip, zoom, scale, rotation, shear, translation, crops)
do not touch pixels; each contributes a 3x3 matrix per image (output pixel ->
input pixel), and consecutive ones are multiplied into one pending warp that
resamples each image once, when a pixel op needs the warped pixels (or at the
end). Per-pixel colour ops that give the same result before or after the
warp (brightness, channel shuffle, ...; see `Batch.commutes`) run without
forcing it, and the branches of `sometimes`, `one_of` and `random_order`
touch disjoint images, so their geometric branches are composed first: the
phase64_aug policy resamples each image once. The resampling leaves
identity warps alone, sends axis-keeping ones (flips, zooms, scales, shifts,
crops) with black fill through `crop_and_resize` and the rest through
`ImageProjectiveTransformV3` (about 3x slower on CPU). A warp made only of
flips and whole-pixel shifts is exact (nearest sampling); others use each
op's `interpolation` (bilinear, as the reference libraries did, unless an op
says 'nearest'). Colour matrices and dropout masks are applied as matrix
products, which on CPU are several times cheaper than broadcast multiplies.

Range: images stay in [0, 1] unless an op is told not to clip (e.g.
`brightness(..., clip=False)`, as the reference recipe's unclipped multiply);
from then on the batch is `unbounded` and the resampling no longer clamps
values above 1.

Coordinates: pixel centres sit at integer coordinates and ops act about the
image centre ((W - 1) / 2, (H - 1) / 2).
"""

import tensorflow as tf

# ----------------------------------------------------------------------------
# Random draws (stateless: the same seed gives the same values).


def split(seed, n):
    """Returns `n` independent seeds (each int [2]) derived from `seed`."""
    return tf.unstack(tf.random.experimental.stateless_split(seed, n))


def uniform(seed, shape, lo=0.0, hi=1.0):
    """Returns float32 values of `shape`, uniform in [lo, hi)."""
    return tf.random.stateless_uniform(shape, seed, minval=lo, maxval=hi)


def draw(seed, shape, lo, hi, random_sign=False, neutral=0.0):
    """Uniform in [lo, hi]; with `random_sign`, mirrored about `neutral` half the time.

    Args:
      seed: int [2].
      shape: shape of the draw.
      lo, hi: the range (lo == hi gives the constant lo, with no draw).
      random_sign: mirror each value about `neutral` with probability 0.5.
      neutral: the centre of the mirror (1 for factors, 0 for angles and shifts).

    Returns:
      float32 values of `shape`.
    """
    values = uniform(seed, shape, lo, hi) if lo < hi else tf.fill(shape, tf.constant(lo, tf.float32))
    if random_sign:
        flip = uniform(tf.random.experimental.stateless_fold_in(seed, 1), shape) < 0.5
        values = tf.where(flip, 2.0 * neutral - values, values)
    return values


def beta(seed, shape, alpha):
    """Beta(alpha, alpha) from two gamma draws."""
    first, second = split(seed, 2)
    a = tf.random.stateless_gamma(shape, first, alpha=alpha)
    b = tf.random.stateless_gamma(shape, second, alpha=alpha)
    total = a + b
    return tf.where(total > 0, a / tf.maximum(total, 1e-30), 0.5)


def permutation(seed, size):
    """A random permutation of range(size) (the partner of each image in MixUp/CutMix)."""
    return tf.argsort(uniform(seed, [size]))


def mix_channels(images, matrices):
    """Per-image colour matrix: out[..., d] = sum_c images[..., c] * matrices[:, c, d].

    A batched matmul: much faster on CPU than a broadcast multiply by [B, 1, 1, 3].
    """
    shape = tf.shape(images)
    flat = tf.reshape(images, [shape[0], -1, shape[3]])
    return tf.reshape(tf.matmul(flat, matrices), shape)


def scale_images(images, factors):
    """images [B, H, W, C] times per-image factors [B] (as a matmul, see `mix_channels`)."""
    return mix_channels(images, factors[:, None, None] * tf.eye(tf.shape(images)[3]))


def both(active, chosen):
    """`chosen` restricted to the `active` images (active None: all active)."""
    return chosen if active is None else tf.logical_and(active, chosen)


def select(active, new, old):
    """`new` for active images, `old` for the rest (active None: all active)."""
    if active is None:
        return new
    return tf.where(tf.reshape(active, [-1] + [1] * (new.shape.rank - 1)), new, old)


# ----------------------------------------------------------------------------
# The batch being augmented, with its pending warp.


class Batch:
    """Images, labels and a pending warp (3x3 per image) not yet applied to the pixels.

    Applying a chain of warps at once reads pixels that a step-by-step
    application would have lost at an intermediate border (e.g. the corners
    of a zoomed-in image that a following rotation brings back). With black
    fill, `flush` blacks those pixels out again, so the fused result matches
    the step-by-step one (up to the resampling: one bilinear pass instead of
    several). Edge-replicating fills ('nearest', 'reflect') show the content
    instead of repeating an intermediate edge.
    """

    def __init__(self, images, labels, unbounded=False):
        """Wraps a batch.

        Args:
          images: float32 [B, H, W, C] (uint8 in [0, 255] is converted to [0, 1]).
          labels: [B, C'] labels, cast to float32.
          unbounded: the images may already hold values above 1 (an op that does not clip ran).
        """
        images = tf.convert_to_tensor(images)
        if images.dtype == tf.uint8:
            images = tf.cast(images, tf.float32) / 255.0
        self.images = tf.cast(images, tf.float32)
        self.labels = tf.cast(labels, tf.float32)
        shape = tf.shape(self.images)
        self.size = shape[0]
        self.height = tf.cast(shape[1], tf.float32)
        self.width = tf.cast(shape[2], tf.float32)
        self.unbounded = unbounded  # An op told not to clip ran: values may exceed 1, keep them.
        self._reset()

    def _reset(self):
        self._matrix = None         # Output -> input pixel coordinates, [B, 3, 3].
        self._fill = None
        self._interpolation = None
        self._keeps_frame = True    # The pending warp maps the frame onto itself (flips only).
        self._aligned = True        # Every op composed so far keeps the axes (no rotation or shear).
        self._frames = []           # Output -> intermediate image coordinates, to stay in frame.

    def warp(self, matrix, fill, interpolation, keeps_frame=False, aligned=False):
        """Composes `matrix` (output -> input pixel coordinates) after the pending warp.

        Args:
          matrix: float32 [B, 3, 3].
          fill: the op's border fill, or None if it never samples outside.
          interpolation: 'bilinear', 'nearest', or None if exact.
          keeps_frame: the op maps the frame onto itself (a flip).
          aligned: the op keeps the axes (its matrix has no rotation or shear).
        """
        if self._matrix is not None and fill and self._fill and fill != self._fill:
            self.flush()
        if self._matrix is None:
            self._matrix = matrix
        else:
            if not self._keeps_frame:
                self._frames = [tf.matmul(f, matrix) for f in self._frames] + [matrix]
            self._matrix = tf.matmul(self._matrix, matrix)
        self._keeps_frame = self._keeps_frame and keeps_frame
        self._aligned = self._aligned and aligned
        self._fill = self._fill or fill
        if interpolation == "bilinear" or self._interpolation is None:
            self._interpolation = interpolation or self._interpolation

    def commutes(self, op):
        """Whether pixel op `op` gives the same result before or after the pending warp.

        True for per-pixel ops when the warp's border fill is unchanged by them
        (edge-replicating fill, or black staying black) and the resampling only
        copies pixels (nearest) or the op is linear (bilinear mixes pixels).
        """
        if self._matrix is None:
            return True
        fill_ok = self._fill in (None, "nearest", "reflect") or op.keeps_black
        sampling_ok = self._interpolation != "bilinear" or op.linear
        return op.pointwise and fill_ok and sampling_ok

    def flush(self):
        """Applies the pending warp to the pixels: one resampling of the batch.

        Images whose warp is the identity are left as they are. With black
        fill, images whose warp keeps the axes (flips, zooms, scales, shifts,
        crops: no rotation or shear) are resampled by `crop_and_resize`,
        several times cheaper on CPU than the general
        `ImageProjectiveTransformV3` the others go through (both sample the
        same points with the same interpolation). The batch is partitioned
        by kind and stitched back.
        """
        if self._matrix is None:
            return
        fill = self._fill or "constant"
        interpolation = self._interpolation or "nearest"
        frames = self._frames if fill == "constant" else []
        matrix = self._matrix
        moved = tf.logical_not(tf.reduce_all([_is_identity(m) for m in [matrix] + frames], axis=0))
        ids = tf.cast(moved, tf.int32)  # 0: unchanged, 1: resampled (by crop_and_resize if black fill).
        split = fill == "constant" and not self._aligned
        if split:  # 2: rotates or shears, for the projective transform.
            ids += tf.cast(tf.logical_and(moved, tf.abs(matrix[:, 0, 1]) + tf.abs(matrix[:, 1, 0]) > 1e-6),
                           tf.int32)
        parts = 3 if split else 2
        positions = tf.dynamic_partition(tf.range(self.size), ids, parts)
        images = tf.dynamic_partition(self.images, ids, parts)
        matrices = tf.dynamic_partition(matrix, ids, parts)
        frames = [tf.dynamic_partition(f, ids, parts) for f in frames]
        if fill == "constant":
            resampled = [_crop(images[1], matrices[1], interpolation)]
            if split:
                resampled.append(_projective(images[2], matrices[2], interpolation, fill))
            resampled = [_mask_frames(r, [f[k + 1] for f in frames], interpolation)
                         for k, r in enumerate(resampled)]
        else:
            resampled = [_projective(images[1], matrices[1], interpolation, fill)]
        if interpolation == "bilinear" and not self.unbounded:  # Rounding may pass 1 by an ulp (never below 0).
            resampled = [tf.minimum(r, 1.0) for r in resampled]
        stitched = tf.dynamic_stitch(positions, [images[0]] + resampled)
        stitched.set_shape(self.images.shape)
        self.images = stitched
        self._reset()


def _is_identity(matrices):
    return tf.reduce_all(tf.equal(matrices, tf.eye(3)), axis=[1, 2])


def _mask_frames(images, frames, interpolation):
    """Blacks out what intermediate warps lost at their border (skipped when none did)."""
    if not frames:
        return images
    trivial = tf.reduce_all([tf.reduce_all(_is_identity(f)) for f in frames])
    return tf.cond(trivial, lambda: images, lambda: images * _in_frames(images, frames, interpolation))


def _in_frames(images, frames, interpolation):
    """float32 [B, H, W, 1]: how much of each output pixel every intermediate image covered.

    1 inside, 0 outside; with bilinear sampling, the share of the four
    neighbours inside, as a step-by-step bilinear warp blends its edge
    pixels with the black fill.
    """
    shape = tf.shape(images)
    height, width = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    xs = tf.cast(tf.range(shape[2]), tf.float32)[None, None, :]
    ys = tf.cast(tf.range(shape[1]), tf.float32)[None, :, None]
    covered = None
    for frame in frames:
        m = frame[:, :2, :, None, None]  # [B, 2, 3, 1, 1]
        x = m[:, 0, 0] * xs + m[:, 0, 1] * ys + m[:, 0, 2]
        y = m[:, 1, 0] * xs + m[:, 1, 1] * ys + m[:, 1, 2]
        share = _coverage(x, width, interpolation) * _coverage(y, height, interpolation)
        covered = share if covered is None else covered * share
    return covered[..., None]


def _projective(images, matrices, interpolation, fill):
    """Resamples images [N, H, W, C] at matrices [N, 3, 3] (output -> input pixel coordinates)."""
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=tf.reshape(matrices, [-1, 9])[:, :8],
        output_shape=tf.shape(images)[1:3],
        fill_value=0.0,
        interpolation=interpolation.upper(),
        fill_mode=fill.upper())


def _crop(images, matrices, interpolation):
    """`_projective` with black fill for axis-keeping matrices, via crop_and_resize.

    A one-pixel black border makes samples within a pixel of the edge blend
    with black as the projective transform does; crop_and_resize then fills
    anything further out with black.
    """
    shape = tf.shape(images)
    height, width = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    padded = tf.pad(images, [[0, 0], [1, 1], [1, 1], [0, 0]])
    sx, tx, sy, ty = matrices[:, 0, 0], matrices[:, 0, 2] + 1.0, matrices[:, 1, 1], matrices[:, 1, 2] + 1.0
    top, left = ty / (height + 1.0), tx / (width + 1.0)
    bottom, right = (sy * (height - 1.0) + ty) / (height + 1.0), (sx * (width - 1.0) + tx) / (width + 1.0)
    boxes = tf.stack([top, left, bottom, right], axis=1)
    return tf.image.crop_and_resize(padded, boxes, tf.range(shape[0]), shape[1:3], method=interpolation,
                                    extrapolation_value=0.0)


def _coverage(coordinate, size, interpolation):
    """Share of a sample at `coordinate` (pixel centres at 0 .. size - 1) that lies inside."""
    if interpolation == "bilinear":
        return tf.clip_by_value(tf.minimum(coordinate + 1.0, size - coordinate), 0.0, 1.0)
    inside = tf.logical_and(coordinate >= -0.5, coordinate < size - 0.5)
    return tf.cast(inside, tf.float32)


# ----------------------------------------------------------------------------
# Op kinds.


class Op:
    """A batch augmentation: `op(images, labels, seed) -> (images, labels)`.

    Subclasses implement `apply(batch, seed, active)`, which augments the
    images where `active` (bool [B], or None for all) is True and leaves the
    others unchanged.
    """

    geometric = False  # True: only composes into the pending warp.
    heavy = False      # True: costly per image; combinators run it on its chosen images only.

    def __call__(self, images, labels, seed):
        """Augments a batch.

        Args:
          images: float32 [B, H, W, 3] in [0, 1] (or uint8 in [0, 255]).
          labels: float32 [B, C].
          seed: int tensor of shape [2].

        Returns:
          (images float32 [B, H, W, 3], labels float32 [B, C]). The images are
          in [0, 1], unless an op was told not to clip (e.g.
          `brightness(clip=False)`): then values above 1 survive.
        """
        batch = Batch(images, labels)
        seed = tf.convert_to_tensor(seed)
        if seed.dtype not in (tf.int32, tf.int64):
            seed = tf.cast(seed, tf.int64)
        self.apply(batch, seed, None)
        batch.flush()
        return batch.images, batch.labels

    def apply(self, batch, seed, active):
        raise NotImplementedError


class GeometricOp(Op):
    """An op that maps pixel positions: contributes a 3x3 matrix per image to the warp."""

    geometric = True
    fill = None            # 'constant' (black), 'nearest', 'reflect'; None: never samples outside.
    interpolation = None   # 'bilinear' or 'nearest'; None: lands on pixel centres (exact).
    keeps_frame = False    # Maps the frame onto itself: nothing is lost at the border (flips).
    aligned = False        # Keeps the axes: no rotation or shear, whatever the draw.

    def matrices(self, seed, batch):
        """Returns float32 [B, 3, 3] matrices mapping output to input pixel coordinates."""
        raise NotImplementedError

    def apply(self, batch, seed, active):
        matrix = self.matrices(seed, batch)
        if active is not None:
            matrix = tf.where(active[:, None, None], matrix, tf.eye(3))
        batch.warp(matrix, self.fill, self.interpolation, self.keeps_frame, self.aligned)


class PixelOp(Op):
    """An op that changes pixel values (and for MixUp/CutMix, labels).

    `pointwise` ops compute each output pixel from the same input pixel with
    per-image parameters (so they may run before a pending warp, see
    `Batch.commutes`); `keeps_black` ops map black to black; `linear` ones
    commute with bilinear resampling; `bounded` ones keep values in [0, 1]
    (an op that does not clip marks the batch `unbounded`).
    """

    pointwise = False
    keeps_black = False
    linear = False
    bounded = True

    def transform(self, images, labels, seed, active):
        """Returns (images, labels) with the op applied where `active`."""
        raise NotImplementedError

    def apply(self, batch, seed, active):
        if not batch.commutes(self):
            batch.flush()
        batch.images, batch.labels = self.transform(batch.images, batch.labels, seed, active)
        batch.unbounded = batch.unbounded or not self.bounded
