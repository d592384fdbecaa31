"""What a run reports: TensorBoard, the CSV log, console progress, the banner and the end summary."""

import csv
import io
import json
import os
import sys

import numpy as np
import tensorflow as tf
from absl import logging

from trainer import run_dir


NOT_PLOTTED = ("count",)


class Writers:
    """TensorBoard writers for model_dir/train and model_dir/val (no-ops on workers other than the chief)."""

    def __init__(self, log_dir, chief):
        self._writers = {k: tf.summary.create_file_writer(os.path.join(log_dir, k)) if chief
                         else tf.summary.create_noop_writer() for k in ("train", "val")}

    def scalars(self, split, step, values):
        """Writes `values` as scalars, except NOT_PLOTTED (the count of examples is metrics.csv's, not a curve)."""
        with self._writers[split].as_default(step=step):
            for name, value in values.items():
                if name not in NOT_PLOTTED:
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

    def __init__(self, epoch, epochs, steps, batch_size, log_every_steps, top_k=5):
        """`top_k`: the k of the 'top5' metric (min(5, classes)), as the line names it."""
        self.epoch, self.epochs, self.steps = epoch, epochs, steps
        self.batch_size, self.log_every, self.top_k = batch_size, log_every_steps, top_k
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
        logging.info("epoch %d/%d done in %.1fs: train loss %.4f top1 %.4f | val loss %.4f top1 %.4f top%d %.4f "
                     "(%d images)", self.epoch, self.epochs, seconds, train_means["loss"], train_means["top1"],
                     val_means["loss"], val_means["top1"], self.top_k, val_means["top5"], val_means["count"])


def banner(data, network, distribution, model_dir, epochs, first_epoch, start, readable_train=None):
    """The lines a user reads before the first step: what runs, on what, where, from where.

    `readable_train`: the training images the data check read, when it ran (fewer than the source counts when a
    file or shard is damaged).
    """
    train = data.num_train if readable_train in (None, data.num_train) else \
        f"{data.num_train} ({readable_train} readable)"
    lines = [
        f"Dataset:   {data.source.location} ({data.source.kind}: {data.num_classes} classes, {train} "
        f"train / {data.num_val} val images){' - synthetic (trainer.data.synthetic)' if data.synthetic else ''}",
        f"Network:   {network['name']} ({network['params']:,} parameters, {network['macs'] / 1e6:,.1f} MMACs "
        f"per image at {data.image_size} px)",
        f"Data:      {data.image_size} px, batch {data.batch_size}, {data.steps_per_epoch} steps an epoch, "
        f"epochs {first_epoch}-{first_epoch + epochs - 1}",
        f"Feeding:   {data.memory_mode()[1]}",
        f"Strategy:  {distribution.describe()}",
        f"Model dir: {model_dir}",
        f"Start:     {start}",
    ]
    for line in lines:
        logging.info("%s", line)


def end_summary(model_dir, best, exported, top_k=5):
    """The lines a user reads at the end: the best epoch, where the export is, how to look at the run."""
    if best:
        logging.info("Best epoch %d: val top-1 %.4f, top-%d %.4f (step %d).", best["epoch"], best["val_top1"],
                     top_k, best["val_top5"], best["step"])
    if exported:
        logging.info("Exported to %s", exported)
    logging.info("TensorBoard: tensorboard --logdir %s", os.path.dirname(os.path.abspath(model_dir)))


# --- Comparing runs in TensorBoard: HParams and a custom scalar layout -------------------------------------------

# The metrics the HParams dashboard shows for each run: `group/tag`, the scalars the trainer writes at each epoch
# end into model_dir/val ('loss', 'top1', 'top5'). With the session written into model_dir, a metric (tag 'top1',
# group 'val') is read from the run model_dir/val.
HPARAMS_METRICS = ("val/loss", "val/top1", "val/top5")


def gin_hparams(**overrides):
    """A run's hyperparameters, from the parsed gin configuration, for `hparams`.

    The UPPER_CASE macros users edit that are defined (all but MODEL_DIR, the
    run itself), the network's name, the optimizer's and the schedule's names
    (as bound on `trainer.train`, else its defaults) and the schedule's
    learning rate.

    Args:
      **overrides: values that replace or extend the ones read from gin.

    Returns:
      A dict name -> value (bool, int, float or str; None as 'None').
    """
    import gin  # pylint: disable=import-outside-toplevel

    from trainer import config  # pylint: disable=import-outside-toplevel

    values = {}
    for name in config.MACROS:
        if name == "MODEL_DIR":
            continue
        try:
            values[name] = _plain(gin.query_parameter(f"%{name}"))
        except ValueError:
            continue  # Not defined in this configuration.
    values["network"] = _plain(_gin_value("trainer.network", "name"))
    for key in ("optimizer", "schedule"):
        values[key] = _plain(_gin_value("trainer.train", key))
    schedule = _gin_value("trainer.train", "schedule")
    schedule_selector = _selector(schedule)
    if schedule_selector:
        values["learning_rate"] = _plain(_gin_value(schedule_selector, "learning_rate"))
    values.update(overrides)
    return {k: _hparam_value(v) for k, v in values.items()}


