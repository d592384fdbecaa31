"""Evaluates one checkpoint of a training run: metrics, reports, TensorBoard pictures, Grad-CAM.

`evaluate_checkpoint` (gin: `trainer.evaluate`) scores every image of a split
with a checkpoint's weights and writes, in `<eval_dir>/<name>/` (name:
`best-45`, `ckpt-30`, with `-train` for the training split and `-flip` with
flip TTA):

  report.json      everything, machine-readable
  report.md        summary, the worst classes, the most confused pairs
  predictions.csv  example id (the file name within the dataset), true class id, predicted class id,
                   probability, top-5 class ids

and, in `<eval_dir>/` itself, one TensorBoard run for every evaluation of a
training run (at the checkpoint's step; tags `eval/`, `eval_train/` for the
training split, `eval_flip/` with flip TTA):

  events.out.*     scalars, the confusion matrix (classes in the dataset's
                   order, the same in every evaluation; a second figure
                   reorders them so confusions cluster), misclassified images, Grad-CAM
                   overlays, a reliability diagram, a per-class table

The images come from the run's data source and are prepared by the run's
`Preprocessing` (`data.preprocess`), the object training uses, in batches of
the training batch size padded the same way, so with flip TTA off the top-1
is the number the trainer's per-epoch evaluation logs for the same weights.

The trainer calls `evaluate_best_of_phase(model_dir, data, model, strategy)`
at the end of a phase; `python -m trainer.evaluate` evaluates any checkpoint.
"""

import os
import re

import gin
import numpy as np
import tensorflow as tf
from absl import logging

from trainer import checkpoints
from trainer import steps
from trainer.data import pipeline
from trainer.errors import UserError
from trainer.evaluation import figures
from trainer.evaluation import gradcam as gradcam_lib
from trainer.evaluation import metrics
from trainer.evaluation import reports
from trainer.registry import configurable

SPLITS = ("val", "train")
_AUTOTUNE = tf.data.AUTOTUNE


def checkpoint_name(path):
    """'best-45' for model_dir/best/ckpt-45, else the file name ('ckpt-30')."""
    base = os.path.basename(path)
    step = re.search(r"-(\d+)$", base)
    if os.path.basename(os.path.dirname(path)) == "best" and step:
        return f"best-{step.group(1)}"
    return base


def load_images(data, split, indices):
    """The images at positions `indices` of `split`, decoded as evaluation decodes them, before normalisation.

    Returns:
      float32 [len(indices), S, S, 3] in [0, 1], in the order of `indices` (one pass over the split's bytes).
    """
    wanted = tf.constant(sorted({int(i) for i in indices}), tf.int64)
    if not len(indices):
        return np.zeros((0, data.image_size, data.image_size, 3), np.float32)
    ds = data.source.examples(split).enumerate().filter(lambda i, example: tf.reduce_any(tf.equal(i, wanted)))
    found = {int(i): data.preprocess.scale(data.preprocess.decode(example[0])).numpy()
             for i, example in ds}
    return np.stack([found[int(i)] for i in indices])


def _scoring_dataset(data, split):
    """(images, index) batches of `data.batch_size` in the split's order, the last padded with index -1.

    The images are those `data.eval()` yields (`data.preprocess`: decode, scale, normalise); the index is the
    example's position in `data.source.listing(split)`. An image that cannot be decoded is skipped (its index
    never appears).
    """
    batch_size, image_size, preprocess = data.batch_size, data.image_size, data.preprocess
    ds = data.source.examples(split).enumerate()
    ds = ds.map(lambda i, example: (preprocess.decode(example[0]), tf.cast(i, tf.int32)),
                num_parallel_calls=_AUTOTUNE, deterministic=True)
    ds = ds if data.source.strict else ds.ignore_errors(log_warning=True)

    def finish(images, index):
        missing = batch_size - tf.shape(index)[0]
        images = tf.pad(images, [[0, missing], [0, 0], [0, 0], [0, 0]])
        index = tf.pad(index, [[0, missing]], constant_values=-1)
        images = tf.ensure_shape(images, [batch_size, image_size, image_size, 3])
        return preprocess.prepare(images), tf.ensure_shape(index, [batch_size])

    return ds.batch(batch_size).map(finish, num_parallel_calls=_AUTOTUNE).prefetch(_AUTOTUNE)


