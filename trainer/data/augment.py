"""Batch augmentation ops composed from a gin string: the reference policies and modern ones.

An op augments a whole batch at once inside tf.data (vectorised, per-image
random draws):

    op(images, labels, seed) -> (images, labels)

- images: float32 [B, H, W, 3] in [0, 1] (uint8 in [0, 255] is accepted and
  converted); the output is always float32 in [0, 1].
- labels: float32 [B, C] (one-hot, or already mixed); only MixUp and CutMix
  change them, keeping each row's sum.
- seed: an int32/int64 tensor of shape [2]. Every draw is stateless
  (`tf.random.stateless_*`), so the same seed gives the same output.

A policy is a string over the registry, parsed with `ast` (only registered
names, literal arguments and nested ops; nothing is evaluated):

    flip(0.5) | zoom(0.5, 1.5) | channel_shuffle() | coarse_dropout(0.2, 0.02)

`a | b` applies `a` then `b`; the combinators are `sequential(...)`,
`sometimes(p, then, otherwise=None)`, `one_of(...)` and `random_order(...)`,
all deciding per image.

Speed: geometric ops (flip, zoom, scale, rotation, shear, translation, crops)
do not touch pixels; each contributes a 3x3 matrix per image (output pixel ->
input pixel), and consecutive ones are multiplied into one pending warp that
resamples each image once, when a pixel op needs the warped pixels (or at the
end). Per-pixel colour ops that give the same result before or after the
warp (brightness, channel shuffle, ...; see `_Batch.commutes`) run without
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

Coordinates: pixel centres sit at integer coordinates and ops act about the
image centre ((W - 1) / 2, (H - 1) / 2).

Keras 3's RandAugment, AugMix, MixUp, CutMix and RandomErasing layers are not
wrapped: they draw from a stateful `SeedGenerator` and reject a per-batch seed
tensor (`ValueError: Argument seed must be either an integer or an instance
of SeedGenerator`), so they cannot be deterministic per batch inside a
parallel tf.data map; Keras' RandAugment also picks one op for the whole batch
and computes every candidate op on every image. The versions here are
written from the papers and torchvision's definitions, vectorised per image.
"""

import ast
import difflib
import inspect
import math

import numpy as np
import tensorflow as tf

from trainer.errors import UserError

REGISTRY = {}

_FILLS = ("constant", "nearest", "reflect")
_INTERPOLATIONS = ("bilinear", "nearest")
_GREY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision and PIL.


def register(name):
    """Class decorator: registers an op factory under `name` for policy strings.

    Args:
      name: the name used in policy strings, e.g. 'flip'.

    Returns:
      The decorator, which returns the factory unchanged.

    Raises:
      ValueError: `name` is already registered.
    """
    def decorator(factory):
        if name in REGISTRY:
            raise ValueError(f"augmentation op {name!r} is registered twice")
        REGISTRY[name] = factory
        return factory
    return decorator


# ----------------------------------------------------------------------------
# Policy strings.


def build_policy(spec):
    """Parses a policy string into one callable op.

    Args:
      spec: e.g. "flip(0.5) | rotate(-45, 45)"; None or blank for no augmentation.

    Returns:
      An `Op` (`op(images, labels, seed) -> (images, labels)`), or None.

    Raises:
      UserError: a syntax error, an unknown op (with the nearest registered
        name), an argument that is not a literal, or a bad argument value.
    """
    if spec is None:
        return None
    if not isinstance(spec, str):
        raise UserError(f"An augmentation policy must be a string such as "
                        f"\"flip(0.5) | rotate(-45, 45)\", got {spec!r} ({type(spec).__name__}).")
    if not spec.strip():
        return None
    try:
        tree = ast.parse(f"(\n{spec.strip()}\n)", mode="eval")  # Parentheses allow line breaks.
    except SyntaxError as err:
        raise UserError(f"Augmentation policy {spec!r} is not a valid expression ({err.msg}). "
                        f"Expected op calls joined by '|', e.g. \"flip(0.5) | rotate(-45, 45)\"; "
                        f"known ops: {', '.join(sorted(REGISTRY))}.") from None
    return _build(tree.body, spec)


def _build(node, spec):
    """Builds the op an AST node describes (a call, a bare op name, or `a | b`)."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        ops = []
        for side in (node.left, node.right):
            op = _build(side, spec)
            ops.extend(op.ops if type(op) is Sequential else [op])  # pylint: disable=unidiomatic-typecheck
        return Sequential(*ops)
    if isinstance(node, ast.Name):
        return _make(node.id, [], {}, spec)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        args = [_argument(a, node.func.id, spec) for a in node.args]
        kwargs = {}
        for keyword in node.keywords:
            if keyword.arg is None:
                raise UserError(f"Augmentation op '{node.func.id}' in policy {spec!r}: "
                                f"'**' arguments are not supported; write name=value.")
            kwargs[keyword.arg] = _argument(keyword.value, node.func.id, spec)
        return _make(node.func.id, args, kwargs, spec)
    raise UserError(f"Augmentation policy {spec!r}: expected an op call such as 'flip(0.5)', "
                    f"got '{_source(node, spec)}'. Known ops: {', '.join(sorted(REGISTRY))}.")


def _argument(node, op_name, spec):
    """An op argument: a nested op, or a Python literal (number, string, tuple, bool, None)."""
    if isinstance(node, ast.Name) and node.id not in REGISTRY:
        close = difflib.get_close_matches(node.id, REGISTRY, n=1, cutoff=0.5)
        hint = f" (did you mean the op '{close[0]}'?)" if close else ""
        raise UserError(f"Augmentation op '{op_name}' in policy {spec!r}: argument '{node.id}' is "
                        f"neither a literal nor a known op{hint}; strings need quotes, e.g. "
                        f"fill='constant'.")
    if isinstance(node, (ast.Call, ast.Name)) or (
            isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr)):
        return _build(node, spec)
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise UserError(f"Augmentation op '{op_name}' in policy {spec!r}: argument "
                        f"'{_source(node, spec)}' must be a literal (number, string, tuple, "
                        f"True/False/None) or an op.") from None


def _make(name, args, kwargs, spec):
    """Calls the registered factory `name`, turning every mistake into a UserError."""
    factory = REGISTRY.get(name)
    if factory is None:
        close = difflib.get_close_matches(name, REGISTRY, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"Unknown augmentation op '{name}' in policy {spec!r}.{hint} "
                        f"Known ops: {', '.join(sorted(REGISTRY))}.")
    signature = inspect.signature(factory)
    try:
        signature.bind(*args, **kwargs)
    except TypeError as err:
        raise UserError(f"Augmentation op '{name}' in policy {spec!r}: {err}. "
                        f"Expected {name}{signature}.") from None
    try:
        return factory(*args, **kwargs)
    except _ArgumentError as err:
        raise UserError(f"Augmentation op '{err.op}' in policy {spec!r}: {err.detail}") from None


def _source(node, spec):
    return ast.get_source_segment(f"(\n{spec.strip()}\n)", node) or ast.dump(node)


# ----------------------------------------------------------------------------
# Argument checks: factories raise UserError naming the op and the argument.


class _ArgumentError(UserError):
    """A bad argument value, raised by an op factory; `build_policy` adds the policy string."""

    def __init__(self, op, detail):
        super().__init__(f"Augmentation op '{op}': {detail}")
        self.op, self.detail = op, detail


def _fail(op, message):
    raise _ArgumentError(op, message)


def _number(op, name, value, lo=-math.inf, hi=math.inf, integer=False):
    """Returns `value` as a float (or int) after checking type and lo <= value <= hi."""
    kind = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not lo <= value <= hi:
        bounds = f" in [{lo}, {hi}]" if math.isfinite(lo) or math.isfinite(hi) else ""
        _fail(op, f"{name} must be {'an integer' if integer else 'a number'}{bounds}, got {value!r}.")
    return value if integer else float(value)


def _range(op, names, lo, hi, minimum=-math.inf, maximum=math.inf):
    """Checks a (lo, hi) pair of numbers with minimum <= lo <= hi <= maximum."""
    lo = _number(op, names[0], lo, minimum, maximum)
    hi = _number(op, names[1], hi, minimum, maximum)
    if lo > hi:
        _fail(op, f"{names[0]} must be <= {names[1]}, got {names[0]}={lo}, {names[1]}={hi}.")
    return lo, hi


def _pair(op, name, value, minimum=0.0):
    """Checks a (lo, hi) tuple argument such as scale=(0.08, 1.0)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        _fail(op, f"{name} must be a pair (lo, hi), got {value!r}.")
    return _range(op, (f"{name}[0]", f"{name}[1]"), value[0], value[1], minimum)


