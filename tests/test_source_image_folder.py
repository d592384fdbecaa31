"""The class-folder source: both layouts, names, the pinned validation split, and every bad layout in one line."""

import json
import os
import re
import shutil
import subprocess

import helpers
import pytest
import tensorflow as tf

from trainer.data import pipeline
from trainer.data.preprocess import Preprocessing
from trainer.data.sources import DatasetNotFoundError
from trainer.data.sources.image_folder import ImageFolder, image_folder
from trainer.data.sources.tiny_imagenet import TinyImageNet
from trainer.errors import UserError


@pytest.fixture(scope="module")
def folders(synthetic_dir, tmp_path_factory):
    return helpers.write_image_folder(synthetic_dir, str(tmp_path_factory.mktemp("folders") / "photos"))


def test_split_layout_holds_the_same_images_as_tiny_imagenet(folders, synthetic_dir):
    tiny, source = TinyImageNet(synthetic_dir), ImageFolder(folders)
    assert source.class_ids == tiny.wnids and source.class_names == tiny.class_names  # From words.txt.
    assert source.splits == ("train", "val", "test")
    for split in source.splits:
        assert source.count(split) == tiny.count(split)
    by_name = {os.path.basename(i): label for i, label in zip(*source.listing("val"))}
    assert by_name == {os.path.basename(i): label for i, label in zip(*tiny.listing("val"))}
    assert source.listing("test")[1] == [-1] * tiny.count("test")
    assert source.describe() == {"kind": "image_folder", "location": folders, "layout": "train/ and val/",
                                 "module": "trainer.data.sources.image_folder"}


def test_names_file_nested_folders_any_extension_and_other_files(folders, tmp_path, caplog):
    root = tmp_path / "photos"
    shutil.copytree(folders, root)
    first = sorted(os.listdir(root / "train"))[0]
    (root / "classes.txt").write_text("".join(f"{c}\tname of {c}\n" for c in sorted(os.listdir(root / "train"))))
    nested = root / "train" / first / "deeper" / "still"
    nested.mkdir(parents=True)
    png = tf.io.encode_png(tf.zeros([20, 30, 3], tf.uint8)).numpy()
    (nested / "extra.PNG").write_bytes(png)
    (root / "train" / first / "notes.txt").write_text("not an image")
    # Hidden files and folders are left out without a word: a Finder's .DS_Store, macOS's '._' metadata twin of a
    # photo (named like a JPEG, not one), a notebook's checkpoints.
    (root / "train" / first / ".DS_Store").write_bytes(b"\0\1Bud1")
    (root / "train" / first / "._extra.jpg").write_bytes(b"\0\5\26\7 AppleDouble")
    (root / "train" / first / ".ipynb_checkpoints").mkdir()
    (root / "train" / first / ".ipynb_checkpoints" / "copy.png").write_bytes(png)
    (root / "val" / ".ipynb_checkpoints").mkdir()  # Not a class of val/ that train/ lacks.
    caplog.set_level("WARNING", logger="absl")
    source = ImageFolder(str(root))
    assert source.class_names[0] == f"name of {first}"  # classes.txt before words.txt.
    os.remove(root / "classes.txt")
    os.remove(root / "words.txt")
    assert ImageFolder(str(root)).class_names[0] == first  # No names file: the folder names.
    assert source.count("train") == 201 and f"train/{first}/deeper/still/extra.PNG" in source.listing("train")[0]
    assert "Ignored 1 file that is not a jpg/jpeg/png/gif/bmp/webp image under" in caplog.text
    assert "notes.txt" in caplog.text and "DS_Store" not in caplog.text
    assert not any("/." in path for path in source.listing("train")[0])
    data = pipeline.Data(source, Preprocessing(16), batch_size=201, deterministic=True)
    [(images, labels)] = list(data.eval("train"))
    assert images.shape == (201, 16, 16, 3) and labels.numpy().sum() == 201