def score(model, data, split, strategy=None, tta_flip=False):
    """Runs the model over every image of a split.

    Args:
      model: maps float32 [B, S, S, 3] images, prepared as `data.preprocess` prepares them, to logits.
      data: the `pipeline.Data`: the source, the preprocessing and the global batch size (a multiple
        of the strategy's replicas).
      split: a split of the source.
      strategy: a tf.distribute strategy the model was built under (None: the default one).
      tta_flip: also score each image flipped left-right.

    Returns:
      (index, logits, flipped_logits): index int [M] of the examples that decoded (positions in
      `data.source.listing(split)`), in order; float32 logits [M, K]; flipped_logits [M, K] or None.
    """
    strategy = strategy or tf.distribute.get_strategy()

    def replica_step(images, index):
        outputs = [tf.cast(model(images, training=False), tf.float32), index]
        if tta_flip:
            outputs.append(tf.cast(model(tf.image.flip_left_right(images), training=False), tf.float32))
        return tuple(outputs)

    @tf.function
    def step(batch):
        return strategy.run(replica_step, args=batch)

    parts = []
    for batch in strategy.experimental_distribute_dataset(_scoring_dataset(data, split)):
        parts.append([np.concatenate([t.numpy() for t in strategy.experimental_local_results(out)])
                      for out in step(batch)])
    if not parts:
        raise UserError(f"None of the {data.source.count(split)} {split} images of {data.source.location} could be "
                        "decoded: nothing to evaluate.")
    logits, index = (np.concatenate([p[i] for p in parts]) for i in range(2))
    flipped = np.concatenate([p[2] for p in parts]) if tta_flip else None
    keep = index >= 0
    order = np.argsort(index[keep], kind="stable")
    return index[keep][order], logits[keep][order], (flipped[keep][order] if tta_flip else None)


def compute_metrics(logits, labels, num_classes, flipped_logits=None, num_confused=20):
    """Every number of the report from logits and labels.

    Without `flipped_logits`, predictions and top-k come from the logits
    themselves (as the trainer's evaluation); with them, from the mean of the
    two softmax probabilities.

    Args:
      logits: [N, K] float32.
      labels: [N] int class indices.
      num_classes: K.
      flipped_logits: optional [N, K] logits of the flipped images.
      num_confused: how many (true, predicted) pairs to list.

    Returns:
      A dict: 'probabilities' [N, K], 'predictions' [N], 'losses' [N],
      'loss', 'top1', 'top5', 'top_k', 'confusion' [K, K], 'per_class' (dict of
      arrays), 'ece', 'reliability' (bins), 'most_confused' [(true, pred, count)].
    """
    labels = np.asarray(labels)
    probabilities = metrics.softmax(logits)
    if flipped_logits is None:
        scores, losses = np.asarray(logits), metrics.cross_entropy(logits, labels)
    else:
        probabilities = (probabilities + metrics.softmax(flipped_logits)) / 2
        scores = probabilities
        losses = -np.log(np.maximum(probabilities[np.arange(len(labels)), labels], 1e-300))
    predictions = np.argmax(scores, axis=1)
    k = steps.top_k(num_classes)
    confusion = metrics.confusion_matrix(labels, predictions, num_classes)
    confidences = probabilities[np.arange(len(labels)), predictions]
    ece, bins = metrics.reliability(confidences, predictions == labels)
    return {"probabilities": probabilities, "predictions": predictions, "losses": losses,
            "loss": float(losses.mean()), "top1": float(np.mean(predictions == labels)),
            "top5": float(np.mean(metrics.in_top_k(scores, labels, k))), "top_k": k, "confusion": confusion,
            "per_class": metrics.per_class(confusion), "ece": ece, "reliability": bins,
            "most_confused": metrics.most_confused(confusion, num_confused)}


@configurable("trainer", name="evaluate",
              denylist=["model", "checkpoint_path", "data", "split", "eval_dir", "writer", "strategy"])
