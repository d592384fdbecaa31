"""trainer.predict: classifying image files with an export alone, and the SavedModel without `trainer`.

The export is test_export's trained small network (5 synthetic classes, 32 px),
made once per session.
"""

import csv
import io
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from test_export import exported_run  # test_export's run, made once for the session.

from trainer import predict
from trainer.data.sources.tiny_imagenet import TinyImageNet
from trainer.errors import UserError

pytestmark = pytest.mark.slow  # Trains or starts TensorFlow in subprocesses: CI runs these.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")


@pytest.fixture(scope="module")
def run_dir(made_once, tmp_path_factory, synthetic_dir):
    """A run's model directory holding export/ (test_export's trained small network)."""
    return exported_run(made_once, synthetic_dir, tmp_path_factory.mktemp("export_run"))


@pytest.fixture(scope="module")
def predictor(run_dir):
    return predict.Predictor(predict.find_export(run_dir))


def run_predict(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "trainer.predict", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300, check=False)


def val_image(synthetic_dir, index=0):
    return Image.open(TinyImageNet(synthetic_dir).files("val")[0][index]).convert("RGB")


def save(image, path, fmt, **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, fmt, **kwargs)
    return path


@pytest.fixture
def image_dir(tmp_path, synthetic_dir):
    """Every kind of input: JPEG, PNG, greyscale JPEG, CMYK JPEG, 17x23, 300x200 RGBA PNG; a corrupt file; hidden
    files and folders."""
    rgb = val_image(synthetic_dir)
    d = tmp_path / "images"
    files = {
        "rgb": save(rgb, str(d / "a.jpg"), "JPEG", quality=95),
        "png": save(rgb, str(d / "b.PNG"), "PNG"),
        "grey": save(rgb.convert("L"), str(d / "nested" / "c.JPEG"), "JPEG"),
        "cmyk": save(rgb.convert("CMYK"), str(d / "nested" / "deeper" / "d.jpeg"), "JPEG", quality=95),
        "small": save(rgb.resize((17, 23)), str(d / "e.jpg"), "JPEG"),
        "large": save(rgb.resize((300, 200)).convert("RGBA"), str(d / "f.png"), "PNG"),
    }
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (d / "notes.txt").write_text("not an image, not listed")
    (d / "._a.jpg").write_bytes(b"\0\5\26\7 macOS metadata, hidden: not listed")
    save(rgb, str(d / ".thumbnails" / "a.jpg"), "JPEG")  # A hidden folder: not searched.
    return d, files


def test_cmyk_and_greyscale_jpegs_decode_to_rgb(tmp_path, synthetic_dir):
    rgb = val_image(synthetic_dir)
    for mode in ("CMYK", "L"):
        path = save(rgb.convert(mode), str(tmp_path / f"{mode}.jpg"), "JPEG", quality=95)
        decoded = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False).numpy()
        expected = np.asarray(Image.open(path).convert("RGB"), np.float32)
        assert decoded.shape == (64, 64, 3)
        assert np.abs(decoded.astype(np.float32) - expected).mean() < 3  # Same colours (not inverted), up to IDCT.


def test_every_kind_of_image_and_a_corrupt_one(image_dir, run_dir, predictor, tmp_path):
    d, files = image_dir
    out_csv = tmp_path / "out.csv"
    result = run_predict(f"--model_dir={run_dir}", str(d), "--top_k=3", f"--output={out_csv}")
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(d / "corrupt.jpg") in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not re.search(r"\[Op:|name:|function_node", errors[0]), errors[0]  # The decode's words, no op suffix.
    lines = result.stdout.splitlines()
    assert sorted(line.split(": ")[0] for line in lines) == sorted(files.values())
    for line in lines:
        assert len(parse_text_line(line)[1]) == 3  # top 3: "name probability" each.

    rows = list(csv.DictReader(out_csv.open()))
    assert sorted(r["file"] for r in rows) == sorted(files.values())
    assert list(rows[0]) == ["file"] + [f"{f}_{i}" for i in (1, 2, 3) for f in ("wnid", "name", "probability")]
    expected, failures = predict.predict_files(predictor, list(files.values()), top_k=3)
    assert not failures
    by_file = {p.file: p for p in expected}
    for row in rows:
        p = by_file[row["file"]]
        assert [row[f"wnid_{i}"] for i in (1, 2, 3)] == p.wnids
        assert [row[f"name_{i}"] for i in (1, 2, 3)] == p.names
        np.testing.assert_allclose([float(row[f"probability_{i}"]) for i in (1, 2, 3)], p.probabilities, atol=1e-5)
        assert p.probabilities == sorted(p.probabilities, reverse=True) and sum(p.probabilities) <= 1 + 1e-5
    # The same picture through every format and colour model: the PNG is lossless, so it equals the 64 px source.
    assert by_file[files["png"]].wnids[0] == by_file[files["rgb"]].wnids[0] == by_file[files["cmyk"]].wnids[0]