def test_single_folder_layout_holds_out_a_seeded_stratified_share_pinned_in_the_model_dir(synthetic_dir, tmp_path):
    root = helpers.write_image_folder(synthetic_dir, str(tmp_path / "flat"), split_layout=False)
    source = image_folder(root, val_fraction=0.25, split_seed=3)
    assert source.splits == ("train", "val") and source.count("val") == 50 and source.count("train") == 150
    val_ids, val_labels = source.listing("val")
    assert sorted(val_labels.count(c) for c in range(5)) == [10] * 5  # Stratified: 10 of each class's 40.
    assert source.listing("val")[0] == image_folder(root, 0.25, 3).listing("val")[0]  # Seeded.
    assert set(image_folder(root, 0.25, 4).listing("val")[0]) != set(val_ids)
    assert not set(val_ids) & set(source.listing("train")[0])

    model_dir = str(tmp_path / "run")
    source.pin(model_dir)
    saved = json.loads(open(os.path.join(model_dir, "val_split.json"), encoding="utf-8").read())
    assert saved["val"] == sorted(val_ids) and saved["split_seed"] == 3
    # A resumed run with another seed (or new files) still validates on the pinned images.
    again = image_folder(root, val_fraction=0.25, split_seed=99)
    again.pin(model_dir)
    assert sorted(again.listing("val")[0]) == sorted(val_ids)
    with open(os.path.join(model_dir, "val_split.json"), "w", encoding="utf-8") as f:
        f.write('{"val": 3')
    with pytest.raises(UserError, match=r"Cannot read the validation split .*val_split.json .*damaged. Move it "
                                        r"aside"):
        image_folder(root, 0.25, 3).pin(model_dir)


def _tree(tmp_path, files):
    root = tmp_path / "data"
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content)
    return str(root)


JPEG = tf.io.encode_jpeg(tf.zeros([8, 8, 3], tf.uint8)).numpy()


@pytest.mark.parametrize("files, error, message", [
    ({"train/cat/a.jpg": JPEG, "train/dog": None, "val/cat/b.jpg": JPEG}, UserError,
     r"The class folder '.*train/dog' holds no image \(.jpg, .jpeg, .png, .gif, .bmp, .webp, any case\): add images or "
     r"remove the folder."),
    ({"train/cat/a.jpg": JPEG, "train/dog/b.jpg": JPEG, "train/c.jpg": JPEG, "val/cat/d.jpg": JPEG}, UserError,
     r"'.*train' holds images directly \(c.jpg\), outside any class folder: move each into train/<class>/."),
    ({"train/cat/a.jpg": JPEG, "train/dog/b.jpg": JPEG, "val/cow/c.jpg": JPEG}, UserError,
     r"'.*data/val' has class folders that train/ does not \(cow\): a class with no training image cannot be learned."),
    ({"train/cat/a.jpg": JPEG, "train/dog/b.jpg": JPEG}, DatasetNotFoundError,
     r"has train/ but no val/ folder. Expected a folder per class"),
    ({"cat/a.jpg": JPEG}, UserError, r"holds one class folder \(cat\): a classifier needs at least two."),
    ({"readme.md": b"hello"}, DatasetNotFoundError, r"No class folders in '.*data'. Expected a folder per class"),
])
def test_bad_layouts_are_one_line_errors(tmp_path, files, error, message):
    with pytest.raises(error, match=message) as caught:
        ImageFolder(_tree(tmp_path, files))
    assert "\n" not in str(caught.value)


def test_a_tiny_imagenet_directory_is_named_as_such(synthetic_dir, tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"does not exist"):
        image_folder(str(tmp_path / "nothing"))
    with pytest.raises(UserError, match=r"val_fraction must be a number in \(0, 1\), got 1.5"):
        image_folder(synthetic_dir, val_fraction=1.5)
    with pytest.raises(DatasetNotFoundError, match=r"is not a folder per class. It holds the tiny_imagenet layout "
                                                   r"instead: include gin/data/tiny_imagenet.gin"):
        image_folder(synthetic_dir)
    flat = _tree(tmp_path, {"cat/a.jpg": JPEG, "dog/b.jpg": JPEG})
    with pytest.raises(DatasetNotFoundError, match=r"It holds the image_folder layout instead: include "
                                                   r"gin/data/image_folder.gin"):
        TinyImageNet(flat)


def test_names_that_are_not_utf8_are_skipped_and_named(tmp_path, caplog):
    root = _tree(tmp_path, {"cat/a.jpg": JPEG, "dog/b.jpg": JPEG})
    with open(os.path.join(os.fsencode(root), b"cat", b"caf\xe9.jpg"), "wb") as f:  # Latin-1, not UTF-8.
        f.write(JPEG)
    os.symlink(os.path.join(root, "cat"), os.path.join(root, "cat", "loop"))  # A cycle: read once.
    caplog.set_level("WARNING", logger="absl")
    source = ImageFolder(root, val_fraction=0.5)
    assert source.count("train") + source.count("val") == 2
    assert r"Skipped 1 names in" in caplog.text and r"caf\xe9.jpg" in caplog.text