def evaluate_checkpoint(model, checkpoint_path, data, split, eval_dir, writer=None, strategy=None, tta_flip=False,
                        gradcam_layer=None, num_misclassified=24, num_gradcam=8, num_confused=20):
    """Evaluates one checkpoint and writes its reports and TensorBoard summaries.

    Args:
      model: the network (built for `data.image_size`), or None to build it from gin
        (`builder.build_network`) under `strategy`. A given model gets its
        weights back afterwards: the trainer may pass the model it trains.
      checkpoint_path: a training checkpoint (`checkpoints.find_checkpoint`).
      data: the phase's `pipeline.Data`: the source (`data.source`), the preprocessing
        (`data.preprocess`) and the batch size (images per model call).
      split: 'val' or 'train'.
      eval_dir: the files go to `<eval_dir>/<name>/` (`model_dir/eval` for a run).
      writer: a `tf.summary` writer; None = one writing to `<eval_dir>/` (one TensorBoard run for all the
        evaluations of a training run, at their checkpoints' steps).
      strategy: the tf.distribute strategy `model` was built under, or the trainer's
        `strategy.Distribution` (None: the default strategy).
      tta_flip: average the softmax probabilities of each image and its left-right mirror.
      gradcam_layer: the block (or Keras layer) Grad-CAM looks at; None = the
        last layer with a 4-D output.
      num_misclassified: misclassified images shown (the most confident mistakes).
      num_gradcam: how many of those get a Grad-CAM overlay.
      num_confused: (true, predicted) pairs listed.

    Returns:
      The report (the content of report.json) as a dict.

    Raises:
      UserError: an unknown split, a checkpoint of another network, classes that
        do not match the dataset, no decodable image, an unknown Grad-CAM layer.
    """
    if split not in SPLITS:
        raise UserError(f"Evaluation split must be one of {', '.join(SPLITS)}, got {split!r}.")
    strategy = getattr(strategy, "strategy", strategy) or tf.distribute.get_strategy()  # A Distribution, too.
    if data.batch_size % strategy.num_replicas_in_sync:
        raise UserError(f"Evaluation batch size {data.batch_size} does not split over "
                        f"{strategy.num_replicas_in_sync} replicas: use a multiple of them.")
    source = data.source
    if model is None:
        from trainer.models import builder  # pylint: disable=import-outside-toplevel
        with strategy.scope():
            model = builder.build_network(data.image_size)
        saved = None
    else:
        saved = [w.numpy() for w in model.weights]
    if model.output_shape[-1] != data.num_classes:
        raise UserError(f"The network outputs {model.output_shape[-1]} classes but the dataset at "
                        f"{source.location} has {data.num_classes}: expected the NUM_CLASSES of the run.")
    layer = gradcam_lib.find_layer(model, gradcam_layer)  # Fails early on a bad name.
    name = checkpoint_name(checkpoint_path) + ("-train" if split == "train" else "") + ("-flip" if tta_flip else "")
    out_dir = os.path.join(eval_dir, name)
    try:
        checkpoints.restore_weights(model, checkpoint_path)
        ids, labels = source.listing(split)
        index, logits, flipped = score(model, data, split, strategy, tta_flip)
        labels = np.asarray(labels)[index]
        scored_ids = [ids[i] for i in index]
        result = compute_metrics(logits, labels, data.num_classes, flipped, num_confused)
        info = checkpoints.describe_checkpoint(checkpoint_path)
        step = info["step"] if info["step"] is not None else 0
        report = _report(result, data, checkpoint_path, name, info, split, tta_flip, layer.name, ids, scored_ids,
                         labels, num_confused)
        report["out_dir"], report["replicas"] = out_dir, strategy.num_replicas_in_sync
        report["warning"] = _collapse_warning(result, info, model, data)
        if report["warning"]:
            logging.warning("%s: %s", name, report["warning"])
        tf.io.gfile.makedirs(out_dir)
        reports.write_atomic(os.path.join(out_dir, "report.json"), reports.to_json(report))
        reports.write_atomic(os.path.join(out_dir, "report.md"), reports.markdown(report))
        reports.write_atomic(os.path.join(out_dir, "predictions.csv"),
                             reports.predictions_csv(_prediction_rows(result, source, scored_ids, labels)))
        own_writer = writer is None
        writer = writer or tf.summary.create_file_writer(eval_dir)
        _summaries(writer, step, report, result, model, layer, data, split, index, labels, num_misclassified,
                   num_gradcam)
        writer.flush()
        if own_writer:
            writer.close()
    finally:
        if saved is not None:
            for w, value in zip(model.weights, saved):
                w.assign(value)
    logging.info("Evaluated %s on %s (%d images): loss %.4f, top-1 %.4f, top-%d %.4f, ECE %.4f. Reports in %s.",
                 name, split, len(index), report["metrics"]["loss"], report["metrics"]["top1"],
                 report["metrics"]["top_k"], report["metrics"]["top5"], report["metrics"]["ece"], out_dir)
    return report


