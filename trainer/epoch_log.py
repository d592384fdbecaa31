"""The epoch log: one row of metrics per epoch, committed with the epoch's checkpoint.

An epoch is committed by the checkpoint that holds its row (the checkpoint's
`history` variable, a JSON list of rows). metrics.csv, the val points in
TensorBoard and `best/` are derived from that history after the checkpoint,
and `republish` rewrites whichever of them a crash cut short, so a killed
run loses or doubles no epoch's results.
"""

import json
import os

import tensorflow as tf
from absl import logging

from trainer import checkpoints, summaries


VAL_METRICS = ("val_top1", "val_top5", "val_loss")  # The epoch metrics that can pick the best or drive a plateau.


def step_offset(init_from, rows, first_epoch, steps_per_epoch):
    """The TensorBoard step of this phase's step 0, so the phases continue one axis."""
    if rows:
        return rows[0]["global_step"] - rows[0]["step"]
    if init_from:
        history = checkpoints.read_history(init_from)
        if history:
            return history[-1]["global_step"]
    return (first_epoch - 1) * steps_per_epoch


def new_row(epoch, step, offset, train_means, val, seconds, learning_rate):
    """One epoch's line of metrics.csv (and of the checkpoint's history)."""
    return {"epoch": epoch, "step": step, "global_step": offset + step, "time": round(seconds, 2),
            "learning_rate": learning_rate,
            **{f"train_{k}": v for k, v in (train_means or {}).items() if k != "count"},
            **{f"val_{k}": v for k, v in val.items()}}


def commit(rows, row, history, checkpoints, writers, model_dir, chief, metric, plateau_rate, opt):
    """Commits an epoch: its row goes into the checkpoint's history (the commit), then the CSV, val points, best/.

    A crash before the checkpoint loses the epoch whole (the rerun trains it
    again); a crash after it loses nothing (`republish` rewrites the CSV and best/).
    """
    if plateau_rate is not None:
        opt.learning_rate = plateau_rate  # The next epoch's rate; the plateau's state goes into this checkpoint.
    rows = [r for r in rows if r["step"] != row["step"]] + [row]
    history.assign(json.dumps(rows))
    checkpoints.save(row["step"], best=best_row(rows, metric)["step"] == row["step"], rewrite=True)
    if chief:
        writers.scalars("train", row["global_step"], {"epoch_time": row["time"]})
        writers.scalars("val", row["global_step"], {k[4:]: v for k, v in row.items() if k.startswith("val_")})
        writers.flush()
        summaries.CsvLog(os.path.join(model_dir, "metrics.csv")).write(rows)
    return rows


def republish(model_dir, rows, checkpoints, metric, writers=None):
    """After a crash: rewrites the CSV from the history, saves best/ again if its save was lost, and writes
    the val points (and epoch times) of committed epochs that TensorBoard lacks (a kill between the
    checkpoint and their write)."""
    if rows:
        summaries.CsvLog(os.path.join(model_dir, "metrics.csv")).write(rows)
        top = best_row(rows, metric)
        checkpoints.repair_best(top["step"])
        if checkpoints.best_step() != top["step"] and checkpoints.latest_step() == top["step"]:
            checkpoints.save(top["step"], best=True)
        if writers is not None:
            written = written_steps(os.path.join(model_dir, "val"), "top1")
            for row in rows:
                if row["global_step"] not in written:
                    logging.info("Writing the val points of epoch %d to TensorBoard (lost by a crash).", row["epoch"])
                    writers.scalars("train", row["global_step"], {"epoch_time": row["time"]})
                    writers.scalars("val", row["global_step"],
                                    {k[4:]: v for k, v in row.items() if k.startswith("val_")})
            writers.flush()


def written_steps(log_dir, tag):
    """The steps at which `tag` was written in the event files of `log_dir` (a truncated last record is ignored)."""
    steps = set()
    for path in tf.io.gfile.glob(os.path.join(log_dir, "events.out.tfevents.*")):
        try:
            for record in tf.data.TFRecordDataset(path):
                event = tf.compat.v1.Event.FromString(record.numpy())
                if any(value.tag == tag for value in event.summary.value):
                    steps.add(event.step)
        except tf.errors.DataLossError:  # The writer was killed mid-record: what precedes it counts.
            pass
    return steps


def best_row(rows, metric="val_top1"):
    """The best epoch's row (the earliest of equals), or None."""
    if not rows:
        return None
    sign = -1.0 if metric.endswith("loss") else 1.0
    return max(rows, key=lambda r: (sign * r[metric], -r["step"]))