def _choice(op, name, value, choices):
    if value not in choices:
        _fail(op, f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}.")
    return value


def _op(op, name, value, optional=False):
    if (value is None and optional) or isinstance(value, Op):
        return value
    return _fail(op, f"{name} must be an op such as flip(0.5), got {value!r}.")


# ----------------------------------------------------------------------------
# Random draws (stateless: the same seed gives the same values).


def _split(seed, n):
    return tf.unstack(tf.random.experimental.stateless_split(seed, n))


def _uniform(seed, shape, lo=0.0, hi=1.0):
    return tf.random.stateless_uniform(shape, seed, minval=lo, maxval=hi)


def _draw(seed, shape, lo, hi, random_sign=False, neutral=0.0):
    """Uniform in [lo, hi]; with `random_sign`, mirrored about `neutral` half the time."""
    values = _uniform(seed, shape, lo, hi) if lo < hi else tf.fill(shape, tf.constant(lo, tf.float32))
    if random_sign:
        flip = _uniform(tf.random.experimental.stateless_fold_in(seed, 1), shape) < 0.5
        values = tf.where(flip, 2.0 * neutral - values, values)
    return values


def _beta(seed, shape, alpha):
    """Beta(alpha, alpha) from two gamma draws."""
    first, second = _split(seed, 2)
    a = tf.random.stateless_gamma(shape, first, alpha=alpha)
    b = tf.random.stateless_gamma(shape, second, alpha=alpha)
    total = a + b
    return tf.where(total > 0, a / tf.maximum(total, 1e-30), 0.5)


def _permutation(seed, size):
    """A random permutation of range(size) (the partner of each image in MixUp/CutMix)."""
    return tf.argsort(_uniform(seed, [size]))


def _mix_channels(images, matrices):
    """Per-image colour matrix: out[..., d] = sum_c images[..., c] * matrices[:, c, d].

    A batched matmul: much faster on CPU than a broadcast multiply by [B, 1, 1, 3].
    """
    shape = tf.shape(images)
    flat = tf.reshape(images, [shape[0], -1, shape[3]])
    return tf.reshape(tf.matmul(flat, matrices), shape)


def _scale(images, factors):
    """images [B, H, W, C] times per-image factors [B] (as a matmul, see `_mix_channels`)."""
    return _mix_channels(images, factors[:, None, None] * tf.eye(tf.shape(images)[3]))


def _both(active, chosen):
    return chosen if active is None else tf.logical_and(active, chosen)


def _select(active, new, old):
    """`new` for active images, `old` for the rest (active None: all active)."""
    if active is None:
        return new
    return tf.where(tf.reshape(active, [-1] + [1] * (new.shape.rank - 1)), new, old)


# ----------------------------------------------------------------------------
# The batch being augmented, with its pending warp.


class _Batch:
    """Images, labels and a pending warp (3x3 per image) not yet applied to the pixels.

    Applying a chain of warps at once reads pixels that a step-by-step
    application would have lost at an intermediate border (e.g. the corners
    of a zoomed-in image that a following rotation brings back). With black
    fill, `flush` blacks those pixels out again, so the fused result matches
    the step-by-step one (up to the resampling: one bilinear pass instead of
    several). Edge-replicating fills ('nearest', 'reflect') show the content
    instead of repeating an intermediate edge.
    """

    def __init__(self, images, labels):
        images = tf.convert_to_tensor(images)
        if images.dtype == tf.uint8:
            images = tf.cast(images, tf.float32) / 255.0
        self.images = tf.cast(images, tf.float32)
        self.labels = tf.cast(labels, tf.float32)
        shape = tf.shape(self.images)
        self.size = shape[0]
        self.height = tf.cast(shape[1], tf.float32)
        self.width = tf.cast(shape[2], tf.float32)
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
        if interpolation == "bilinear":  # Float rounding may pass 1 by an ulp (never below 0).
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
          (images float32 [B, H, W, 3] in [0, 1], labels float32 [B, C]).
        """
        batch = _Batch(images, labels)
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
    `_Batch.commutes`); `keeps_black` ops map black to black; `linear` ones
    commute with bilinear resampling.
    """

    pointwise = False
    keeps_black = False
    linear = False

    def transform(self, images, labels, seed, active):
        """Returns (images, labels) with the op applied where `active`."""
        raise NotImplementedError

    def apply(self, batch, seed, active):
        if not batch.commutes(self):
            batch.flush()
        batch.images, batch.labels = self.transform(batch.images, batch.labels, seed, active)


def _affine(a, b, c, d, e, f):
    """[B, 3, 3] matrices [[a, b, c], [d, e, f], [0, 0, 1]] from [B] components."""
    zeros, ones = tf.zeros_like(a), tf.ones_like(a)
    return tf.reshape(tf.stack([a, b, c, d, e, f, zeros, zeros, ones], axis=-1), [-1, 3, 3])