def evaluate_model_dir(model_dir, checkpoint="best", split="val", data=None, model=None, strategy=None,
                       writer=None, eval_dir=None):
    """Evaluates a run's checkpoint into `model_dir/eval/<name>/` (gin must be parsed).

    Args:
      model_dir: the run's model directory.
      checkpoint: 'best', 'latest' or a checkpoint path (`checkpoints.find_checkpoint`).
      split: 'val' or 'train'.
      data: the `pipeline.Data`; None = `trainer.data` as gin configures it. Either way its source is pinned to
        model_dir (the run's own validation split, `Data.pin`).
      model: passed to `evaluate_checkpoint` (None: a fresh network from gin).
      strategy: passed to `evaluate_checkpoint`.
      writer: passed to `evaluate_checkpoint`.
      eval_dir: where the evaluation goes; None: model_dir/eval.

    Returns:
      The report dict.
    """
    model_dir = os.path.expanduser(model_dir)
    path = checkpoints.find_checkpoint(model_dir, checkpoint)
    data = pipeline.data() if data is None else data
    data.pin(model_dir)  # The run's own validation split, if its source draws one (image_folder).
    return evaluate_checkpoint(model, path, data, split, eval_dir or os.path.join(model_dir, "eval"), writer=writer,
                               strategy=strategy)


COMPLETE = ".complete"  # In eval/best-<step>/ once the end-of-phase evaluation wrote everything.


def evaluate_best_of_phase(model_dir, data, model=None, strategy=None):
    """The trainer's end-of-phase call: evaluates model_dir/best into model_dir/eval/best-<step>/ (chief only).

    Under MultiWorkerMirroredStrategy the chief evaluates alone, on a fresh
    single-device copy of the network (the other workers may have exited).

    Args:
      model_dir: the phase's model directory.
      data: the phase's `pipeline.Data` (source, preprocessing, batch size).
      model: the trained model (its weights are put back afterwards), or None for a fresh one.
      strategy: the `strategy.Distribution` (or the tf.distribute strategy) `model` was built under.

    Returns:
      The report dict, or None when the phase saved no best checkpoint or it is already evaluated (a finished
      phase's rerun; a killed evaluation's event files are removed and it is redone).
    """
    path = tf.train.latest_checkpoint(os.path.join(os.path.expanduser(model_dir), "best"))
    if not path:
        logging.warning("No best checkpoint in %s/best: nothing to evaluate.", model_dir)
        return None
    eval_dir = os.path.join(os.path.expanduser(model_dir), "eval")
    out_dir = os.path.join(eval_dir, checkpoint_name(path))
    complete = os.path.join(out_dir, COMPLETE)
    if tf.io.gfile.exists(complete):
        logging.info("%s is already evaluated in %s: not redone.", path, out_dir)
        return None
    # Its own event file (named by the checkpoint), so a killed evaluation's is rewritten, not added to (TensorBoard
    # would show its points twice).
    suffix = f".{checkpoint_name(path)}"
    for stale in tf.io.gfile.glob(os.path.join(eval_dir, f"events.out.tfevents.*{suffix}")):
        tf.io.gfile.remove(stale)
    if getattr(strategy, "multi_worker", False) or isinstance(getattr(strategy, "strategy", strategy),
                                                              tf.distribute.MultiWorkerMirroredStrategy):
        model, strategy = None, None
    writer = tf.summary.create_file_writer(eval_dir, filename_suffix=suffix)
    try:
        report = evaluate_checkpoint(model, path, data, "val", eval_dir, writer=writer, strategy=strategy)
    finally:
        writer.close()
    with tf.io.gfile.GFile(complete, "w") as f:  # Last: a rerun of the finished phase does not evaluate again.
        f.write(f"{path}\n")
    return report


