"""One preparation of an image for every path: training, evaluation, predict and the export's serving function.

For the same bytes, the training pipeline (no augmentation), the evaluation pipeline, the evaluator's scoring
and the exported SavedModel (what `trainer.predict` calls) feed the network identical tensors.
"""

import io
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from trainer import export
from trainer import predict
from trainer.data import pipeline
from trainer.data.preprocess import ImageSurvey, KnownImages, Preprocessing, header_shape
from trainer.data.sources import FileSource
from trainer.errors import UserError
from trainer.evaluation import evaluator

SIZE = 8


def _images(directory):
    """Files of every kind decode reads: colour and greyscale JPEG, RGBA PNG, GIF, BMP, CMYK JPEG, RGBA WebP, large and
    non-square, and one at the network's size (not resized)."""
    rng = np.random.default_rng(0)
    made = []
    for i, (fmt, mode, size) in enumerate([("JPEG", "RGB", (40, 30)), ("JPEG", "L", (16, 16)),
                                           ("PNG", "RGBA", (9, 21)), ("GIF", "P", (12, 12)),
                                           ("BMP", "RGB", (64, 48)), ("JPEG", "CMYK", (20, 20)),
                                           ("WEBP", "RGBA", (13, 11)),
                                           ("PNG", "RGB", (SIZE, SIZE))]):
        pixels = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
        image = Image.fromarray(pixels, "RGBA").convert(mode)
        path = os.path.join(directory, f"img_{i}.{fmt.lower()}")
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        with open(path, "wb") as f:
            f.write(buffer.getvalue())
        made.append(path)
    return made


class Listed(FileSource):
    kind, splits, class_ids, class_names = "listed", ("train", "val"), ["a", "b"], ["A", "B"]

    def __init__(self, location, paths):
        super().__init__()
        self.location, self._paths = location, paths

    def _list(self, split):
        return self._paths, [i % 2 for i in range(len(self._paths))]


def _flatten_model():
    """'Logits' that are the input pixels themselves: the served probabilities are softmax(input)."""
    inputs = keras.Input((SIZE, SIZE, 3))
    return keras.Model(inputs, keras.layers.Flatten()(inputs))


@pytest.mark.parametrize("preprocess", [Preprocessing(SIZE), Preprocessing(SIZE, "nearest", crop="center"),
                                        Preprocessing(SIZE, "area", (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))],
                         ids=["bilinear", "nearest-center", "area-standardised"])
def test_the_four_paths_prepare_identical_tensors(tmp_path, preprocess):
    paths = _images(str(tmp_path))
    n = len(paths)
    data = pipeline.Data(Listed(str(tmp_path), paths), preprocess, batch_size=n, deterministic=True)
    direct = np.stack([preprocess(tf.io.read_file(p)).numpy() for p in paths])
    assert direct.shape == (n, SIZE, SIZE, 3) and np.isfinite(direct).all()

    [(evaluated, _)] = list(data.eval("val"))  # 1. The per-epoch evaluation.
    np.testing.assert_array_equal(evaluated.numpy(), direct)
    [(scored, index)] = list(evaluator._scoring_dataset(data, "val"))  # 2. The evaluator's scoring.
    np.testing.assert_array_equal(scored.numpy()[np.argsort(index.numpy())], direct)
    trained, labels = next(iter(data.train()))  # 3. Training (no augmentation), in any order.
    order = [int(np.argmin(np.abs(direct - image).sum(axis=(1, 2, 3)))) for image in trained.numpy()]
    assert sorted(order) == list(range(n))
    np.testing.assert_array_equal(trained.numpy(), direct[order])

    # 4. The export's serving function, reloaded from disk as `trainer.predict` loads it.
    export.export_model(_flatten_model(), preprocess, ["a"] * SIZE * SIZE * 3, ["A"] * SIZE * SIZE * 3,
                        str(tmp_path / "export"))
    predictor = predict.Predictor(str(tmp_path / "export"))
    served = predictor.probabilities([open(p, "rb").read() for p in paths])
    expected = tf.nn.softmax(tf.reshape(tf.constant(direct), [n, -1])).numpy()
    if preprocess.mean is None:
        np.testing.assert_array_equal(served, expected)
    else:  # The SavedModel's graph optimiser rewrites (x - mean) / std: at most an ulp or two apart.
        np.testing.assert_allclose(served, expected, rtol=2e-6, atol=0)  # A pixel off by one moves it by 1e-2.


def test_crop_center_keeps_the_middle_and_stretch_the_whole(tmp_path):
    pixels = np.zeros((10, 30, 3), np.uint8)
    pixels[:, 10:20] = 255  # A white square in the middle of a wide black image.
    encoded = tf.io.encode_png(pixels)
    assert Preprocessing(10, crop="center").decode(encoded).numpy().min() == 255
    stretched = Preprocessing(10).decode(encoded).numpy()
    assert stretched[:, 0].max() < 50 and stretched[:, 5].min() > 200