def _about_centre(a, b, d, e, batch):
    """Linear map [[a, b], [d, e]] (output -> input) about the image centre."""
    cx, cy = (batch.width - 1.0) / 2.0, (batch.height - 1.0) / 2.0
    return _affine(a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy)


def _geometry_options(op, fill, interpolation):
    return _choice(op, "fill", fill, _FILLS), _choice(op, "interpolation", interpolation, _INTERPOLATIONS)


# ----------------------------------------------------------------------------
# Geometric ops.


@register("identity")
class Identity(GeometricOp):
    """Leaves images unchanged (a branch of `one_of` that does nothing)."""

    aligned = keeps_frame = True

    def apply(self, batch, seed, active):
        del batch, seed, active


@register("flip")
class Flip(GeometricOp):
    """Horizontal flip of each image with probability `p` (imgaug Fliplr, Keras horizontal_flip).

    Args:
      p: probability per image.
    """

    aligned = keeps_frame = True

    def __init__(self, p=0.5):
        self.p = _number("flip", "p", p, 0.0, 1.0)

    def matrices(self, seed, batch):
        flipped = _uniform(seed, [batch.size]) < self.p
        sign = tf.where(flipped, -1.0, 1.0)
        zeros = tf.zeros_like(sign)
        shift = tf.where(flipped, batch.width - 1.0, 0.0)
        return _affine(sign, zeros, shift, zeros, tf.ones_like(sign), zeros)


@register("zoom")
class Zoom(GeometricOp):
    """Keras ImageDataGenerator's zoom: x and y factors drawn independently in [lo, hi].

    A factor z maps output offsets from the centre to input offsets z times
    larger, so z > 1 zooms out and z < 1 zooms in; the aspect ratio changes.
    The generator's default fill was 'nearest' (edge pixels repeated) and its
    resampling bilinear (scipy order 1). Its centre was size / 2 + 0.5, one
    pixel past the true centre (size - 1) / 2, which this op uses.

    Args:
      lo, hi: range of each factor.
      fill: 'nearest' (reference), 'constant' (black) or 'reflect'.
      interpolation: 'bilinear' (reference) or 'nearest'.
    """

    aligned = True

    def __init__(self, lo=0.5, hi=1.5, fill="nearest", interpolation="bilinear"):
        self.lo, self.hi = _range("zoom", ("lo", "hi"), lo, hi, minimum=1e-3)
        self.fill, self.interpolation = _geometry_options("zoom", fill, interpolation)

    def matrices(self, seed, batch):
        seed_x, seed_y = _split(seed, 2)
        zx = _draw(seed_x, [batch.size], self.lo, self.hi)
        zy = _draw(seed_y, [batch.size], self.lo, self.hi)
        zeros = tf.zeros_like(zx)
        return _about_centre(zx, zeros, zeros, zy, batch)


@register("affine_scale")
class AffineScale(GeometricOp):
    """imgaug Affine(scale=(lo, hi)): one factor for both axes, about the centre, black fill.

    A factor s > 1 enlarges the picture (zooms in), s < 1 shrinks it with a
    black border. imgaug's defaults: bilinear (order 1), constant fill 0.

    Args:
      lo, hi: range of the factor.
      fill: 'constant' (reference), 'nearest' or 'reflect'.
      interpolation: 'bilinear' (reference) or 'nearest'.
    """

    aligned = True

    def __init__(self, lo=0.25, hi=2.0, fill="constant", interpolation="bilinear"):
        self.lo, self.hi = _range("affine_scale", ("lo", "hi"), lo, hi, minimum=1e-3)
        self.fill, self.interpolation = _geometry_options("affine_scale", fill, interpolation)

    def matrices(self, seed, batch):
        inverse = 1.0 / _draw(seed, [batch.size], self.lo, self.hi)
        zeros = tf.zeros_like(inverse)
        return _about_centre(inverse, zeros, zeros, inverse, batch)


@register("rotate")
class Rotate(GeometricOp):
    """imgaug Affine(rotate=(lo, hi)): rotation in degrees about the centre, black fill.

    Positive angles turn the picture clockwise on screen.

    Args:
      lo, hi: range of the angle in degrees.
      fill: 'constant' (reference), 'nearest' or 'reflect'.
      interpolation: 'bilinear' (reference) or 'nearest'.
      random_sign: negate the angle for half the images (RandAugment's magnitudes).
    """

    def __init__(self, lo=-45.0, hi=45.0, fill="constant", interpolation="bilinear", random_sign=False):
        self.lo, self.hi = _range("rotate", ("lo", "hi"), lo, hi, -360.0, 360.0)
        self.fill, self.interpolation = _geometry_options("rotate", fill, interpolation)
        self.random_sign = bool(random_sign)

    def matrices(self, seed, batch):
        angle = _draw(seed, [batch.size], self.lo, self.hi, self.random_sign) * (math.pi / 180.0)
        cos, sin = tf.cos(angle), tf.sin(angle)
        return _about_centre(cos, sin, -sin, cos, batch)


@register("shear")
class Shear(GeometricOp):
    """Shear about the centre: x_in = x + s * (y - cy) (axis 'x'), or the same in y.

    Args:
      lo, hi: range of the shear factor s (tan of the shear angle).
      axis: 'x' or 'y'.
      fill, interpolation: as for `rotate`.
      random_sign: negate s for half the images.
    """

    def __init__(self, lo=-0.3, hi=0.3, axis="x", fill="constant", interpolation="bilinear",
                 random_sign=False):
        self.lo, self.hi = _range("shear", ("lo", "hi"), lo, hi, -10.0, 10.0)
        self.axis = _choice("shear", "axis", axis, ("x", "y"))
        self.fill, self.interpolation = _geometry_options("shear", fill, interpolation)
        self.random_sign = bool(random_sign)

    def matrices(self, seed, batch):
        s = _draw(seed, [batch.size], self.lo, self.hi, self.random_sign)
        zeros, ones = tf.zeros_like(s), tf.ones_like(s)
        if self.axis == "x":
            return _about_centre(ones, s, zeros, ones, batch)
        return _about_centre(ones, zeros, s, ones, batch)