def hparams(log_dir, values, metrics=HPARAMS_METRICS, trial_id=None):
    """Logs a run's hyperparameters for TensorBoard's HParams dashboard, into `log_dir` (the run's model dir).

    Writes the session (`hp.hparams`: the values) and the experiment (each
    hyperparameter's type, and `metrics`), so `tensorboard --logdir runs`
    compares the runs side by side. Each run is its own session group (its
    `trial_id` is its directory): two runs with equal values are not averaged.

    Args:
      log_dir: the run's model directory (its train/ and val/ hold the scalars).
      values: a dict name -> bool, int, float, str or None (None is logged as 'None', anything else as its str).
      metrics: `group/tag` names of scalars under `log_dir` ('val/top1': tag 'top1' in log_dir/val); a name
        without '/' is a scalar in `log_dir` itself.
      trial_id: the session group's name; default: `trial_name(log_dir)`.

    Returns:
      The dict of values as logged.
    """
    from tensorboard.plugins.hparams import api as hp  # pylint: disable=import-outside-toplevel
    from tensorboard.plugins.hparams import api_pb2  # pylint: disable=import-outside-toplevel
    from tensorboard.plugins.hparams import summary as hparams_summary  # pylint: disable=import-outside-toplevel

    # TensorBoard has no integer type: a float64 64 shows as 64.000, so integers are logged as their text.
    values = {str(k): str(v) if isinstance(_hparam_value(v), int) and not isinstance(v, bool) else _hparam_value(v)
              for k, v in values.items()}
    types = {bool: api_pb2.DATA_TYPE_BOOL, float: api_pb2.DATA_TYPE_FLOAT64, str: api_pb2.DATA_TYPE_STRING}
    # `differs` marks the hyperparameters the dashboard shows first; it shows 5 columns by default (the `differs`
    # ones, A-Z), the others are in its column chooser. TensorBoard reads this experiment from one run, so it
    # cannot tell which values differ between runs: SHOWN_HPARAMS are the usual suspects.
    infos = [api_pb2.HParamInfo(name=k, type=types[type(values[k])], differs=k in SHOWN_HPARAMS)
             for k in sorted(values, key=lambda k: (HPARAMS_ORDER.index(k) if k in HPARAMS_ORDER
                                                    else len(HPARAMS_ORDER), k))]
    metric_infos = []
    for metric in metrics:
        group, _, tag = metric.rpartition("/")
        metric_infos.append(api_pb2.MetricInfo(name=api_pb2.MetricName(group=group, tag=tag),
                                               display_name=metric))
    # The experiment, with types but no domains: TensorBoard reads it from one run only, and a discrete domain
    # taken from one run would hide the other runs' values.
    experiment = hparams_summary.experiment_pb(infos, metric_infos)
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
        tf.summary.experimental.write_raw_pb(experiment.SerializeToString(), step=0)
        hp.hparams(values, trial_id=trial_id or trial_name(log_dir))
    writer.close()
    return values


HPARAMS_ORDER = ("network", "AUGMENT", "IMAGE_SIZE", "BATCH_SIZE", "EPOCHS", "optimizer", "schedule",
                 "learning_rate")
SHOWN_HPARAMS = ("network", "AUGMENT", "IMAGE_SIZE", "BATCH_SIZE", "EPOCHS")  # TensorBoard shows 5 by default.


def trial_name(log_dir):
    """A run's name in the HParams table: its path from the working directory ('runs/quickstart') when it is
    below it, else its absolute path (a `gs://` path as it is)."""
    if "://" in log_dir:
        return log_dir
    relative = os.path.relpath(os.path.abspath(log_dir))
    return os.path.abspath(log_dir) if relative.startswith("..") else relative


def scalar_layout(log_dir):
    """Writes a TensorBoard custom scalar layout into `log_dir` (the CUSTOM SCALARS dashboard).

    First 'metrics': loss, top-1 and top-5 (train and val on one chart each,
    every run of the log directory on it) and the learning rate; then
    'speed': images per second and epoch time. TensorBoard merges the
    layouts of all runs, dropping duplicate charts.

    Returns:
      The `layout_pb2.Layout` written.
    """
    from tensorboard.plugins.custom_scalar import layout_pb2  # pylint: disable=import-outside-toplevel
    from tensorboard.plugins.custom_scalar import summary as layout_summary  # pylint: disable=import-outside-toplevel

    def chart(title, tag):
        return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=[rf"^{tag}$"]))

    layout = layout_pb2.Layout(category=[
        layout_pb2.Category(title="metrics", chart=[
            chart("loss (train, val)", "loss"), chart("top-1 (train, val)", "top1"),
            chart("top-5 (train, val)", "top5"), chart("learning rate", "learning_rate")]),
        layout_pb2.Category(title="speed", chart=[
            chart("images per second", "images_per_second"), chart("epoch time (s)", "epoch_time")]),
    ])
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
        tf.summary.experimental.write_raw_pb(layout_summary.pb(layout).SerializeToString(), step=0)
    writer.close()
    return layout