@pytest.mark.parametrize("kwargs, message", [
    (dict(image_size=4), r"IMAGE_SIZE .* integer in \[8, 1024\], got 4"),
    (dict(image_size=32, resize="lanczos9"), r"resize must be one of bilinear, nearest, bicubic, area"),
    (dict(image_size=32, crop="middle"), r"crop must be one of stretch, center, got 'middle'"),
    (dict(image_size=32, mean=(0.5, 0.5, 0.5)), r"mean and std must both be None or both 3 numbers"),
])
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        Preprocessing(**kwargs)


def test_settings_round_trip_through_json():
    prep = Preprocessing(24, "nearest", (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "center")
    assert Preprocessing.from_json(prep.to_json()) == prep


def test_an_image_declaring_too_many_pixels_is_refused_before_decoding(tmp_path):
    """A PNG that declares 20000 x 20000 pixels (1.2 GB decoded) in a few hundred bytes: refused from its header."""
    import zlib

    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    side = 20000
    header = side.to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + \
        chunk(b"IEND", b"")
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"declares 20000 x 20000 pixels, more than "
                                                             r"trainer.data.max_pixels = 89478485"):
        Preprocessing(SIZE).decode(tf.constant(bomb))
    # In training it is skipped and counted, as any unusable image; predict names it and classifies the rest.
    paths = _images(str(tmp_path))
    with open(tmp_path / "bomb.png", "wb") as f:
        f.write(bomb)
    data = pipeline.Data(Listed(str(tmp_path), paths + [str(tmp_path / "bomb.png")]), Preprocessing(SIZE), 4)
    counter = tf.Variable(0, dtype=tf.int64)
    next(iter(data.train(decoded_counter=counter)))
    assert int(counter.numpy()) == len(paths)
    export.export_model(_flatten_model(), Preprocessing(SIZE), ["a"] * SIZE * SIZE * 3, ["A"] * SIZE * SIZE * 3,
                        str(tmp_path / "export"))
    predictions, failures = predict.predict_files(predict.Predictor(str(tmp_path / "export")),
                                                  [paths[0], str(tmp_path / "bomb.png")])
    assert len(predictions) == 1 and failures[0][0].endswith("bomb.png") and "max_pixels" in failures[0][1]


def _webp(size, mode="RGB", **options):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 4), np.uint8), "RGBA").convert(
        mode).save(buffer, "WEBP", **options)
    return buffer.getvalue()


@pytest.mark.parametrize("options, mode, chunk", [({}, "RGB", b"VP8 "), ({"lossless": True}, "RGB", b"VP8L"),
                                                  ({}, "RGBA", b"VP8X"), ({"lossless": True}, "RGBA", b"VP8L")])
def test_webp_headers_are_read_and_every_kind_decodes_to_rgb(options, mode, chunk):
    encoded = _webp((301, 17), mode, **options)
    assert encoded[12:16] == chunk
    assert header_shape(tf.constant(encoded)).numpy().tolist() == [17, 301]
    expected = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
    decoded = Preprocessing(SIZE, max_pixels=301 * 17).decode(tf.constant(encoded))  # Exactly at the limit.
    assert decoded.shape == (SIZE, SIZE, 3)
    native = tf.io.decode_image(encoded, channels=0, expand_animations=False).numpy()[..., :3]
    np.testing.assert_array_equal(native, expected)  # RGBA: the colour channels as Pillow reads them.


def test_a_webp_declaring_too_many_pixels_is_refused_before_decoding():
    encoded = bytearray(_webp((20, 10), lossless=True))
    side = 16383  # VP8L packs width - 1 and height - 1 in 14 bits each, from byte 21.
    encoded[21:25] = ((side - 1) | (side - 1) << 14).to_bytes(4, "little")
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"declares 16383 x 16383 pixels, more than "):
        Preprocessing(SIZE).decode(tf.constant(bytes(encoded)))



def test_header_shape_of_every_format_short_input_and_a_top_down_bmp(tmp_path):
    for path in _images(str(tmp_path)):
        with open(path, "rb") as f:
            encoded = f.read()
        width, height = Image.open(io.BytesIO(encoded)).size
        assert header_shape(tf.constant(encoded)).numpy().tolist() == [height, width], path
    bmp = bytearray(open(_images(str(tmp_path))[4], "rb").read())
    bmp[22:26] = (2**32 - 48).to_bytes(4, "little")  # Height -48: rows stored top-down.
    assert header_shape(tf.constant(bytes(bmp))).numpy().tolist() == [48, 64]
    for short in (b"", b"BM", b"\x89PNG", b"RIFF0000WEBP", b"not an image at all"):
        assert header_shape(tf.constant(short)).numpy().tolist() == [0, 0], short
    with pytest.raises(tf.errors.InvalidArgumentError, match="Incomplete bmp content"):
        Preprocessing(SIZE).decode(tf.constant(b"BM"))  # Too short for its header: decode's own message.


