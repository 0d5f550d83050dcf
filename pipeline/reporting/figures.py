"""The report's figures as PNG files, drawn with matplotlib (Agg: files only, never a window). Each
function draws one figure from results the lower layers return, writes it atomically and returns its path."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.metrics import confusion_matrix  # noqa: E402

from pipeline.core.io import atomic_write  # noqa: E402
from pipeline.tuning.compare import compare_summary  # noqa: E402


def save_figure(fig: plt.Figure, path: Path) -> Path:
    """Write `fig` as a PNG to a temporary file beside `path`, renamed over it when complete."""
    try:
        with atomic_write(path, "wb") as fh:
            fig.savefig(fh, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def confusion_figure(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], title: str, path: Path) -> Path:
    matrix = confusion_matrix(y_true, y_pred, labels=range(len(classes)))
    size = max(5, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    top = matrix.max() or 1
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                    color="white" if count > top / 2 else "black")
    return save_figure(fig, path)


def projection_figure(features: np.ndarray, labels: np.ndarray, classes: list[str], title: str, path: Path) -> Path:
    points = PCA(2, random_state=0).fit_transform(features) if len(features) > 2 else np.zeros((len(features), 2))
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab20" if len(classes) > 10 else "tab10")
    for k, name in enumerate(classes):
        mask = labels == k
        ax.scatter(points[mask, 0], points[mask, 1], s=14, color=cmap(k % cmap.N), label=name, alpha=0.8)
    ax.set_title(title)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=7, markerscale=1.5, loc="center left", bbox_to_anchor=(1, 0.5), frameon=False)
    return save_figure(fig, path)


def worst_figure(paths: list[Path], y_true: np.ndarray, proba: np.ndarray, classes: list[str], path: Path,
                 count: int = 12) -> Path:
    """Test images whose true class got the lowest probability, with what the head said instead."""
    true_p = proba[np.arange(len(y_true)), y_true]
    order = np.argsort(true_p)[:count]
    cols = min(6, max(1, len(order)))
    rows = max(1, int(np.ceil(len(order) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, order, strict=False):
        with Image.open(paths[i]) as image:
            thumb = ImageOps.exif_transpose(image).convert("RGB")
            thumb.thumbnail((160, 160))
        ax.imshow(thumb)
        predicted = int(proba[i].argmax())
        ax.set_title(f"true {classes[y_true[i]]}\nsaid {classes[predicted]} ({proba[i, predicted]:.0%})",
                     fontsize=8, color="firebrick" if predicted != y_true[i] else "black")
    return save_figure(fig, path)


def per_class_figure(precision: np.ndarray, recall: np.ndarray, classes: list[str], path: Path) -> Path:
    x = np.arange(len(classes))
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(classes) + 2), 4))
    ax.bar(x - 0.2, precision, 0.4, label="precision", color="#4c72b0")
    ax.bar(x + 0.2, recall, 0.4, label="recall", color="#dd8452")
    ax.set_xticks(x, classes, rotation=60, ha="right")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower right")
    ax.set_title("per-class precision and recall (best head, test split)")
    return save_figure(fig, path)


def finetune_figure(metrics: dict, path: Path) -> Path:
    """Training loss (and held-out accuracy, with a held-out part) per epoch, and the test accuracy of
    the linear probe the run started from against what was kept (an epoch, or the refitted probe)."""
    history = metrics["history"]
    epochs = [h["epoch"] for h in history]
    fig, (curve, bars) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]},
                                      layout="constrained")
    curve.plot(epochs, [h["loss"] for h in history], "o-", color="#4c72b0", label="training loss")
    curve.set_xlabel("epoch")
    curve.set_ylabel("training loss (label-smoothed cross-entropy)")
    curve.set_xticks([0, *epochs])
    curve.grid(alpha=0.3)
    kept = {"probe": "the linear probe (nothing trained beat it on the held-out part)",
            "ensemble": f"epoch {metrics['best_epoch']}, averaged with the probe"}.get(metrics.get("kept"),
                                                                                 f"epoch {metrics['best_epoch']}")
    curve.axvline(metrics["best_epoch"], color="grey", linestyle=":", label=f"kept: {kept}")
    legend_axis = curve
    if metrics.get("start_val_accuracy") is not None:
        legend_axis = curve.twinx()
        legend_axis.plot([0, *epochs], [metrics["start_val_accuracy"], *[h.get("val_accuracy") for h in history]],
                         "s--", color="#dd8452", label="held-out accuracy (epoch 0: the starting weights)")
        legend_axis.set_ylabel("held-out accuracy (part of the training folder)")
        best = metrics.get("best_trained_epoch")
        if metrics.get("guard_p") is not None and best and best != metrics["best_epoch"]:
            # the guard's reason, where a better held-out score did not replace the probe
            legend_axis.annotate(f"best epoch: McNemar p = {metrics['guard_p']:.3f}\n> {metrics['guard_alpha']:g},"
                                 " not kept", (best, history[best - 1]["val_accuracy"]),
                                 xytext=(-12 if 2 * best > len(epochs) else 12, -45), textcoords="offset points",
                                 ha="right" if 2 * best > len(epochs) else "left", fontsize=8, color="#a0522d",
                                 bbox={"boxstyle": "round", "fc": "white", "ec": "#dd8452"},
                                 arrowprops={"arrowstyle": "->", "color": "#dd8452"})
        if metrics.get("ensemble_val_accuracy") is not None:
            legend_axis.plot([len(epochs)], [metrics["ensemble_val_accuracy"]], "*", color="#55a868", markersize=13,
                             label="held-out accuracy of the last epoch averaged with the probe")
        legend_axis.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=1))
    handles = [h for ax in dict.fromkeys((curve, legend_axis)) for h in ax.get_legend_handles_labels()[0]]
    legend_axis.legend(handles=handles, loc="best", fontsize=8)
    curve.set_title(f"training: {metrics['backbone']}")
    final = {"probe": "kept: the probe, refitted", "ensemble": "fine-tuned + probe"}.get(metrics.get("kept"),
                                                                                          "fine-tuned")
    scores = [("linear probe alone", metrics.get("probe_accuracy")), (final, metrics.get("accuracy"))]
    scores = [(name, value) for name, value in scores if value is not None]
    if scores:
        values = [value for _, value in scores]
        bars.bar([name for name, _ in scores], values, color=["#8c8c8c", "#55a868"][-len(scores):], width=0.5)
        for i, value in enumerate(values):
            bars.text(i, value, f"{value:.1%}", ha="center", va="bottom")
        bars.set_ylim(max(0.0, min(values) - 0.1), 1.0)  # zoomed: the values are written on the bars
        bars.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=1))
        bars.set_title("test accuracy (axis does not start at 0)")
    else:
        bars.axis("off")
        bars.text(0.5, 0.5, "no test split given", ha="center", va="center")
    return save_figure(fig, path)


def _rank_group(row) -> str:
    """The colour a candidate gets: its backbone, or "fusion"."""
    return "fusion" if "+" in row.candidate else row.candidate.split(":")[0]


def rank_figure(rows: list, path: Path) -> Path:
    """Each training-free score against the probe accuracy: one point per candidate, coloured by
    backbone and labelled by layer (fusions are stars), with the rank correlation in the title."""
    from pipeline.heads.rank import spearman

    probed = [r for r in rows if r.probe_accuracy is not None]
    groups = sorted({_rank_group(r) for r in probed}, key=lambda g: (g == "fusion", g))
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, (score, label) in zip(axes, (("logme", "LogME"), ("hscore", "H-score")), strict=True):
        for g, group in enumerate(groups):
            members = [r for r in probed if _rank_group(r) == group]
            ax.scatter([getattr(r, score) for r in members], [r.probe_accuracy for r in members],
                       color=cmap(g % 10), marker="*" if group == "fusion" else "o",
                       s=120 if group == "fusion" else 36, label=group, alpha=0.85)
            for r in members:
                text = "fusion" if group == "fusion" else r.candidate.split(":")[1]
                ax.annotate(text, (getattr(r, score), r.probe_accuracy), fontsize=7, xytext=(4, -3),
                            textcoords="offset points", color=cmap(g % 10))
        rho = spearman(rows, score)
        ax.set_title(f"{label} against probe accuracy" + ("" if rho is None else f" (Spearman {rho:+.2f})"))
        ax.set_xlabel(f"{label} (higher should transfer better)")
        ax.set_ylabel("linear-probe accuracy (5-fold CV)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)


def compare_figure(result: dict, path: Path) -> Path:
    """Accuracy against labelled images per class (mean and seed spread), and wall time per method."""
    summary = compare_summary(result["runs"])
    classes = len(result["classes"])
    shots = list(dict.fromkeys(str(r["shots"]) for r in result["runs"]))
    methods = list(dict.fromkeys(r["method"] for r in result["runs"]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for i, method in enumerate(methods):
        stats = [summary[(method, k)] for k in shots]
        x = [s["images"] / classes for s in stats]
        mean = np.array([s["accuracy"] for s in stats])
        spread = np.array([s["std"] for s in stats])
        color = plt.get_cmap("tab10")(i)
        left.plot(x, mean, "o-", color=color, label=method)
        left.fill_between(x, mean - spread, mean + spread, color=color, alpha=0.2)
        right.plot(x, [s["seconds"] for s in stats], "o-", color=color, label=method)
    first = methods[0]
    ticks = [summary[(first, k)]["images"] / classes for k in shots]
    labels = [k if k != "all" else f"all ({t:.0f})" for k, t in zip(shots, ticks, strict=True)]
    left.axhline(1 / classes, color="grey", linestyle=":", label="chance")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xticks(ticks, labels)
        ax.minorticks_off()
        ax.set_xlabel("labelled training images per class (log scale)")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    left.set_ylabel("test accuracy")
    left.set_ylim(0, 1.02)
    left.set_title(f"accuracy (mean, band = ± 1 std over {max(s['seeds'] for s in summary.values())} seeds)")
    right.set_yscale("log")
    right.set_ylabel("wall time to fit or train (s, log scale)")
    right.set_title("time (frozen features extracted once beforehand)")
    return save_figure(fig, path)