def parse_text_line(line):
    """(file, [(name, probability)]) of a text line; names with spaces or commas are JSON strings."""
    token = r'("(?:[^"\\]|\\.)*"|[^\s",:]+)'
    file, rest = re.fullmatch(token + r": (.*)", line).groups()
    pairs = re.findall(token + r" (\d\.\d{4})", rest)
    assert ", ".join(f"{n} {p}" for n, p in pairs) == rest, line  # Nothing left over: the line is unambiguous.
    unquote = lambda text: json.loads(text) if text.startswith('"') else text  # noqa: E731
    return unquote(file), [(unquote(n), float(p)) for n, p in pairs]


def test_text_lines_quote_names_with_spaces_commas_or_quotes():
    prediction = predict.Prediction("my photos/a, b.jpg", ["n1", "n2", "n3"], ["tabby, tabby cat", 'say "cheese"',
                                                                             "disk"], [0.5, 0.25, 0.125])
    line = predict.format_prediction(prediction)
    assert line == '"my photos/a, b.jpg": "tabby, tabby cat" 0.5000, "say \\"cheese\\"" 0.2500, disk 0.1250'
    assert parse_text_line(line) == ("my photos/a, b.jpg", [("tabby, tabby cat", 0.5), ('say "cheese"', 0.25),
                                                            ("disk", 0.125)])


def test_output_formats_and_stdout(run_dir, image_dir, predictor, tmp_path):
    d, files = image_dir
    spaced = save(Image.open(files["rgb"]), str(d / "my cat.jpg"), "JPEG", quality=95)
    expected, _ = predict.predict_files(predictor, sorted([*files.values(), spaced]), top_k=2)
    by_file = {p.file: p for p in expected}
    # JSON on stdout: no file named '-' appears; the corrupt file is in "errors" (and on stderr).
    result = run_predict(f"--model_dir={run_dir}", str(d), "--top_k=2", "--output=-", "--format=json", cwd=tmp_path)
    assert result.returncode == 1 and not (tmp_path / "-").exists(), result.stderr
    out = json.loads(result.stdout)
    assert out["errors"] == [{"file": str(d / "corrupt.jpg"), "reason": out["errors"][0]["reason"]}]
    assert {p["file"]: [c["wnid"] for c in p["top_k"]] for p in out["predictions"]} == \
        {f: p.wnids for f, p in by_file.items()}
    # CSV on stdout.
    result = run_predict(f"--model_dir={run_dir}", str(d), "--top_k=2", "--format=csv")
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert {r["file"]: [r["wnid_1"], r["wnid_2"]] for r in rows} == {f: p.wnids for f, p in by_file.items()}
    # --output=FILE.json: JSON in the file (its suffix), the text lines on stdout, the spaced name quoted.
    result = run_predict(f"--model_dir={run_dir}", str(d), "--top_k=2", f"--output={tmp_path / 'out.json'}")
    assert len(json.loads((tmp_path / "out.json").read_text())["predictions"]) == len(by_file)
    parsed = dict(parse_text_line(line) for line in result.stdout.splitlines())
    assert f'"{spaced}": ' in result.stdout and [n for n, _ in parsed[spaced]] == by_file[spaced].names


