"""What the trainer's tests share: running `python -m trainer.main`, training in-process, reading what a run left.

Imported as `import helpers` (pytest puts tests/ on sys.path).
"""

import csv
import glob
import os
import re
import subprocess
import sys
import threading

import gin
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS_PER_EPOCH = 15  # 300 training images (conftest's train_synthetic_dir), batch 20.
AUGMENT = ("AUGMENT = \"flip(0.5) | zoom(0.5, 1.5, fill='nearest') | channel_shuffle(1.0)"
           " | coarse_dropout(p=0.2, size_percent=0.02)\"")  # A binding: a few ops of each kind, seeded.


def decode_file(path, image_size, resize="bilinear"):
    """uint8 [S, S, 3]: an image file decoded as the pipeline decodes it (`Preprocessing.decode`)."""
    from trainer.data.preprocess import Preprocessing  # pylint: disable=import-outside-toplevel

    return Preprocessing(image_size, resize).decode(tf.io.read_file(path))


def env():
    """The environment of a subprocess: TensorFlow quiet, no GPU, conftest's cache directory."""
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")


def main_command(base_gin, model_dir, *bindings):
    """`python -m trainer.main` on `base_gin`; a binding starting with '--' is passed as it is (e.g. --gin_file)."""
    return [sys.executable, "-m", "trainer.main", f"--gin_file={base_gin}", f"--model_dir={model_dir}",
            *[b if b.startswith("--") else f"--gin_bindings={b}" for b in bindings]]


def one_line(error):
    """A UserError's message as `cli.run` prints it (without gin's "In call to configurable" lines)."""
    return str(error).split("\n  In call to configurable")[0]


def train_in_process(base_gin, model_dir, *bindings, **kwargs):
    """Parses `base_gin` plus `bindings` and runs `trainer.train.train()` in this process."""
    from trainer import config, train  # pylint: disable=import-outside-toplevel

    gin.clear_config()
    config.parse_gin([base_gin], list(bindings), model_dir=str(model_dir))
    return train.train(**kwargs)


def run_until(command, pattern=None, sig=None, timeout=300):
    """Runs `command`; sends `sig` as soon as a log line matches `pattern`. Returns (returncode, log).

    The signal follows a line the run has written, never a timer, so where it lands does not depend on speed.
    """
    proc = subprocess.Popen(command, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if pattern and sig and re.search(pattern, line):
                proc.send_signal(sig)
                pattern = None
        proc.wait()
    finally:
        watchdog.cancel()
    return proc.returncode, "".join(lines)


def event_files(run_dir, split):
    return sorted(glob.glob(os.path.join(str(run_dir), split, "events.out.tfevents.*")))


def read_events(path):
    acc = event_accumulator.EventAccumulator(path, size_guidance={"tensors": 0})
    acc.Reload()
    return acc


def scalars(path, tag):
    """[(step, value)] of one scalar tag in one event file."""
    acc = read_events(path)
    if tag not in acc.Tags()["tensors"]:
        return []
    return [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]


def checkpoint_step(path):
    return int(re.search(r"ckpt-(\d+)$", path).group(1))


def latest_step(model_dir):
    return checkpoint_step(tf.train.latest_checkpoint(os.path.join(str(model_dir), "checkpoints")))


def gin_header(gin_file):
    """The opening comment block of a gin file (relative to the repository), joined into one line."""
    lines = []
    with open(os.path.join(REPO, gin_file), encoding="utf-8") as f:
        for line in f:
            if not line.startswith("#"):
                break
            lines.append(line.lstrip("#").strip())
    return " ".join(lines)


def write_image_folder(tiny_dir, out, split_layout=True):
    """Rewrites a Tiny ImageNet layout as class folders: out/train/<wnid>/, out/val/<wnid>/, out/test/ (the same
    files, byte for byte) and words.txt, or with `split_layout=False` only out/<wnid>/ with the training images."""
    from trainer.data.sources.tiny_imagenet import TinyImageNet  # pylint: disable=import-outside-toplevel

    source = TinyImageNet(tiny_dir)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(tiny_dir, "words.txt"), "rb") as src, open(os.path.join(out, "words.txt"), "wb") as dst:
        dst.write(src.read())  # The class names, as image_folder reads them too.
    for split in ("train", "val", "test") if split_layout else ("train",):
        paths, labels = source.files(split)
        for i, path in enumerate(paths):
            folder = os.path.join(out, split) if split_layout else out
            if labels is not None:
                folder = os.path.join(folder, source.wnids[labels[i]])
            os.makedirs(folder, exist_ok=True)
            with open(path, "rb") as src, open(os.path.join(folder, os.path.basename(path)), "wb") as dst:
                dst.write(src.read())
    return out


def run(command, timeout=300):
    """Runs `command` to its end: (returncode, stderr)."""
    proc = subprocess.run(command, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          timeout=timeout, check=False)
    return proc.returncode, proc.stderr


# --- What a run left -----------------------------------------------------------------------------------------------

def csv_rows(model_dir):
    with open(os.path.join(str(model_dir), "metrics.csv"), encoding="utf-8") as f:
        return list(csv.DictReader(f))


def leftovers(model_dir):
    """Half-written things: checkpoint temps, partial exports, atomic-write temps."""
    found = []
    for pattern in ("checkpoints/*_temp*", "best/*_temp*", "partial.*", "previous.*", "*.tmp-*", "LOCK"):
        found += glob.glob(os.path.join(str(model_dir), pattern))
    return found


def weights(checkpoint):
    reader = tf.train.load_checkpoint(checkpoint)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map() if k.startswith("weights/")}


def latest(model_dir, sub="checkpoints"):
    return tf.train.latest_checkpoint(os.path.join(str(model_dir), sub))


def val_points(model_dir, tag="top1"):
    """[(step, value)] of a val scalar over every val event file of the run (in file order)."""
    points = []
    for path in sorted(glob.glob(os.path.join(str(model_dir), "val", "events.out.tfevents.*"))):
        try:
            for record in tf.data.TFRecordDataset(path):
                event = tf.compat.v1.Event.FromString(record.numpy())
                points += [(event.step, float(tf.make_ndarray(v.tensor))) for v in event.summary.value
                           if v.tag == tag]
        except tf.errors.DataLossError:
            pass
    return points
