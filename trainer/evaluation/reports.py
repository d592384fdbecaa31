"""The evaluation's files: report.json, report.md and predictions.csv, each written atomically."""

import csv
import io
import json
import math
import os
import uuid

import tensorflow as tf

WORST_CLASSES = 20


def write_atomic(path, text):
    """Writes `text` to `path` through a temporary file renamed over it (local or remote paths).

    A reader never sees a half-written file: locally the rename is `os.replace`;
    on gs:// and other tf.io.gfile filesystems it is gfile's rename.
    """
    temp = f"{path}.tmp-{uuid.uuid4().hex}"
    with tf.io.gfile.GFile(temp, "w") as f:
        f.write(text)
    if "://" in path:
        tf.io.gfile.rename(temp, path, overwrite=True)
    else:
        os.replace(temp, path)


def _clean(value):
    """JSON-safe: NaN becomes None (null), numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(report):
    """The report as indented JSON (NaN written as null)."""
    return json.dumps(_clean(report), indent=1, allow_nan=False) + "\n"


def predictions_csv(rows):
    """CSV text of prediction rows.

    Args:
      rows: dicts with 'file', 'true_wnid', 'predicted_wnid', 'probability', 'top5_wnids'.

    Returns:
      The CSV text with a header.
    """
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["file", "true_wnid", "predicted_wnid", "probability", "top5_wnids"],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _percent(value):
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def per_class_table(classes, limit=None):
    """A markdown table of per-class accuracy, precision and recall, worst accuracy first.

    Args:
      classes: the report's 'per_class' list.
      limit: rows to keep (None = all).

    Returns:
      Markdown text.
    """
    ranked = sorted(classes, key=lambda c: (math.inf if c["accuracy"] is None or math.isnan(c["accuracy"])
                                            else c["accuracy"], c["index"]))
    lines = ["| class | name | images | accuracy | precision | recall |", "|---|---|---:|---:|---:|---:|"]
    for c in ranked[:limit]:
        lines.append(f"| {c['wnid']} | {c['name']} | {c['support']} | {_percent(c['accuracy'])} | "
                     f"{_percent(c['precision'])} | {_percent(c['recall'])} |")
    return "\n".join(lines)


def confused_table(pairs):
    """A markdown table of the most confused (true, predicted) pairs."""
    if not pairs:
        return "No misclassified images."
    lines = ["| true | predicted | images | share of the true class |", "|---|---|---:|---:|"]
    for p in pairs:
        lines.append(f"| {p['true_name']} ({p['true_wnid']}) | {p['predicted_name']} ({p['predicted_wnid']}) | "
                     f"{p['count']} | {_percent(p['fraction'])} |")
    return "\n".join(lines)


def markdown(report):
    """report.md: the summary, the worst classes and the most confused pairs."""
    m = report["metrics"]
    skipped = report["data"]["skipped_files"]
    lines = [
        f"# Evaluation of {report['checkpoint_name']} on {report['split']}",
        "",
        *([f"**Warning: {report['warning']}**", ""] if report.get("warning") else []),
        f"- checkpoint: `{report['checkpoint']}` (step {report['checkpoint_step']})",
        f"- images scored: {report['data']['num_scored']} of {report['data']['num_files']}"
        + (f" ({len(skipped)} could not be decoded and were skipped)" if skipped else ""),
        f"- image size {report['image_size']} px, horizontal-flip TTA: {'on' if report['tta_flip'] else 'off'}",
        f"- loss (mean cross-entropy): {m['loss']:.4f}",
        f"- top-1: {100 * m['top1']:.2f}%",
        f"- top-{m['top_k']}: {100 * m['top5']:.2f}%",
        f"- expected calibration error ({m['ece_bins']} bins): {m['ece']:.4f}",
    ]
    if report.get("checkpoint_val_top1") is not None:
        lines.append(f"- val top-1 training logged for this checkpoint (epoch {report.get('checkpoint_epoch')}): "
                     f"{100 * report['checkpoint_val_top1']:.2f}%")
    if report.get("checkpoint_best_top1") is not None:
        lines.append(f"- best val top-1 of the run's history in the checkpoint: "
                     f"{100 * report['checkpoint_best_top1']:.2f}%")
    prep = report.get("preprocessing")
    if prep:
        standardised = ("" if prep.get("mean") is None
                        else f", standardised (mean {prep['mean']}, std {prep['std']})")
        lines.append(f"- preprocessing: {prep['crop']}, resize '{prep['resize']}' to {prep['image_size']} px, "
                     f"pixels / 255{standardised}")
    lines += ["", f"## The {min(WORST_CLASSES, len(report['per_class']))} worst classes", "",
              per_class_table(report["per_class"], WORST_CLASSES), "",
              f"## The most confused pairs (up to {report['num_confused']})", "",
              confused_table(report["most_confused"]), ""]
    if skipped:
        lines += ["## Skipped (undecodable) images", ""] + [f"- {f}" for f in skipped] + [""]
    return "\n".join(lines)