@register("translate")
class Translate(GeometricOp):
    """Shifts the picture by a fraction of its width ('x') or height ('y').

    Args:
      lo, hi: range of the shift as a fraction of the size (0.1 = 10%).
      axis: 'x' or 'y'.
      fill, interpolation: as for `rotate`.
      random_sign: negate the shift for half the images.
    """

    aligned = True

    def __init__(self, lo=-0.1, hi=0.1, axis="x", fill="constant", interpolation="bilinear",
                 random_sign=False):
        self.lo, self.hi = _range("translate", ("lo", "hi"), lo, hi, -1.0, 1.0)
        self.axis = _choice("translate", "axis", axis, ("x", "y"))
        self.fill, self.interpolation = _geometry_options("translate", fill, interpolation)
        self.random_sign = bool(random_sign)

    def matrices(self, seed, batch):
        shift = _draw(seed, [batch.size], self.lo, self.hi, self.random_sign)
        zeros, ones = tf.zeros_like(shift), tf.ones_like(shift)
        if self.axis == "x":
            return _affine(ones, zeros, -shift * batch.width, zeros, ones, zeros)
        return _affine(ones, zeros, zeros, zeros, ones, -shift * batch.height)


@register("random_crop")
class RandomCrop(GeometricOp):
    """Pad by `padding` pixels on each side, then crop back at a random position.

    The CIFAR-style crop: a whole-pixel shift in [-padding, padding] in x and y
    (exact, no resampling), fused into the batch's single warp.

    Args:
      padding: pixels of padding on each side.
      fill: 'constant' (zero padding), 'reflect' (TF's edge-inclusive mirror)
        or 'nearest' (edge replicate).
    """

    aligned = True

    def __init__(self, padding=4, fill="constant"):
        self.padding = _number("random_crop", "padding", padding, 0, 1024, integer=True)
        self.fill = _choice("random_crop", "fill", fill, _FILLS)

    def matrices(self, seed, batch):
        offsets = tf.floor(_uniform(seed, [2, batch.size]) * (2 * self.padding + 1)) - self.padding
        zeros, ones = tf.zeros([batch.size]), tf.ones([batch.size])
        return _affine(ones, zeros, offsets[0], zeros, ones, offsets[1])


@register("random_resized_crop")
class RandomResizedCrop(GeometricOp):
    """Inception-style crop: a box of random area and aspect ratio, resized to the image size.

    As torchvision's RandomResizedCrop: up to 10 tries per image for a box of
    area fraction in `scale` and aspect ratio (w / h, log-uniform) in `ratio`
    that fits, else the whole image; the box corners are not rounded to
    whole pixels.

    Args:
      scale: (lo, hi) fraction of the image area.
      ratio: (lo, hi) aspect ratio range.
      interpolation: 'bilinear' or 'nearest'.
    """

    aligned = True
    fill = "nearest"  # The box lies inside the image; sampling its border never reads black.
    _TRIES = 10

    def __init__(self, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), interpolation="bilinear"):
        self.scale = _pair("random_resized_crop", "scale", scale, minimum=1e-4)
        self.ratio = _pair("random_resized_crop", "ratio", ratio, minimum=1e-3)
        if self.scale[1] > 1.0:
            _fail("random_resized_crop", f"scale must lie in (0, 1], got {scale!r}.")
        self.interpolation = _choice("random_resized_crop", "interpolation", interpolation, _INTERPOLATIONS)

    def matrices(self, seed, batch):
        seeds = _split(seed, 4)
        shape = [batch.size, self._TRIES]
        area = _draw(seeds[0], shape, *self.scale) * batch.height * batch.width
        aspect = tf.exp(_draw(seeds[1], shape, math.log(self.ratio[0]), math.log(self.ratio[1])))
        w, h = tf.sqrt(area * aspect), tf.sqrt(area / aspect)
        fits = tf.logical_and(w <= batch.width, h <= batch.height)
        first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
        found = tf.reduce_any(fits, axis=1)
        w = tf.where(found, tf.gather(w, first, batch_dims=1), batch.width)
        h = tf.where(found, tf.gather(h, first, batch_dims=1), batch.height)
        x0 = _uniform(seeds[2], [batch.size]) * (batch.width - w)
        y0 = _uniform(seeds[3], [batch.size]) * (batch.height - h)
        sx, sy = w / batch.width, h / batch.height
        zeros = tf.zeros_like(sx)
        return _affine(sx, zeros, x0 + 0.5 * sx - 0.5, zeros, sy, y0 + 0.5 * sy - 0.5)


# ----------------------------------------------------------------------------
# Per-pixel colour ops.


@register("brightness")
class Brightness(PixelOp):
    """imgaug Multiply((lo, hi), per_channel): multiplies pixel values, clipped to [0, 1].

    Per image, with probability `per_channel` each channel gets its own factor,
    else one factor for all three.

    Args:
      lo, hi: range of the factor.
      per_channel: probability (or True/False) of per-channel factors.
      random_sign: mirror the factor about 1 for half the images (1 + v or
        1 - v: RandAugment's Brightness).
    """

    pointwise = keeps_black = True

    def __init__(self, lo=0.5, hi=1.5, per_channel=0.0, random_sign=False):
        self.lo, self.hi = _range("brightness", ("lo", "hi"), lo, hi, minimum=0.0)
        self.per_channel = _number("brightness", "per_channel", float(per_channel)
                                   if isinstance(per_channel, bool) else per_channel, 0.0, 1.0)
        self.random_sign = bool(random_sign)

    def transform(self, images, labels, seed, active):
        seeds = _split(seed, 3)
        size = tf.shape(images)[0]
        per_channel = _uniform(seeds[0], [size, 1]) < self.per_channel
        factors = tf.where(per_channel,
                           _draw(seeds[1], [size, 3], self.lo, self.hi, self.random_sign, 1.0),
                           _draw(seeds[2], [size, 1], self.lo, self.hi, self.random_sign, 1.0))
        if active is not None:
            factors = tf.where(active[:, None], factors, 1.0)
        factors = tf.broadcast_to(factors, [size, 3])
        return tf.minimum(_mix_channels(images, tf.linalg.diag(factors)), 1.0), labels


@register("channel_shuffle")
class ChannelShuffle(PixelOp):
    """imgaug ChannelShuffle(p): with probability p, a random permutation of R, G, B.

    The permutation is uniform over all six (the identity included, as imgaug).

    Args:
      p: probability per image.
    """

    pointwise = keeps_black = linear = True
    _PERMUTATIONS = np.stack([np.eye(3, dtype=np.float32)[:, list(p)]
                              for p in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))])

    def __init__(self, p=1.0):
        self.p = _number("channel_shuffle", "p", p, 0.0, 1.0)

    def transform(self, images, labels, seed, active):
        chosen_seed, which_seed = _split(seed, 2)
        size = tf.shape(images)[0]
        which = tf.random.stateless_uniform([size], which_seed, minval=0, maxval=6, dtype=tf.int32)
        matrices = tf.gather(tf.constant(self._PERMUTATIONS), which)
        chosen = _both(active, _uniform(chosen_seed, [size]) < self.p)
        matrices = tf.where(chosen[:, None, None], matrices, tf.eye(3))
        return _mix_channels(images, matrices), labels