def gin_value(name, default=UserError):
    """A gin parameter's value, with macros (`%IMAGE_SIZE`) resolved.

    Raises:
      UserError: the parameter is not bound and no default is given.
    """
    try:
        value = gin.query_parameter(name)
        while isinstance(value, gin.config.ConfigurableReference) and value.configurable.name == "macro":
            value = value.scoped_configurable_fn()
    except ValueError:
        if default is UserError:
            raise UserError(f"Evaluation needs {name} from the gin configuration, but it is not bound: give the "
                            "run's gin files (or its operative_config.gin) or bind it.") from None
        return default
    return value


def _report(result, data, checkpoint_path, name, info, split, tta_flip, layer_name, ids, scored_ids, labels,
            num_confused):
    source = data.source
    names, wnids = source.class_names, source.class_ids
    counts = result["per_class"]
    support = counts["support"]
    skipped = sorted(set(ids) - set(scored_ids))
    return {
        "checkpoint": checkpoint_path, "checkpoint_name": name, "checkpoint_step": info["step"],
        "checkpoint_epoch": info["epoch"], "checkpoint_val_top1": info["val_top1"],
        "checkpoint_best_top1": info["best_top1"], "split": split, "image_size": data.image_size,
        "batch_size": data.batch_size, "preprocessing": data.preprocess.to_json(),
        "tta_flip": tta_flip, "gradcam_layer": layer_name, "num_confused": num_confused,
        "data": {"data_dir": source.location, "source": source.describe(), "num_files": len(ids),
                 "num_scored": len(scored_ids),
                 "num_skipped": len(skipped), "skipped_files": skipped},
        "metrics": {"loss": result["loss"], "top1": result["top1"], "top5": result["top5"], "top_k": result["top_k"],
                    "ece": result["ece"], "ece_bins": len(result["reliability"]),
                    "mean_per_class_accuracy": float(np.nanmean(counts["accuracy"])) if support.any() else None},
        "per_class": [{"index": i, "wnid": wnids[i], "name": names[i], "support": int(support[i]),
                       "predicted": int(counts["predicted"][i]), "accuracy": float(counts["accuracy"][i]),
                       "precision": float(counts["precision"][i]), "recall": float(counts["recall"][i])}
                      for i in range(data.num_classes)],
        "most_confused": [{"true": t, "predicted": p, "true_wnid": wnids[t], "true_name": names[t],
                           "predicted_wnid": wnids[p], "predicted_name": names[p], "count": c,
                           "fraction": c / support[t]} for t, p, c in result["most_confused"]],
        "reliability": result["reliability"],
        "class_names": names, "wnids": wnids,
        "confusion_matrix": result["confusion"].tolist(),
        "confusion_matrix_order": CONFUSION_ORDER,  # Of confusion_matrix and the eval/confusion_matrix figure.
        "confusion_order": metrics.cluster_order(result["confusion"]),  # eval/confusion_matrix_clustered's.
    }


def _collapse_warning(result, info, model, data):
    """`steps.collapse_warning` for this evaluation (one line), or None: see `steps.collapse`."""
    n = len(result["predictions"])
    totals = np.concatenate([[result["loss"] * n, 0.0, 0.0, n],
                             np.bincount(result["predictions"], minlength=data.num_classes)])
    found = steps.collapse(totals, info.get("train_loss"), data.num_classes)
    if not found:
        return None
    precise, _ = steps.precise_bn_decision(gin_value("trainer.train.precise_bn", "auto"), model, data.steps_per_epoch)
    return steps.collapse_warning(found, precise)


CONFUSION_ORDER = "dataset"  # The confusion matrix's class order: the dataset's (wnids.txt), in every evaluation.


