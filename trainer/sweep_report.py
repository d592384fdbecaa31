"""A sweep's report: SWEEP_DIR/report.md, report.json and plots/ (see `trainer.sweep`), rewritten as points finish.

One row per point: the varied values, its state, the best value of the
sweep's metric, the best val top-1 (with that epoch's top-5 and number), the
epochs done, the wall time (all its starts) and the training images/s (as
`trainer.compare` computes them from metrics.csv); sorted by the metric. Then
the best point's command, the failed points with their error line, and the
plots: the metric against each varied value, and the learning curves of all
points in one figure (matplotlib `Figure` on an Agg canvas, no pyplot state).
"""

import math
import os
import re

from trainer import compare


def rows(directory, state):
    """The report's rows, best first (points without the metric last, in the sweep's order)."""
    from trainer import sweep  # pylint: disable=import-outside-toplevel

    metric = state.get("metric", "val_top1")
    lower = "loss" in metric
    out = []
    for name, entry in state["points"].items():
        run = os.path.join(directory, name)
        row = {"point": name, "status": entry.get("status"), "labels": entry.get("labels", {}),
               "values": entry.get("values", {}), "wall_time": entry.get("wall_time"),
               "starts": entry.get("starts", 0), "error": entry.get("error"),
               "command": sweep.command_text(entry.get("arguments", [])), "metric": None,
               "val_top1": None, "val_top5": None, "best_epoch": None, "epochs": 0, "images_per_second": None,
               "curve": []}
        if os.path.isfile(os.path.join(run, "metrics.csv")):
            summary = compare.summarize(run, compute_plan=False, warn=lambda _: None)
            row.update({k: summary[k] for k in ("val_top1", "val_top5", "best_epoch", "epochs",
                                                "images_per_second")})
            metrics = [r for r in compare.read_metrics(os.path.join(run, "metrics.csv"))
                       if _finite(r.get(metric))]
            if metrics:
                row["metric"] = (min if lower else max)(r[metric] for r in metrics)
            row["curve"] = [(r["epoch"], r.get(metric), r.get("train_loss")) for r in metrics]
        out.append(row)
    known = sorted((r for r in out if r["metric"] is not None), key=lambda r: r["metric"], reverse=not lower)
    return known + [r for r in out if r["metric"] is None]


def write(directory, state):
    """Writes report.json, report.md and the plots; returns the rows."""
    from trainer import sweep  # pylint: disable=import-outside-toplevel

    table = rows(directory, state)
    names = [v["name"] for v in state.get("varied", [])]
    plots = _plots(directory, state, table, names)
    report = {"sweep_file": state.get("sweep_file"), "metric": state.get("metric"), "varied": state.get("varied"),
              "points": [{k: v for k, v in r.items() if k != "curve"} for r in table],
              "best": table[0]["point"] if table and table[0]["metric"] is not None else None,
              "plots": plots}
    sweep.write_json(os.path.join(directory, "report.json"), report)
    with open(os.path.join(directory, "report.md.tmp"), "w", encoding="utf-8") as f:
        f.write(_markdown(state, table, names, plots))
    os.replace(os.path.join(directory, "report.md.tmp"), os.path.join(directory, "report.md"))
    return table


def _markdown(state, table, names, plots):
    metric = state.get("metric", "val_top1")
    done = sum(r["status"] == "finished" for r in table)
    lines = [f"# Sweep {os.path.basename(state.get('sweep_file') or '')}", "",
             f"Sweep file: `{state.get('sweep_file')}`. Ranked by best {metric} "
             f"({'lowest' if 'loss' in metric else 'highest'} first). {done} of {len(table)} points finished.", ""]
    top1 = metric != "val_top1"  # (Else the metric's column is the best top-1.)
    headers = ["point", *names, "status", f"best {metric}", *(["best top-1"] if top1 else []), "top-5",
               "best epoch", "epochs", "wall s", "img/s"]
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "|".join(":---" if i <= len(names) + 1 else "---:" for i in range(len(headers))) + "|")

    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    for r in table:
        cells = [r["point"], *[str(r["labels"].get(n, "-")) for n in names], r["status"] or "-",
                 num(r["metric"], ".4f"), *([num(r["val_top1"], ".4f")] if top1 else []), num(r["val_top5"], ".4f"),
                 num(r["best_epoch"], "d"), str(r["epochs"]), num(r["wall_time"], ".0f"),
                 num(r["images_per_second"], ",.0f")]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines.append("")
    if table and table[0]["metric"] is not None:
        lines += [f"Best point: **{table[0]['point']}**. Its command:", "", "```sh", table[0]["command"], "```", ""]
    failed = [r for r in table if r["status"] == "failed"]
    if failed:
        lines += ["## Failed points", ""] + [f"- {r['point']}: `{r['error']}`" for r in failed] + [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{os.path.basename(p)}]({p})" for p in plots] + [""]
    lines += ["Each point's model directory is `SWEEP_DIR/<point>`; its console output `logs/<point>.log`. "
              "`tensorboard --logdir` on this directory shows the points side by side (HParams: parallel "
              "coordinates).", ""]
    return "\n".join(lines)


def _plots(directory, state, table, names):
    """Writes plots/<metric>_vs_<name>.png per varied value and plots/learning_curves.png; returns their paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
    from matplotlib.ticker import MaxNLocator, NullFormatter  # pylint: disable=import-outside-toplevel

    metric = state.get("metric", "val_top1")
    with_metric = [r for r in table if r["metric"] is not None]
    if not with_metric:
        return []
    os.makedirs(os.path.join(directory, "plots"), exist_ok=True)
    written = []
    keys = {v["name"]: v["key"] for v in state.get("varied", [])}
    log_scale = {v["name"] for v in state.get("varied", []) if v.get("log")}
    for name in names:
        fig = Figure(figsize=(5, 3.5), dpi=100)
        ax = fig.add_subplot()
        values = [r["values"].get(keys[name]) for r in with_metric]
        ys = [r["metric"] for r in with_metric]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            ax.scatter(values, ys)
            if min(values) > 0 and (name in log_scale or max(values) / min(values) >= 10):
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # (Minor labels overlap over one decade.)
        else:
            labels = list(dict.fromkeys(str(e.get("labels", {}).get(name)) for e in state["points"].values()))
            ax.scatter([labels.index(str(r["labels"].get(name))) for r in with_metric], ys)
            ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 3 else 0)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.set_xlabel(name)
        ax.set_ylabel(f"best {metric}")
        ax.set_title(f"best {metric} against {name}")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        written.append(_save(fig, directory, f"{metric}_vs_{_file_name(name)}.png", FigureCanvasAgg))
    fig = Figure(figsize=(10, 4), dpi=100)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for r in with_metric:
        epochs = [c[0] for c in r["curve"]]
        left.plot(epochs, [c[1] for c in r["curve"]], marker="o", markersize=3, label=r["point"])
        right.plot(epochs, [c[2] if _finite(c[2]) else math.nan for c in r["curve"]], marker="o", markersize=3)
    left.set(xlabel="epoch", ylabel=f"val {metric.removeprefix('val_')}", title=f"{metric} per epoch")
    right.set(xlabel="epoch", ylabel="train loss", title="train loss per epoch")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, directory, "learning_curves.png", FigureCanvasAgg))
    return written


def _save(fig, directory, file_name, canvas):
    canvas(fig)
    path = os.path.join("plots", file_name)
    fig.savefig(os.path.join(directory, path), format="png")
    return path


def _file_name(name):
    return re.sub(r"[^\w.-]+", "_", name)


def _finite(value):
    return isinstance(value, (int, float)) and not math.isnan(value)