class _Enhance(PixelOp):
    """Shared by colour/contrast/sharpness: blend with a degenerate image by a factor."""

    name = None

    def __init__(self, lo, hi, random_sign):
        self.lo, self.hi = _range(self.name, ("lo", "hi"), lo, hi, minimum=0.0)
        self.random_sign = bool(random_sign)

    def degenerate(self, images):
        raise NotImplementedError

    def transform(self, images, labels, seed, active):
        factor = _draw(seed, [tf.shape(images)[0]], self.lo, self.hi, self.random_sign, 1.0)
        if active is not None:
            factor = tf.where(active, factor, 1.0)
        # images + (f - 1) * (images - base) is exactly `images` where f is 1.
        blended = images + _scale(images - self.degenerate(images), factor - 1.0)
        return tf.clip_by_value(blended, 0.0, 1.0), labels


def _grey(images):
    return tf.tensordot(images, tf.constant(_GREY), axes=[[3], [0]])[..., None]


@register("color")
class Color(_Enhance):
    """Saturation (PIL ImageEnhance.Color): blend with the grey image; factor 0 is grey, 1 unchanged.

    Args:
      lo, hi: range of the factor.
      random_sign: mirror the factor about 1 for half the images.
    """

    name = "color"
    pointwise = keeps_black = True

    def __init__(self, lo=0.5, hi=1.5, random_sign=False):
        super().__init__(lo, hi, random_sign)

    def degenerate(self, images):
        return _grey(images)


@register("contrast")
class Contrast(_Enhance):
    """Contrast (PIL ImageEnhance.Contrast): blend with the image's mean grey level.

    Args:
      lo, hi: range of the factor (0: flat grey, 1: unchanged).
      random_sign: mirror the factor about 1 for half the images.
    """

    name = "contrast"

    def __init__(self, lo=0.5, hi=1.5, random_sign=False):
        super().__init__(lo, hi, random_sign)

    def degenerate(self, images):
        return tf.reduce_mean(_grey(images), axis=[1, 2, 3], keepdims=True)


@register("sharpness")
class Sharpness(_Enhance):
    """Sharpness (PIL ImageEnhance.Sharpness): blend with a 3x3 smoothed image, borders kept.

    Args:
      lo, hi: range of the factor (0: smoothed, 1: unchanged, 2: sharpened).
      random_sign: mirror the factor about 1 for half the images.
    """

    name = "sharpness"
    heavy = True
    _KERNEL = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0

    def __init__(self, lo=0.5, hi=1.5, random_sign=False):
        super().__init__(lo, hi, random_sign)

    def degenerate(self, images):
        kernel = tf.tile(tf.constant(self._KERNEL)[:, :, None, None], [1, 1, 3, 1])
        smooth = tf.nn.depthwise_conv2d(images, kernel, [1, 1, 1, 1], "SAME")
        shape = tf.shape(images)
        rows = tf.logical_and(tf.range(shape[1]) > 0, tf.range(shape[1]) < shape[1] - 1)
        cols = tf.logical_and(tf.range(shape[2]) > 0, tf.range(shape[2]) < shape[2] - 1)
        inside = tf.logical_and(rows[:, None], cols[None, :])[None, :, :, None]
        return tf.where(inside, smooth, images)


@register("solarize")
class Solarize(PixelOp):
    """Inverts pixel values at or above a threshold drawn in [lo, hi] (in [0, 1] units).

    Args:
      lo, hi: range of the threshold.
    """

    pointwise = True

    def __init__(self, lo=0.5, hi=0.5):
        self.lo, self.hi = _range("solarize", ("lo", "hi"), lo, hi, 0.0, 1.0)

    def transform(self, images, labels, seed, active):
        threshold = _draw(seed, [tf.shape(images)[0]], self.lo, self.hi)
        if active is not None:
            threshold = tf.where(active, threshold, 2.0)
        return tf.where(images >= threshold[:, None, None, None], 1.0 - images, images), labels


@register("posterize")
class Posterize(PixelOp):
    """Keeps the top `bits` bits of each 8-bit value; bits drawn in {lo, ..., hi}.

    Args:
      lo, hi: range of the number of bits kept (1 to 8; 8 is unchanged).
    """

    pointwise = keeps_black = True

    def __init__(self, lo=4, hi=4):
        self.lo = _number("posterize", "lo", lo, 1, 8, integer=True)
        self.hi = _number("posterize", "hi", hi, self.lo, 8, integer=True)

    def transform(self, images, labels, seed, active):
        size = tf.shape(images)[0]
        bits = tf.random.stateless_uniform([size], seed, minval=self.lo, maxval=self.hi + 1,
                                           dtype=tf.int32)
        step = tf.cast(tf.bitwise.left_shift(1, 8 - bits), tf.float32)[:, None, None, None]
        return _select(active, tf.floor(tf.round(images * 255.0) / step) * step / 255.0, images), labels


@register("auto_contrast")
class AutoContrast(PixelOp):
    """Stretches each channel of each image to the full [0, 1] range (PIL autocontrast)."""

    def transform(self, images, labels, seed, active):
        low = tf.reduce_min(images, axis=[1, 2], keepdims=True)
        high = tf.reduce_max(images, axis=[1, 2], keepdims=True)
        spread = high - low
        scale = tf.where(spread > 0, 1.0 / tf.maximum(spread, 1e-6), 1.0)
        offset = tf.where(spread > 0, low, 0.0)
        return _select(active, tf.clip_by_value((images - offset) * scale, 0.0, 1.0), images), labels