def tag_prefix(report):
    """The TensorBoard tag group of an evaluation: 'eval', 'eval_train' (training split), with '_flip' (flip TTA)."""
    return "eval" + ("_train" if report["split"] == "train" else "") + ("_flip" if report["tta_flip"] else "")


def confusion_figures(report, prefix="eval"):
    """(tag, class order, what the order is) of the confusion-matrix figures of an evaluation.

    `eval/confusion_matrix` keeps the dataset's class order (wnids.txt), so the
    figures of every evaluation of every run line up; the clustering that puts
    confused classes side by side is its own figure, whose order is this
    evaluation's and says so.
    """
    k = len(report["confusion_matrix"])
    return [(f"{prefix}/confusion_matrix", list(range(k)), "classes in the dataset's order (wnids.txt), as in every "
                                                      "evaluation"),
            (f"{prefix}/confusion_matrix_clustered", report["confusion_order"],
             "classes reordered so confusions cluster: this evaluation's own order")]


def _prediction_rows(result, source, scored_ids, labels):
    probabilities, wnids = result["probabilities"], source.class_ids
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :result["top_k"]]
    return [{"file": f, "true_wnid": wnids[labels[i]],
             "predicted_wnid": wnids[result["predictions"][i]],
             "probability": f"{probabilities[i, result['predictions'][i]]:.6f}",
             "top5_wnids": " ".join(wnids[j] for j in top[i])} for i, f in enumerate(scored_ids)]


def _image_summary(name, png):
    tf.summary.image(name, tf.image.decode_png(png, channels=3)[None], max_outputs=1)


def _summaries(writer, step, report, result, model, layer, data, split, index, labels, num_misclassified,
               num_gradcam):
    """Scalars, the confusion matrix, misclassified images, Grad-CAM, reliability, per-class table."""
    names, m = data.source.class_names, report["metrics"]
    prefix = tag_prefix(report)
    title = f"{report['checkpoint_name']} on {report['split']}"
    predictions, probabilities = result["predictions"], result["probabilities"]
    confidence = probabilities[np.arange(len(labels)), predictions]
    wrong = np.flatnonzero(predictions != labels)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:num_misclassified]  # Most confident first.
    # Grad-CAM on the mistakes; with none, on the least confident right answers.
    explained = wrong[:num_gradcam] if len(wrong) else np.argsort(confidence, kind="stable")[:num_gradcam]
    images = load_images(data, split, [index[i] for i in np.union1d(wrong, explained)])
    lookup = {int(i): images[n] for n, i in enumerate(np.union1d(wrong, explained))}

    def caption(i):
        return f"true: {names[labels[i]][:16]}\npred: {names[predictions[i]][:16]} {confidence[i]:.2f}"

    with writer.as_default(step=step):
        for key in ("loss", "top1", "top5", "ece"):
            tf.summary.scalar(f"{prefix}/{key}", m[key])
        for tag, order, subtitle in confusion_figures(report, prefix):
            _image_summary(tag, figures.confusion_matrix(result["confusion"], names, order,
                                                         f"Confusion matrix, {title}\n{subtitle}"))
        if len(wrong):
            grid = figures.image_grid([lookup[int(i)] for i in wrong], [caption(i) for i in wrong],
                                      f"Most confident mistakes, {title}")
        else:
            grid = figures.message(f"Misclassified images, {title}", "No misclassified images.")
        _image_summary(f"{prefix}/misclassified", grid)
        if len(explained):
            batch = np.stack([lookup[int(i)] for i in explained])
            cams = gradcam_lib.gradcam(model, np.asarray(data.preprocess.normalise(batch)), predictions[explained],
                                       layer)
            _image_summary(f"{prefix}/gradcam", figures.image_grid(
                batch, [caption(i) for i in explained],
                f"Grad-CAM of the predicted class at '{layer.name}', {title}", overlays=cams))
        _image_summary(f"{prefix}/reliability", figures.reliability_diagram(result["reliability"], m["ece"],
                                                                       f"Reliability, {title}"))
        tf.summary.text(f"{prefix}/per_class_accuracy", reports.per_class_table(report["per_class"]))
