"""The one preparation of an image: encoded bytes -> the network's input.

Training, evaluation, predict and the export's serving function all call
the same `Preprocessing`, so "prepared exactly as in training" is a property
of the code:

    decode(bytes)   -> uint8 [S, S, 3]   any format tf.io.decode_image reads (JPEG, PNG, GIF's first frame,
                                         BMP, WebP), greyscale, RGBA and CMYK too; resized to S x S unless it has that
                                         size already (Tiny ImageNet at 64 px), then rounded back to uint8
    scale(uint8)    -> float32 [0, 1]    pixels / 255 (training augments here, between scale and normalise)
    normalise(x)    -> float32           (x - mean) / std when the run sets them
    prepare(uint8)  =  normalise(scale(.))

An image whose header declares more than `max_pixels` pixels (Pillow's
decompression-bomb limit by default) is refused before it is decoded: a
1 MB PNG can declare 20000 x 20000 pixels and take 1.2 GB once decoded.

`crop='center'` first cuts the largest centred square out of a non-square
image (no stretching); the default `'stretch'` resizes the whole image to a
square, as Keras' `image_dataset_from_directory` does.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from trainer.errors import UserError

RESIZE_METHODS = ("bilinear", "nearest", "bicubic", "area")
MAX_PIXELS = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS: about a quarter gigabyte of RGB pixels.
CROPS = ("stretch", "center")
INPUT_SCALE = 1.0 / 255.0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")  # The files `decode` reads, in any case.


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network's input (see the module docstring).

    Attributes:
      image_size: the side S of the network's input.
      resize: 'bilinear' (antialiased), 'nearest' (not antialiased), 'bicubic' or 'area'.
      mean: None, or 3 per-channel means subtracted after scaling to [0, 1].
      std: 3 per-channel standard deviations divided by (with `mean`).
      crop: 'stretch' (resize the whole image) or 'center' (the centred square, then resize).
      max_pixels: images whose header declares more pixels are refused before decoding.
    """

    image_size: int
    resize: str = "bilinear"
    mean: tuple | None = None
    std: tuple | None = None
    crop: str = "stretch"
    max_pixels: int = MAX_PIXELS

    def __post_init__(self):
        size = self.image_size
        if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 1024:
            raise UserError(f"IMAGE_SIZE (trainer.data.image_size) must be an integer in [8, 1024], got {size!r}.")
        if self.resize not in RESIZE_METHODS:
            raise UserError(f"trainer.data.resize must be one of {', '.join(RESIZE_METHODS)}, got "
                            f"{self.resize!r}.")
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise UserError(f"trainer.data.max_pixels must be a positive integer, got {self.max_pixels!r}.")
        if self.crop not in CROPS:
            raise UserError(f"trainer.data.crop must be one of {', '.join(CROPS)}, got {self.crop!r}.")
        mean, std = self.mean, self.std
        if (mean is None) != (std is None) or (mean is not None and (
                len(mean) != 3 or len(std) != 3 or min(std) <= 0)):
            raise UserError(f"trainer.data.mean and std must both be None or both 3 numbers (std > 0), got "
                            f"{mean!r} and {std!r}.")
        if mean is not None:
            object.__setattr__(self, "mean", tuple(float(v) for v in mean))
            object.__setattr__(self, "std", tuple(float(v) for v in std))

    @property
    def antialias(self):
        return self.resize != "nearest"

    def decode(self, encoded, known=None):
        """Encoded image bytes (a scalar tf.string) -> uint8 [S, S, 3]; an error for more than `max_pixels`.

        `known`: None, or a `KnownImages` that holds for every image this decode will see (a TFRecord
        index says it, from the converter's reading of every header). It leaves out, at graph-building time,
        only work that cannot change such an image's pixels: the pixel-limit check when no header declares more
        than `max_pixels`, the WebP branch when none is WebP, and the crop and resize when every image already
        has the network's size (then a bare decode, and an image of any other size is an error, as a corrupt
        one is). An untaken branch still costs in tf.data's lowered control flow (BUILD_NOTES.md).
        """
        check = known is None or known.max_pixels > self.max_pixels
        webp = known is None or known.webp
        all_native = known is not None and known.size == (self.image_size, self.image_size)
        checks = []
        if check:
            height, width = tf.unstack(header_shape(encoded))
            checks.append(tf.debugging.Assert(height * width <= self.max_pixels, [tf.strings.join([
                "The image declares ", tf.strings.as_string(height), " x ", tf.strings.as_string(width),
                f" pixels, more than trainer.data.max_pixels = {self.max_pixels}: refused before decoding"])]))
        with tf.control_dependencies(checks):
            image = decode_pixels(encoded, webp)
        size = self.image_size
        if all_native:
            return tf.ensure_shape(image, [size, size, 3])
        image = tf.ensure_shape(image, [None, None, 3])
        if self.crop == "center":
            height, width = tf.shape(image)[0], tf.shape(image)[1]
            side = tf.minimum(height, width)
            image = tf.image.crop_to_bounding_box(image, (height - side) // 2, (width - side) // 2, side, side)

        def resized():
            out = tf.image.resize(image, [size, size], method=self.resize, antialias=self.antialias)
            return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)

        native = tf.reduce_all(tf.equal(tf.shape(image)[:2], size))
        return tf.ensure_shape(tf.cond(native, lambda: image, resized), [size, size, 3])

    def decode_batch(self, encoded, known=None):
        """`decode` of each of N encoded images (tf.string [N]) -> uint8 [N, S, S, 3], in one call.

        For images known to decode (`known.decoded`): one failure fails the batch. A tf.data map's call per
        image costs about as much as decoding a 64 px JPEG; one call per batch halves a small image's decode
        (BUILD_NOTES.md, "Decoding a batch at a time").
        """
        size = self.image_size
        return tf.map_fn(lambda e: self.decode(e, known), encoded,
                         fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))

    def scale(self, images):
        """uint8 pixels -> float32 in [0, 1]."""
        return tf.cast(images, tf.float32) * INPUT_SCALE

    def normalise(self, images):
        """float32 images in [0, 1] -> the network's input ((x - mean) / std, or as they are)."""
        if self.mean is None:
            return images
        return (images - tf.constant(self.mean, tf.float32)) / tf.constant(self.std, tf.float32)

    def prepare(self, images):
        """uint8 images -> the network's input (scale, then normalise)."""
        return self.normalise(self.scale(images))

    def __call__(self, encoded):
        """Encoded bytes -> the network's input, float32 [S, S, 3]."""
        return self.prepare(self.decode(encoded))

    def to_json(self):
        return {"image_size": self.image_size, "resize": self.resize, "antialias": self.antialias,
                "crop": self.crop, "max_pixels": self.max_pixels, "input_scale": INPUT_SCALE,
                "mean": None if self.mean is None else list(self.mean),
                "std": None if self.std is None else list(self.std)}

    @classmethod
    def from_json(cls, value):
        """The inverse of `to_json` (extra keys ignored; `crop` defaults to 'stretch' for older runs)."""
        return cls(int(value["image_size"]), value.get("resize", "bilinear"),
                   None if value.get("mean") is None else tuple(value["mean"]),
                   None if value.get("std") is None else tuple(value["std"]), value.get("crop", "stretch"),
                   int(value.get("max_pixels", MAX_PIXELS)))