def _gin_value(selector, param):
    """`selector.param` as gin binds it, else the configurable's default (None if neither)."""
    import inspect  # pylint: disable=import-outside-toplevel

    import gin  # pylint: disable=import-outside-toplevel

    from trainer import registry  # pylint: disable=import-outside-toplevel

    try:
        return gin.query_parameter(f"{selector}.{param}")
    except ValueError:
        fn = registry.CONFIGURABLES.get(selector)
        default = inspect.signature(fn).parameters.get(param) if fn else None
        return None if default is None or default.default is inspect.Parameter.empty else default.default


def _selector(value):
    """The registered selector ('trainer.optim.adam') of a gin reference or a configurable function, or None."""
    from trainer import registry  # pylint: disable=import-outside-toplevel

    configurable = getattr(value, "configurable", None)
    if configurable is not None:
        return configurable.selector if configurable.selector in registry.CONFIGURABLES else None
    name = getattr(value, "__name__", None)
    matches = [s for s in registry.CONFIGURABLES if name and s.endswith("." + name)]
    return matches[0] if len(matches) == 1 else None


def _plain(value):
    """A gin value as a plain value: a macro's value, a configurable's name ('adam'), or the value itself."""
    configurable = getattr(value, "configurable", None)
    if configurable is not None:
        if configurable.selector in ("gin.macro", "gin.constant"):
            return _plain(value.scoped_configurable_fn())
        return configurable.name
    if callable(value) and hasattr(value, "__name__"):
        return value.__name__
    return value


def _hparam_value(value):
    if value is None:
        return "None"
    if isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):  # A NumPy scalar.
        return value.item()
    return str(value)


def data_report(data, model_dir, share_decode=True):
    """Reports the data before training: a summary line, a warning per problem, model_dir/data_report.json
    (the report is returned).

    With `share_decode`, a training set held in memory is decoded here, once: the scan and the pipeline share it.
    """
    from trainer.data import scan  # pylint: disable=import-outside-toplevel

    def decoded():  # Called on a cache miss only: the scan takes the training set's decode from the pipeline.
        if not (share_decode and data.memory_mode()[0]):
            return None
        _, labels, ids = data.load_train()
        return {"train": (ids, labels.numpy().tolist())}

    report = scan.scan(data.source, decoded=decoded)
    path = os.path.join(model_dir, "data_report.json")
    run_dir.write_text(path, json.dumps(report, indent=1) + "\n")
    cached = f"; cached in {report['cached']}" if report.get("cached") else ""
    logging.info("Data check: %s (details: %s%s).", scan.scan_summary(report), path, cached)
    for problem in report["problems"]:
        logging.warning("Data check: %s", problem)
    return report


def network_summary(model, network_plan):
    """What the banner says of the network."""
    totals = network_plan.totals
    return {"name": model.name, "params": totals.params, "macs": totals.macs, "rf": totals.rf}


def first_images(strategy, batch):
    """Up to 32 images and labels of this worker's first replica: what the augmentation does."""
    images, labels = (strategy.experimental_local_results(t)[0][:32] for t in batch)
    return images, labels


def write_run_start(model_dir, writers, network_plan, global_step, preview, data):
    """Operative gin config, network plan, HParams, the scalar layout, run.json, labelled augmented images."""
    import gin  # pylint: disable=import-outside-toplevel

    from trainer.evaluation import figures  # pylint: disable=import-outside-toplevel
    from trainer.models import builder, plan  # pylint: disable=import-outside-toplevel

    operative = gin.operative_config_str()
    run_dir.write_text(os.path.join(model_dir, "operative_config.gin"), operative)
    run_dir.write_text(os.path.join(model_dir, "config.gin"), gin.config_str())
    writers.text("train", global_step, "config/operative_gin", markdown_code(operative))
    writers.text("train", global_step, "network/plan", markdown_code(plan.format_plan(network_plan)))
    hparams(model_dir, gin_hparams())
    scalar_layout(model_dir)
    totals = network_plan.totals
    run_dir.write_text(os.path.join(model_dir, "run.json"), json.dumps({
        "network": builder.declared()[0], "params": totals.params, "macs": totals.macs,
        "image_size": data.image_size, "batch_size": data.batch_size}))
    if preview is not None:
        images, labels = (np.asarray(t) for t in preview)
        if data.preprocess.mean is not None:  # Back to [0, 1] to be seen.
            images = images * np.array(data.preprocess.std) + np.array(data.preprocess.mean)
        names = [data.source.class_names[i] for i in labels.argmax(-1)]
        titles = [n if row.max() > 0.99 else f"{n} ({row.max():.0%})" for n, row in zip(names, labels)]  # Mixed.
        grid = figures.image_grid(images, titles, "augmented training images (label; share when mixed)", cols=8)
        writers.image("train", global_step, "augmented_inputs", tf.io.decode_png(grid))
    writers.flush()