@pytest.mark.parametrize("flags_invalid", [True, False], ids=["signature-flags", "older-export-checks-first"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_bad_files_fail_alone_in_process(predictor, image_dir, monkeypatch, flags_invalid, batch_size):
    d, files = image_dir
    assert predictor.flags_invalid  # This export's signature flags an undecodable image's row.
    monkeypatch.setattr(predictor, "flags_invalid", flags_invalid)  # False: as with an export from before it did.
    paths = [str(d / "corrupt.jpg"), files["rgb"], str(d / "missing.jpg"), files["png"]]
    images, problems = predict.list_images(paths)
    assert problems == [(str(d / "missing.jpg"), "no such file or directory")]
    predictions, failures = predict.predict_files(predictor, images, top_k=2, batch_size=batch_size)
    assert [p.file for p in predictions] == [files["rgb"], files["png"]]
    assert [f for f, _ in failures] == [str(d / "corrupt.jpg")]
    assert "Op:" not in failures[0][1] and failures[0][1]
    assert failures[0][1] != "the export's signature could not prepare it"  # The decode's own reason.


def test_test_split_file(run_dir, synthetic_dir, tmp_path):
    result = run_predict(f"--model_dir={run_dir}", "--split=test", f"--data_dir={synthetic_dir}")
    assert result.returncode == 0, result.stderr
    path = os.path.join(run_dir, predict.SPLIT_PREDICTIONS.format(split="test"))
    assert path in result.stdout
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    dataset = TinyImageNet(synthetic_dir)
    test_files = dataset.files("test")[0]
    assert len(lines) == len(test_files) == 12
    assert [line.split(" ")[0] for line in lines] == sorted(os.path.basename(p) for p in test_files)
    assert all(len(line.split(" ")) == 2 and line.split(" ")[1] in dataset.wnids for line in lines)


def test_savedmodel_alone_agrees_with_predict(run_dir, synthetic_dir, predictor, tmp_path):
    """A fresh process that never imports `trainer` gets predict's top-1 for every val image from raw JPEG bytes;
    undecodable images in the same call (garbage, a truncated JPEG) are flagged, the others answered; a call with
    no image answers with no rows."""
    val_files = TinyImageNet(synthetic_dir).files("val")[0]
    script = textwrap.dedent(f"""
        import json, sys
        import tensorflow as tf
        serve = tf.saved_model.load({os.path.join(run_dir, 'export', 'saved_model')!r}).signatures['serving_default']
        files = {val_files!r}
        images = [open(f, 'rb').read() for f in files]
        bad = [b'not an image', images[0][:200]]
        out = serve(images=tf.constant(images[:1] + bad[:1] + images[1:] + bad[1:]))
        valid = out['valid'].numpy().tolist()
        assert valid == [True, False] + [True] * (len(files) - 1) + [False], valid
        rows = [0] + list(range(2, len(files) + 1))
        for i in (1, len(files) + 1):
            assert out['probabilities'].numpy()[i].max() == 0 and out['top_k_indices'].numpy()[i].max() == -1
            assert set(out['top_k_names'].numpy()[i].tolist()) == {{b''}}
        empty = serve(images=tf.constant([], tf.string))  # A call with no image: every output has 0 rows.
        assert {{k: tuple(v.shape)[0] for k, v in empty.items()}} == {{k: 0 for k in out}}, empty
        assert 'trainer' not in sys.modules, sorted(m for m in sys.modules if m.startswith('trainer'))
        print(json.dumps({{f: out['top_k_wnids'].numpy()[r, 0].decode() for f, r in zip(files, rows)}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=ENV, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    alone = json.loads(result.stdout.strip().splitlines()[-1])
    predictions, failures = predict.predict_files(predictor, val_files, top_k=1, batch_size=7)
    assert not failures and len(val_files) == 50
    assert {p.file: p.wnids[0] for p in predictions} == alone


def test_missing_export_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"No export in .*python -m trainer.export --model_dir="):
        predict.find_export(str(tmp_path))


def test_predict_empty_batch_and_top_k_above_classes(predictor, image_dir):
    _, files = image_dir
    assert predictor.probabilities([]).shape == (0, 5)
    [p], _ = predict.predict_files(predictor, [files["rgb"]], top_k=50)
    assert len(p.wnids) == 5 and sum(p.probabilities) == pytest.approx(1, abs=1e-5)


def test_image_bytes_from_memory(predictor):
    buffer = io.BytesIO()
    Image.new("RGB", (40, 10), (10, 200, 30)).save(buffer, "JPEG")
    assert predictor.probabilities([buffer.getvalue()] * 3).shape == (3, 5)