@dataclasses.dataclass(frozen=True)
class KnownImages:
    """What holds for every image of a split, known before reading any (`Preprocessing.decode`'s `known`).

    Attributes:
      max_pixels: the most pixels (height x width) any image's header declares.
      size: (height, width) when every image's header declares that size, else None.
      webp: whether any image is WebP.
      decoded: every image was decoded once already (by the converter's survey): a pipeline may decode them a
        batch at a time (`Preprocessing.decode_batch`), since none can fail alone.
    """

    max_pixels: int
    size: tuple | None
    webp: bool
    decoded: bool = False

    def to_json(self):
        return {"max_pixels": self.max_pixels, "size": None if self.size is None else list(self.size),
                "webp": self.webp, "decoded": self.decoded}

    @classmethod
    def from_json(cls, value):
        size = value["size"]
        return cls(int(value["max_pixels"]), None if size is None else (int(size[0]), int(size[1])),
                   bool(value["webp"]), bool(value.get("decoded", False)))


class ImageSurvey:
    """Reads the header of every image `add`ed (as `decode` does); `known(count)` says what holds for all of them.

    While every image is small (at most DECODE_PIXELS), it also decodes them, so that `known` can say they all
    decode: only for small images does a call per image cost as much as their decode (`decode_batch`).
    """

    BATCH = 256  # Headers read by one call (one at a time: 0.35 ms an image, mostly the call).
    DECODE_PIXELS = 512 * 512

    def __init__(self):
        self.count, self.max_pixels, self.sizes, self.webp, self.unreadable = 0, 0, set(), False, False
        self.decoded = True
        self._pending = []

    def add(self, encoded):
        """One image's encoded bytes (a header that cannot be read makes `known` None: nothing is assumed)."""
        self.count += 1
        self._pending.append(encoded)
        if len(self._pending) >= self.BATCH:
            self._read()

    def _read(self):
        try:
            shapes, webp = (v.numpy() for v in _headers(tf.constant(self._pending, tf.string)))
        except tf.errors.OpError:  # An unreadable header (a corrupt JPEG) fails the whole batch.
            self.unreadable = True
        else:
            self.max_pixels = max(self.max_pixels, int(np.max(np.prod(shapes, axis=1))))
            if len(self.sizes) < 2:  # One size, or several (then which ones does not matter).
                self.sizes.update(map(tuple, np.unique(shapes, axis=0)[:2].tolist()))
            self.webp = self.webp or bool(np.any(webp))
            self.decoded = self.decoded and self.max_pixels <= self.DECODE_PIXELS and _decodes(self._pending)
        self._pending = []

    def known(self, count):
        """A `KnownImages` of the images added, or None: some header unreadable, or not `count` images added."""
        if self._pending:
            self._read()
        if self.unreadable or self.count != count or not count:
            return None
        return KnownImages(self.max_pixels, next(iter(self.sizes)) if len(self.sizes) == 1 else None, self.webp,
                           self.decoded)