@register("equalize")
class Equalize(PixelOp):
    """Histogram equalisation of each channel of each image (PIL/torchvision `equalize`)."""

    heavy = True

    def transform(self, images, labels, seed, active):
        shape = tf.shape(images)
        values = tf.cast(tf.round(images * 255.0), tf.int32)
        flat = tf.reshape(tf.transpose(values, [0, 3, 1, 2]), [shape[0] * 3, -1])
        hist = tf.math.bincount(flat, minlength=256, maxlength=256, axis=-1)
        last = tf.gather(hist, tf.reduce_max(flat, axis=1), batch_dims=1)
        step = (shape[1] * shape[2] - last) // 255
        lut = (tf.cumsum(hist, axis=1, exclusive=True) + step[:, None] // 2) // tf.maximum(step, 1)[:, None]
        lut = tf.where(step[:, None] > 0, tf.minimum(lut, 255), tf.range(256)[None, :])
        equalised = tf.cast(tf.gather(lut, flat, batch_dims=1), tf.float32) / 255.0
        equalised = tf.transpose(tf.reshape(equalised, [shape[0], 3, shape[1], shape[2]]), [0, 2, 3, 1])
        return _select(active, equalised, images), labels


# ----------------------------------------------------------------------------
# Occlusion and mixing.


@register("coarse_dropout")
class CoarseDropout(PixelOp):
    """imgaug CoarseDropout(p, size_percent): zero cells of a coarse grid, all channels.

    The grid has max(int(size * size_percent), min_size) cells a side (imgaug's
    minimum is 3, so at 32 and 64 px with size_percent 0.02 it is 3x3, cells
    about a third of the image wide); each cell is zeroed with probability p.
    Cells map to pixels as a nearest-neighbour upscale (row i -> cell
    floor(i * cells / size)).

    Args:
      p: probability per cell.
      size_percent: grid size as a fraction of the image size.
      min_size: minimum cells a side.
    """

    def __init__(self, p=0.2, size_percent=0.02, min_size=3):
        self.p = _number("coarse_dropout", "p", p, 0.0, 1.0)
        self.size_percent = _number("coarse_dropout", "size_percent", size_percent, 0.0, 1.0)
        self.min_size = _number("coarse_dropout", "min_size", min_size, 1, 4096, integer=True)

    def _cells(self, size):
        return tf.maximum(tf.cast(tf.cast(size, tf.float32) * self.size_percent, tf.int32), self.min_size)

    def transform(self, images, labels, seed, active):
        shape = tf.shape(images)
        rows, cols = self._cells(shape[1]), self._cells(shape[2])
        keep = _uniform(seed, tf.stack([shape[0], rows, cols])) >= self.p
        if active is not None:
            keep = tf.logical_or(keep, tf.logical_not(active)[:, None, None])
        # Nearest upscale as a product with one-hot cell maps, straight to [B, H, W * 3]
        # (channels included): far cheaper on CPU than gathers and a broadcast multiply.
        row_cells = tf.one_hot(tf.range(shape[1]) * rows // shape[1], rows)
        col_cells = tf.one_hot(tf.repeat(tf.range(shape[2]) * cols // shape[2], shape[3]), cols)
        mask = tf.einsum("hi,bij,wj->bhw", row_cells, tf.cast(keep, tf.float32), col_cells)
        return tf.reshape(tf.reshape(images, [shape[0], shape[1], -1]) * mask, shape), labels


def _boxes(seeds, batch_shape, area, aspect):
    """Masks [B, H, W] of boxes of the given pixel area and aspect (w / h), placed at random."""
    size, height, width = batch_shape[0], batch_shape[1], batch_shape[2]
    h = tf.minimum(tf.round(tf.sqrt(area / aspect)), tf.cast(height, tf.float32))
    w = tf.minimum(tf.round(tf.sqrt(area * aspect)), tf.cast(width, tf.float32))
    top = tf.floor(_uniform(seeds[0], [size]) * (tf.cast(height, tf.float32) - h + 1.0))
    left = tf.floor(_uniform(seeds[1], [size]) * (tf.cast(width, tf.float32) - w + 1.0))
    rows = tf.cast(tf.range(height), tf.float32)[None, :]
    cols = tf.cast(tf.range(width), tf.float32)[None, :]
    in_rows = tf.logical_and(rows >= top[:, None], rows < (top + h)[:, None])
    in_cols = tf.logical_and(cols >= left[:, None], cols < (left + w)[:, None])
    return tf.logical_and(in_rows[:, :, None], in_cols[:, None, :])


@register("random_erasing")
class RandomErasing(PixelOp):
    """Random Erasing (Zhong et al. 2017, torchvision semantics): erase one box per image.

    With probability p, up to 10 tries for a box of area fraction in `scale`
    and aspect ratio (log-uniform) in `ratio` that fits inside the image; it is
    filled with `value` (a number in [0, 1], or 'random' for uniform noise).

    Args:
      p: probability per image.
      scale: (lo, hi) fraction of the image area.
      ratio: (lo, hi) aspect ratio range.
      value: fill value, or 'random'.
    """

    _TRIES = 10

    def __init__(self, p=0.5, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0.0):
        self.p = _number("random_erasing", "p", p, 0.0, 1.0)
        self.scale = _pair("random_erasing", "scale", scale, minimum=0.0)
        self.ratio = _pair("random_erasing", "ratio", ratio, minimum=1e-3)
        if value != "random":
            value = _number("random_erasing", "value ('random' or a number)", value, 0.0, 1.0)
        self.value = value

    def transform(self, images, labels, seed, active):
        seeds = _split(seed, 6)
        shape = tf.shape(images)
        tries = [shape[0], self._TRIES]
        total = tf.cast(shape[1] * shape[2], tf.float32)
        area = _draw(seeds[0], tries, *self.scale) * total
        aspect = tf.exp(_draw(seeds[1], tries, math.log(self.ratio[0]), math.log(self.ratio[1])))
        fits = tf.logical_and(tf.round(tf.sqrt(area / aspect)) < tf.cast(shape[1], tf.float32),
                              tf.round(tf.sqrt(area * aspect)) < tf.cast(shape[2], tf.float32))
        first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
        erase = _both(active, tf.logical_and(tf.reduce_any(fits, axis=1),
                                             _uniform(seeds[2], [shape[0]]) < self.p))
        boxes = _boxes(seeds[3:5], shape, tf.gather(area, first, batch_dims=1),
                          tf.gather(aspect, first, batch_dims=1))
        boxes = tf.logical_and(boxes, erase[:, None, None])[..., None]
        fill = _uniform(seeds[5], shape) if self.value == "random" else self.value
        return tf.where(boxes, fill, images), labels


@register("mixup")
class MixUp(PixelOp):
    """MixUp (Zhang et al. 2018): blend each image and label with a random partner.

    x = lam * x + (1 - lam) * x[perm], y likewise, lam ~ Beta(alpha, alpha)
    per image, perm a random permutation of the batch. Rows of y keep their sum.

    Args:
      alpha: Beta distribution parameter.
    """

    def __init__(self, alpha=0.2):
        self.alpha = _number("mixup", "alpha", alpha, 1e-3, 1e3)

    def transform(self, images, labels, seed, active):
        lam_seed, perm_seed = _split(seed, 2)
        size = tf.shape(images)[0]
        lam = _beta(lam_seed, [size], self.alpha)
        if active is not None:
            lam = tf.where(active, lam, 1.0)
        perm = _permutation(perm_seed, size)
        images = _scale(images, lam) + _scale(tf.gather(images, perm), 1.0 - lam)
        labels = lam[:, None] * labels + (1.0 - lam[:, None]) * tf.gather(labels, perm)
        return images, labels


@register("cutmix")
class CutMix(PixelOp):
    """CutMix (Yun et al. 2019): paste a box from a random partner; labels by pasted area.

    lam ~ Beta(alpha, alpha) per image; the box is sqrt(1 - lam) of each side,
    centred uniformly and clipped to the image; labels mix by the actual
    pasted area, so rows keep their sum.

    Args:
      alpha: Beta distribution parameter.
    """

    def __init__(self, alpha=1.0):
        self.alpha = _number("cutmix", "alpha", alpha, 1e-3, 1e3)

    def transform(self, images, labels, seed, active):
        seeds = _split(seed, 4)
        shape = tf.shape(images)
        height, width = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
        cut = tf.sqrt(1.0 - _beta(seeds[0], [shape[0]], self.alpha))
        if active is not None:
            cut = tf.where(active, cut, 0.0)
        centre_y = _uniform(seeds[1], [shape[0]]) * height
        centre_x = _uniform(seeds[2], [shape[0]]) * width
        y0 = tf.clip_by_value(tf.round(centre_y - cut * height / 2), 0.0, height)
        y1 = tf.clip_by_value(tf.round(centre_y + cut * height / 2), 0.0, height)
        x0 = tf.clip_by_value(tf.round(centre_x - cut * width / 2), 0.0, width)
        x1 = tf.clip_by_value(tf.round(centre_x + cut * width / 2), 0.0, width)
        rows = tf.cast(tf.range(shape[1]), tf.float32)[None, :]
        cols = tf.cast(tf.range(shape[2]), tf.float32)[None, :]
        in_rows = tf.logical_and(rows >= y0[:, None], rows < y1[:, None])
        in_cols = tf.logical_and(cols >= x0[:, None], cols < x1[:, None])
        boxes = tf.logical_and(in_rows[:, :, None], in_cols[:, None, :])[..., None]
        perm = _permutation(seeds[3], shape[0])
        images = tf.where(boxes, tf.gather(images, perm), images)
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
        labels = lam[:, None] * labels + (1.0 - lam[:, None]) * tf.gather(labels, perm)
        return images, labels


# ----------------------------------------------------------------------------
# Combinators.


def _apply_disjoint(batch, branches, active):
    """Applies (op, seed, chosen) branches that act on disjoint images.

    Their order does not matter, so geometric branches go first and fuse into
    the pending warp with the ops before them. A single cheap pixel branch
    runs masked over the whole batch; several pixel branches, or a heavy one,
    run each on its own images only (partitioned, then stitched back), so
    one_of over ten colour ops costs about one op, not ten. A mixing op
    (mixup, cutmix) in a partitioned branch finds partners among its own
    images.
    """
    geometric = [b for b in branches if b[0].geometric]
    pixel = [b for b in branches if not b[0].geometric]
    for op, seed, chosen in geometric:
        op.apply(batch, seed, _both(active, chosen))
    if len(pixel) > 1 or (pixel and pixel[0][0].heavy):
        _apply_partitioned(batch, pixel, active)
    else:
        for op, seed, chosen in pixel:
            op.apply(batch, seed, _both(active, chosen))


def _apply_partitioned(batch, branches, active):
    """Applies each (op, seed, chosen) branch to the images it chose, as a batch of its own."""
    batch.flush()
    parts = len(branches) + 1  # Part 0: images no branch chose.
    ids = tf.zeros([batch.size], tf.int32)
    for k, (_, _, chosen) in enumerate(branches):
        ids = tf.where(_both(active, chosen), k + 1, ids)
    positions = tf.dynamic_partition(tf.range(batch.size), ids, parts)
    images = tf.dynamic_partition(batch.images, ids, parts)
    labels = tf.dynamic_partition(batch.labels, ids, parts)
    for k, (op, seed, _) in enumerate(branches):
        part = _Batch(images[k + 1], labels[k + 1])
        op.apply(part, seed, None)
        part.flush()
        images[k + 1], labels[k + 1] = part.images, part.labels
    stitched = tf.dynamic_stitch(positions, images)
    stitched.set_shape(batch.images.shape)
    batch.images = stitched
    batch.labels = tf.reshape(tf.dynamic_stitch(positions, labels), tf.shape(batch.labels))


class _OpList(Op):
    """A combinator over a list of ops (sequential, one_of, random_order): one constructor for all."""

    name = None  # The registered name, for error messages.

    def __init__(self, *ops):
        if not ops:
            _fail(self.name, "needs at least one op.")
        self.ops = tuple(_op(self.name, f"argument {i + 1}", op) for i, op in enumerate(ops))
        self.geometric = all(op.geometric for op in self.ops)
        self.heavy = any(op.heavy for op in self.ops)


@register("sequential")
class Sequential(_OpList):
    """Applies its ops one after the other (what `a | b` builds).

    Args:
      *ops: the ops, in order.
    """

    name = "sequential"

    def apply(self, batch, seed, active):
        for i, op in enumerate(self.ops):
            op.apply(batch, tf.random.experimental.stateless_fold_in(seed, i), active)


@register("sometimes")
class Sometimes(Op):
    """Per image, with probability p applies `then`, else `otherwise` (imgaug Sometimes).

    Args:
      p: probability of `then`.
      then: an op.
      otherwise: an op, or None for nothing.
    """

    def __init__(self, p, then, otherwise=None):
        self.p = _number("sometimes", "p", p, 0.0, 1.0)
        self.then = _op("sometimes", "then", then)
        self.otherwise = _op("sometimes", "otherwise", otherwise, optional=True)
        self.geometric = self.then.geometric and (otherwise is None or otherwise.geometric)
        self.heavy = self.then.heavy or (otherwise is not None and otherwise.heavy)

    def apply(self, batch, seed, active):
        seeds = _split(seed, 3)
        chosen = _uniform(seeds[0], [batch.size]) < self.p
        branches = [(self.then, seeds[1], chosen)]
        if self.otherwise is not None:
            branches.append((self.otherwise, seeds[2], tf.logical_not(chosen)))
        _apply_disjoint(batch, branches, active)


@register("one_of")
class OneOf(_OpList):
    """Per image, applies one of its ops chosen uniformly (imgaug OneOf).

    Args:
      *ops: the candidates.
    """

    name = "one_of"

    def apply(self, batch, seed, active):
        seeds = _split(seed, len(self.ops) + 1)
        which = tf.random.stateless_uniform([batch.size], seeds[0], minval=0, maxval=len(self.ops),
                                            dtype=tf.int32)
        _apply_disjoint(batch, [(op, seeds[i + 1], tf.equal(which, i)) for i, op in enumerate(self.ops)],
                        active)


@register("random_order")
class RandomOrder(_OpList):
    """Applies all its ops, in a random order per image (imgaug Sequential(random_order=True)).

    Vectorised as n rounds; in round k each op runs on the images that put it
    k-th (geometric ops fuse into the warp, pixel ops run on their own images).

    Args:
      *ops: the ops.
    """

    name = "random_order"

    def apply(self, batch, seed, active):
        seeds = _split(seed, len(self.ops) + 1)
        order = tf.argsort(_uniform(seeds[0], [batch.size, len(self.ops)]), axis=1)
        for position in range(len(self.ops)):
            _apply_disjoint(batch, [(op, seeds[i + 1], tf.equal(order[:, position], i))
                                    for i, op in enumerate(self.ops)], active)


# ----------------------------------------------------------------------------
# Modern composite policies.


@register("rand_augment")
class RandAugment(Op):
    """RandAugment (Cubuk et al. 2020) with torchvision's op set and magnitudes, per image.

    Each of `num_ops` rounds applies one op chosen uniformly per image among:
    identity, shear x/y (0.3 m), translate x/y (0.453 m of the size), rotate
    (30 m degrees), brightness / color / contrast / sharpness (factor 1 +- 0.9 m),
    posterize (8 - round(4 m) bits), solarize (threshold 1 - m), auto contrast,
    equalize; m = magnitude / (num_magnitude_bins - 1), signs random.
    Geometric ops act about the centre with black fill.

    Args:
      num_ops: ops per image.
      magnitude: 0 .. num_magnitude_bins - 1.
      num_magnitude_bins: magnitude scale (31 as torchvision).
      interpolation: 'bilinear' or 'nearest'.
    """

    heavy = True

    def __init__(self, num_ops=2, magnitude=9, num_magnitude_bins=31, interpolation="bilinear"):
        self.num_ops = _number("rand_augment", "num_ops", num_ops, 1, 16, integer=True)
        bins = _number("rand_augment", "num_magnitude_bins", num_magnitude_bins, 2, 1000, integer=True)
        magnitude = _number("rand_augment", "magnitude", magnitude, 0, bins - 1)
        interpolation = _choice("rand_augment", "interpolation", interpolation, _INTERPOLATIONS)
        m = magnitude / (bins - 1)
        geometry = dict(interpolation=interpolation, random_sign=True)
        enhance = (1.0 + 0.9 * m, 1.0 + 0.9 * m)
        bits = 8 - int(round(4 * m))
        candidates = OneOf(
            Identity(),
            Shear(0.3 * m, 0.3 * m, axis="x", **geometry), Shear(0.3 * m, 0.3 * m, axis="y", **geometry),
            Translate(0.453 * m, 0.453 * m, axis="x", **geometry),
            Translate(0.453 * m, 0.453 * m, axis="y", **geometry),
            Rotate(30.0 * m, 30.0 * m, **geometry),
            Brightness(*enhance, random_sign=True), Color(*enhance, random_sign=True),
            Contrast(*enhance, random_sign=True), Sharpness(*enhance, random_sign=True),
            Posterize(bits, bits), Solarize(1.0 - m, 1.0 - m), AutoContrast(), Equalize())
        self._rounds = Sequential(*[candidates] * self.num_ops)

    def apply(self, batch, seed, active):
        self._rounds.apply(batch, seed, active)


@register("augmix")
class AugMix(Op):
    """AugMix (Hendrycks et al. 2020): a convex mix of `width` random op chains, then with the image.

    Each chain applies `depth` (or per image 1-3 when depth is -1) ops drawn
    from: auto contrast, equalize, posterize, rotate, solarize, shear x/y,
    translate x/y, at a level uniform in [0.1, severity] (continuous, not
    rounded as in the paper's code). Chain weights ~ Dirichlet(alpha); the
    result is (1 - m) * image + m * mix, m ~ Beta(alpha, alpha). The paper's
    Jensen-Shannon consistency loss is not part of it. The costliest op here
    (width x 3 steps, each a resampling and a partitioned pixel op).

    Args:
      severity: 1 .. 10.
      width: number of chains.
      depth: ops per chain, or -1 for 1-3 at random.
      alpha: Dirichlet and Beta parameter.
      interpolation: 'bilinear' or 'nearest'.
    """

    heavy = True

    def __init__(self, severity=3, width=3, depth=-1, alpha=1.0, interpolation="bilinear"):
        severity = _number("augmix", "severity", severity, 0.1, 10.0)
        self.width = _number("augmix", "width", width, 1, 16, integer=True)
        self.depth = _number("augmix", "depth", depth, -1, 16, integer=True)
        if self.depth == 0:
            _fail("augmix", "depth must be -1 (1 to 3 at random) or >= 1, got 0.")
        self.alpha = _number("augmix", "alpha", alpha, 1e-3, 1e3)
        interpolation = _choice("augmix", "interpolation", interpolation, _INTERPOLATIONS)
        lo, hi = 0.1 / 10.0, severity / 10.0  # Level as a fraction of the paper's maximum (10).
        geometry = dict(interpolation=interpolation, random_sign=True)
        self._candidates = OneOf(
            AutoContrast(), Equalize(), Posterize(4 - min(int(severity * 0.4), 3), 4),
            Rotate(30.0 * lo, 30.0 * hi, **geometry), Solarize(1.0 - hi, 1.0 - lo),
            Shear(0.3 * lo, 0.3 * hi, axis="x", **geometry), Shear(0.3 * lo, 0.3 * hi, axis="y", **geometry),
            Translate(lo / 3.0, hi / 3.0, axis="x", **geometry),
            Translate(lo / 3.0, hi / 3.0, axis="y", **geometry))

    def apply(self, batch, seed, active):
        batch.flush()
        seeds = _split(seed, self.width + 2)
        weights = tf.random.stateless_gamma([batch.size, self.width], seeds[0], alpha=self.alpha)
        weights /= tf.maximum(tf.reduce_sum(weights, axis=1, keepdims=True), 1e-30)
        mixed = tf.zeros_like(batch.images)
        for k in range(self.width):
            mixed += _scale(self._chain(batch, seeds[k + 2]), weights[:, k])
        m = _beta(seeds[1], [batch.size], self.alpha)
        batch.images = _select(active, _scale(batch.images, 1.0 - m) + _scale(mixed, m), batch.images)

    def _chain(self, batch, seed):
        chain = _Batch(batch.images, batch.labels)
        depth_seed, step_seed = _split(seed, 2)
        steps = 3 if self.depth < 0 else self.depth
        depth = tf.random.stateless_uniform([batch.size], depth_seed, minval=1, maxval=4, dtype=tf.int32)
        for step in range(steps):
            active = depth > step if self.depth < 0 else None
            self._candidates.apply(chain, tf.random.experimental.stateless_fold_in(step_seed, step), active)
        chain.flush()
        return chain.images