@pytest.mark.parametrize("layout, data_gin, message", [
    ("empty class", "image_folder", r"error: The class folder '.*train/dog' holds no image \(.jpg, .jpeg, .png, "
                                    r".gif, .bmp, .webp, any case\): add images or remove the folder."),
    ("tiny imagenet", "image_folder", r"error: .* is not a folder per class. It holds the tiny_imagenet layout "
                                      r"instead: include gin/data/tiny_imagenet.gin after the runnable gin file .*"),
    ("class folders", "tfrecord", r"error: No TFRecord dataset at .*: it has no index.json. .* It holds the "
                                  r"image_folder layout instead: include gin/data/image_folder.gin after .*"),
])
def test_a_bad_layout_stops_the_trainer_in_one_line_before_writing_anything(synthetic_dir, tmp_path, layout,
                                                                             data_gin, message):
    data_dir = {"empty class": lambda: _tree(tmp_path, {"train/cat/a.jpg": JPEG, "train/dog": None,
                                                        "val/cat/b.jpg": JPEG}),
                "tiny imagenet": lambda: synthetic_dir,
                "class folders": lambda: _tree(tmp_path, {"cat/a.jpg": JPEG, "dog/b.jpg": JPEG})}[layout]()
    model_dir = tmp_path / "run"
    command = [*helpers.main_command("gin/quickstart.gin", model_dir, f"--gin_file=gin/data/{data_gin}.gin",
                                     f"DATA_DIR = '{data_dir}'")]
    proc = subprocess.run(command, cwd=helpers.REPO, env=helpers.env(), capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and re.fullmatch(message, lines[0]), proc.stderr
    assert not model_dir.exists()  # Refused before the run directory is made.


def test_evaluating_a_run_uses_its_pinned_split_even_after_files_were_added(synthetic_dir, tmp_path, monkeypatch):
    """`trainer.evaluate` hands its own Data to evaluate_model_dir, which pinned the split only when given none:
    files added after training then moved training images into the evaluated val split."""
    from trainer import checkpoints
    from trainer.evaluation import evaluator

    root = helpers.write_image_folder(synthetic_dir, str(tmp_path / "flat"), split_layout=False)
    model_dir = str(tmp_path / "run")
    image_folder(root, 0.25, 3).pin(model_dir)  # As the training run left it.
    first = sorted(os.listdir(root))[0]
    for i in range(10):  # Added since: they shift the seeded draw.
        shutil.copy(os.path.join(root, first, sorted(os.listdir(os.path.join(root, first)))[0]),
                    os.path.join(root, first, f"added_{i}.JPEG"))
    seen = {}
    monkeypatch.setattr(checkpoints, "find_checkpoint", lambda *args: "ckpt")
    monkeypatch.setattr(evaluator, "evaluate_checkpoint",
                        lambda model, path, data, split, *args, **kwargs: seen.update(val=data.source.listing("val")))
    data = pipeline.Data(image_folder(root, 0.25, 3), Preprocessing(16), batch_size=10, deterministic=True)
    evaluator.evaluate_model_dir(model_dir, "best", "val", data=data)
    saved = json.loads(open(os.path.join(model_dir, "val_split.json"), encoding="utf-8").read())
    assert sorted(seen["val"][0]) == saved["val"] and len(saved["val"]) == 50


def test_the_data_check_decodes_as_training_does_rgba_webp_included(folders, tmp_path):
    """The scan counted an RGBA WebP as undecodable (`decode_image` cannot give it 3 channels), though training
    decodes it: the data check then said it was skipped."""
    import io

    import numpy as np
    from PIL import Image

    from trainer.data import scan

    root = tmp_path / "photos"
    shutil.copytree(folders, root)
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 4), 200, np.uint8), "RGBA").save(buffer, "WEBP", lossless=True)
    first = sorted(os.listdir(root / "val"))[0]
    (root / "val" / first / "rgba.webp").write_bytes(buffer.getvalue())
    report = scan.scan(ImageFolder(str(root)), use_cache=False)
    assert report["splits"]["val"]["unreadable"] == [] and report["splits"]["val"]["images"] == 51
    assert report["val_per_class"][first] == 11