def _header_weights():
    """[11, 32] float64: the header numbers every format keeps at fixed offsets, as weighted sums of its first 32
    bytes (one product, no branch per format)."""
    rows = []
    for offset, size, little_endian in [(20, 4, False), (16, 4, False),  # PNG height, width (IHDR)
                                        (8, 2, True), (6, 2, True),  # GIF
                                        (22, 4, True), (18, 4, True),  # BMP
                                        (28, 2, True), (26, 2, True),  # WebP lossy (VP8): 14 bits each
                                        (21, 4, True),  # WebP lossless (VP8L): width - 1, height - 1 packed
                                        (27, 3, True), (24, 3, True)]:  # WebP extended (VP8X): height - 1, width - 1
        row = [0.0] * 32
        for i in range(size):
            row[offset + i] = float(256 ** (i if little_endian else size - 1 - i))
        rows.append(row)
    return rows


_HEADER_WEIGHTS = _header_weights()


def header_shape(encoded):
    """(height, width) int64 that a JPEG, PNG, GIF, BMP or WebP header declares, read without decoding ((0, 0)
    else). One conditional (JPEG's size is not at a fixed offset); the other formats are read from one product."""
    head = tf.strings.join([tf.strings.substr(encoded, 0, 32), "\0" * 32])  # 64 bytes: no offset out of range.
    v = tf.cast(tf.linalg.matvec(tf.constant(_HEADER_WEIGHTS, tf.float64), tf.cast(
        tf.io.decode_raw(tf.strings.substr(head, 0, 32), tf.uint8), tf.float64)), tf.int64)
    bmp_height = tf.where(v[4] >= 2**31, 2**32 - v[4], v[4])  # Negative (two's complement) for top-down bitmaps.
    chunk = tf.strings.substr(head, 12, 4)
    webp = tf.where(tf.equal(chunk, b"VP8L"), tf.stack([v[8] // 2**14 % 2**14 + 1, v[8] % 2**14 + 1]),
                    tf.where(tf.equal(chunk, b"VP8X"), tf.stack([v[9] + 1, v[10] + 1]),
                             tf.stack([v[6] % 2**14, v[7] % 2**14])))
    candidates = tf.stack([tf.stack([v[0], v[1]]), tf.stack([v[2], v[3]]), tf.stack([bmp_height, v[5]]), webp,
                           tf.zeros([2], tf.int64)])
    kind = tf.argmax(tf.cast(tf.stack([
        tf.equal(tf.strings.substr(head, 0, 4), b"\x89PNG"), tf.equal(tf.strings.substr(head, 0, 3), b"GIF"),
        tf.equal(tf.strings.substr(head, 0, 2), b"BM"), is_webp(head), tf.constant(True)]), tf.int32))
    return tf.cond(tf.io.is_jpeg(encoded), lambda: tf.cast(tf.image.extract_jpeg_shape(encoded)[:2], tf.int64),
                   lambda: tf.gather(candidates, kind))


def decode_pixels(encoded, webp=True):
    """uint8 [H, W, 3] of an image in any format decode_image reads; `webp=False`: the bytes are known not WebP."""
    rgb = lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False)  # noqa: E731
    # decode_image cannot give 3 channels of an RGBA WebP.
    return tf.cond(is_webp(encoded), lambda: tf.io.decode_image(
        encoded, channels=0, expand_animations=False)[..., :3], rgb) if webp else rgb()


def is_webp(encoded):
    """True for WebP bytes (RIFF....WEBP), of any length."""
    head = tf.strings.join([tf.strings.substr(encoded, 0, 12), "\0" * 12])
    return tf.logical_and(tf.equal(tf.strings.substr(head, 0, 4), b"RIFF"),
                          tf.equal(tf.strings.substr(head, 8, 4), b"WEBP"))


@tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
def _headers(encoded):
    """(height, width) int64 [N, 2] and is WebP bool [N] of N images' bytes."""
    return tf.map_fn(lambda e: (header_shape(e), is_webp(e)), encoded,
                     fn_output_signature=(tf.TensorSpec([2], tf.int64), tf.TensorSpec([], tf.bool)))


@tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
def _decode_all(encoded):
    """Decodes N images' bytes (an error if one does not decode); the pixels' count, unused."""
    return tf.map_fn(lambda e: tf.size(decode_pixels(e)), encoded, fn_output_signature=tf.int32)


def _decodes(encoded):
    """Whether every one of these encoded images decodes."""
    try:
        _decode_all(tf.constant(encoded, tf.string))
    except tf.errors.OpError:
        return False
    return True
