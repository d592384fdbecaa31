"""What a run reports: TensorBoard, the CSV log, console progress, the banner and the end summary."""

import csv
import io
import os
import sys

import tensorflow as tf
from absl import logging

from trainer import run_dir


class Writers:
    """TensorBoard writers for model_dir/train and model_dir/val (no-ops on workers other than the chief)."""

    def __init__(self, log_dir, chief):
        self._writers = {k: tf.summary.create_file_writer(os.path.join(log_dir, k)) if chief
                         else tf.summary.create_noop_writer() for k in ("train", "val")}

    def scalars(self, split, step, values):
        with self._writers[split].as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(name, value)

    def text(self, split, step, name, text):
        with self._writers[split].as_default(step=step):
            tf.summary.text(name, text)

    def image(self, split, step, name, grid):
        with self._writers[split].as_default(step=step):
            tf.summary.image(name, grid[None], max_outputs=1)

    def flush(self):
        for w in self._writers.values():
            w.flush()


def markdown_code(text):
    """`text` as a markdown code block (TensorBoard's text dashboard renders markdown)."""
    return "\n".join("    " + line for line in text.splitlines())


class CsvLog:
    """model_dir/metrics.csv: one row of metrics per epoch (as the reference's CSVLogger)."""

    def __init__(self, path):
        self.path = path

    def write(self, rows):
        """Rewrites the whole file from `rows` (a list of dicts), atomically: a crash never leaves half a file."""
        if not rows:
            return
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()})
        run_dir.write_text(self.path, out.getvalue())


class Progress:
    """The console line of an epoch: `epoch 3/10 step 20/46 ...`, a bar on a terminal, log lines otherwise."""

    def __init__(self, epoch, epochs, steps, batch_size, log_every_steps):
        self.epoch, self.epochs, self.steps = epoch, epochs, steps
        self.batch_size, self.log_every = batch_size, log_every_steps
        self.tty = sys.stdout.isatty()
        self.last_logged = 0

    def update(self, done, means, images_per_second):
        """`images_per_second` of the last execution (None while it included compilation)."""
        speed, eta = "compiling", ""
        if images_per_second:
            speed = f"{images_per_second:.0f} img/s"
            eta = f" ETA {(self.steps - done) * self.batch_size / images_per_second:.0f}s"
        text = (f"epoch {self.epoch}/{self.epochs} step {done}/{self.steps} loss {means['loss']:.4f} "
                f"top1 {means['top1']:.4f} {speed}{eta}")
        if self.tty:
            width = 30
            bar = "=" * int(width * done / self.steps)
            sys.stdout.write(f"\r[{bar:<{width}}] {text}\x1b[K")
            sys.stdout.flush()
        elif done - self.last_logged >= self.log_every or done == self.steps:
            self.last_logged = done
            logging.info("%s", text)

    def finish(self, train_means, val_means, seconds):
        if self.tty:
            sys.stdout.write("\n")
        logging.info("epoch %d/%d done in %.1fs: train loss %.4f top1 %.4f | val loss %.4f top1 %.4f top5 %.4f "
                     "(%d images)", self.epoch, self.epochs, seconds, train_means["loss"], train_means["top1"],
                     val_means["loss"], val_means["top1"], val_means["top5"], val_means["count"])


def banner(data, network, distribution, model_dir, epochs, first_epoch, start):
    """The lines a user reads before the first step: what runs, on what, where, from where."""
    lines = [
        f"Dataset:   {data.reader.data_dir} ({data.num_classes} classes, {data.num_train} train / "
        f"{data.num_val} val images){' - synthetic, written by the quickstart' if data.synthetic else ''}",
        f"Network:   {network['name']} ({network['params']:,} parameters, {network['macs'] / 1e6:,.1f} MMACs "
        f"per image at {data.image_size} px)",
        f"Data:      {data.image_size} px, batch {data.batch_size}, {data.steps_per_epoch} steps an epoch, "
        f"epochs {first_epoch}-{first_epoch + epochs - 1}",
        f"Strategy:  {type(distribution.strategy).__name__}, {distribution.strategy.num_replicas_in_sync} "
        "replica(s)",
        f"Model dir: {model_dir}",
        f"Start:     {start}",
    ]
    for line in lines:
        logging.info("%s", line)


def end_summary(model_dir, best, exported):
    """The lines a user reads at the end: the best epoch, where the export is, how to look at the run."""
    if best:
        logging.info("Best epoch %d: val top-1 %.4f, top-5 %.4f (step %d).", best["epoch"], best["val_top1"],
                     best["val_top5"], best["step"])
    if exported:
        logging.info("Exported to %s", exported)
    logging.info("TensorBoard: tensorboard --logdir %s", os.path.dirname(os.path.abspath(model_dir)))