def _survey(images):
    survey = ImageSurvey()
    for encoded in images:
        survey.add(encoded)
    return survey.known(len(images))


def _ops(decode):
    """The op types of `decode` traced on a scalar string (its conditionals' branches too)."""
    graph = tf.function(decode, input_signature=[tf.TensorSpec([], tf.string)]).get_concrete_function().graph
    definition = graph.as_graph_def()
    return {node.op for node in definition.node} | {
        node.op for function in definition.library.function for node in function.node_def}


@pytest.mark.parametrize("preprocess", [Preprocessing(SIZE), Preprocessing(SIZE, "nearest", crop="center")],
                         ids=["bilinear", "nearest-center"])
def test_what_is_known_of_the_images_leaves_their_pixels_as_they_are(tmp_path, preprocess):
    """The decode a TFRecord index allows (no pixel check, no WebP branch, no resize) gives the same tensors."""
    images = [open(p, "rb").read() for p in _images(str(tmp_path))]
    native = [tf.io.encode_png(np.random.default_rng(i).integers(0, 256, (SIZE, SIZE, 3), np.uint8)).numpy()
              for i in range(3)] + [tf.io.encode_jpeg(np.full((SIZE, SIZE, 1), 9, np.uint8)).numpy()]
    for group in (images, images[:6], native):
        known = _survey(group)
        for encoded in group:
            np.testing.assert_array_equal(preprocess.decode(tf.constant(encoded), known=known).numpy(),
                                          preprocess.decode(tf.constant(encoded)).numpy())
    assert _survey(images) == KnownImages(64 * 48, None, True, decoded=True)
    assert _survey(images[:6]) == KnownImages(64 * 48, None, False, decoded=True)
    assert _survey(native) == KnownImages(SIZE * SIZE, (SIZE, SIZE), False, decoded=True)
    assert KnownImages.from_json(_survey(native).to_json()) == _survey(native)
    known = _survey(native)
    full, bare = _ops(preprocess.decode), _ops(lambda e: preprocess.decode(e, known=known))
    assert {"ExtractJpegShape", "Assert"} <= full and full & {"If", "StatelessIf"}, full
    assert not bare & {"ExtractJpegShape", "If", "StatelessIf", "Assert", "ResizeBilinear", "MatMul"}, bare
    # All at the network's size, by the index: another size is then an error (skipped, as a corrupt image).
    with pytest.raises(tf.errors.InvalidArgumentError):
        preprocess.decode(tf.constant(images[0]), known=known)


def test_the_pixel_check_stays_unless_every_image_is_within_the_limit(tmp_path):
    images = [open(p, "rb").read() for p in _images(str(tmp_path))][:6]
    known = _survey(images)  # The largest: the 64 x 48 BMP.
    with pytest.raises(tf.errors.InvalidArgumentError, match="declares 48 x 64 pixels, more than"):
        Preprocessing(SIZE, max_pixels=64 * 48 - 1).decode(tf.constant(images[4]), known=known)
    assert "ExtractJpegShape" not in _ops(lambda e: Preprocessing(SIZE, max_pixels=64 * 48).decode(e, known=known))
    corrupt = images[0][:20] + b"\0" * 20  # A JPEG whose header cannot be read: nothing is assumed.
    assert _survey(images + [corrupt]) is None
    assert _survey(images[:2] + images) is not None and ImageSurvey().known(0) is None
    survey = ImageSurvey()
    survey.add(images[0])
    assert survey.known(2) is None  # Fewer images than the split holds.


def test_a_batch_decodes_as_each_image_does_and_the_survey_says_when_it_may(tmp_path):
    """decode_batch gives decode's tensors; the survey vouches only for images it decoded (small ones, all good)."""
    images = [open(p, "rb").read() for p in _images(str(tmp_path))]
    for preprocess in (Preprocessing(SIZE), Preprocessing(SIZE, "nearest", crop="center")):
        batch = preprocess.decode_batch(tf.constant(images), known=_survey(images)).numpy()
        for encoded, decoded in zip(images, batch):
            np.testing.assert_array_equal(decoded, preprocess.decode(tf.constant(encoded)).numpy())
    jpeg = tf.io.encode_jpeg(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).numpy()
    cut = jpeg[:len(jpeg) // 2]  # Its header reads (64 x 64); its pixels do not decode.
    known = _survey(images + [cut])
    assert known is not None and known.size is None and not known.decoded
    with pytest.raises(tf.errors.InvalidArgumentError):  # One image fails its whole batch: hence the survey.
        Preprocessing(SIZE).decode_batch(tf.constant([jpeg, cut]))
    large = tf.io.encode_png(np.zeros((600, 500, 3), np.uint8)).numpy()  # Above DECODE_PIXELS: not decoded.
    assert ImageSurvey.DECODE_PIXELS < 600 * 500 and not _survey(images + [large]).decoded
    assert KnownImages.from_json({"max_pixels": 1, "size": None, "webp": False}).decoded is False  # Older index.
