"""The run report: one self-contained HTML page (figures inlined) plus each figure as a PNG file."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support  # noqa: E402

from pipeline.features.extract import FeatureSet  # noqa: E402
from pipeline.tuning.compare import compare_rows, compare_summary  # noqa: E402

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;color:#222}
h1{margin-bottom:.2rem} .sub{color:#666;margin-top:0} table{border-collapse:collapse;margin:1rem 0}
th,td{padding:.35rem .8rem;border-bottom:1px solid #ddd;text-align:right} th:first-child,td:first-child{text-align:left}
.heads td:nth-child(2),.heads td:nth-child(3),.heads td:last-child{text-align:left}
td.cand{max-width:24rem}
tr.best{background:#eef6ee;font-weight:600} img{max-width:100%;border:1px solid #eee} figure{margin:1.5rem 0}
figcaption{color:#555;font-size:.9rem} code{background:#f4f4f4;padding:0 .25rem}
"""


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
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
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)


def per_class_figure(precision: np.ndarray, recall: np.ndarray, classes: list[str], path: Path) -> Path:
    x = np.arange(len(classes))
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(classes) + 2), 4))
    ax.bar(x - 0.2, precision, 0.4, label="precision", color="#4c72b0")
    ax.bar(x + 0.2, recall, 0.4, label="recall", color="#dd8452")
    ax.set_xticks(x, classes, rotation=60, ha="right")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower right")
    ax.set_title("per-class precision and recall (best head, test split)")
    return _save(fig, path)


def finetune_figure(metrics: dict, path: Path) -> Path:
    """Training loss (and validation accuracy, with a validation split) per epoch, and the test accuracy
    of the linear probe the run started from against the fine-tuned network's."""
    history = metrics["history"]
    epochs = [h["epoch"] for h in history]
    fig, (curve, bars) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]},
                                      layout="constrained")
    curve.plot(epochs, [h["loss"] for h in history], "o-", color="#4c72b0", label="training loss")
    curve.set_xlabel("epoch")
    curve.set_ylabel("training loss (label-smoothed cross-entropy)")
    curve.set_xticks([0, *epochs])
    curve.grid(alpha=0.3)
    curve.axvline(metrics["best_epoch"], color="grey", linestyle=":", label=f"kept: epoch {metrics['best_epoch']}")
    legend_axis = curve
    if metrics.get("start_val_accuracy") is not None:
        legend_axis = curve.twinx()
        legend_axis.plot([0, *epochs], [metrics["start_val_accuracy"], *[h.get("val_accuracy") for h in history]],
                         "s--", color="#dd8452", label="validation accuracy (epoch 0: the starting weights)")
        legend_axis.set_ylabel("validation accuracy")
        legend_axis.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=1))
    handles = [h for ax in dict.fromkeys((curve, legend_axis)) for h in ax.get_legend_handles_labels()[0]]
    legend_axis.legend(handles=handles, loc="best", fontsize=8)
    curve.set_title(f"training: {metrics['backbone']}")
    scores = [("linear probe alone", metrics.get("probe_accuracy")), ("fine-tuned", metrics.get("accuracy"))]
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
    return _save(fig, path)


def _finetune_section(out: Path, metrics: dict) -> str:
    ft = metrics.get("finetune")
    if ft is None:
        return ""
    probe = "-" if ft.get("probe_accuracy") is None else f"{ft['probe_accuracy']:.1%}"
    figure = out / "finetune" / "finetune.png"
    return ("<h2>Fine-tuning</h2><p class=\"sub\">The config's finetune: section; the result is registered as "
            f"backbone <code>{html.escape(ft['backbone'])}</code> (use it in features.backbones).</p>"
            "<table><tr><th>backbone</th><th>test accuracy</th><th>macro-F1</th><th>linear probe alone</th>"
            f"<th>epoch kept</th><th>seconds</th></tr><tr><td>{html.escape(ft['backbone'])}</td>"
            f"<td>{ft['accuracy']:.1%}</td><td>{ft['macro_f1']:.3f}</td><td>{probe}</td>"
            f"<td>{ft.get('best_epoch', '-')}</td><td>{ft['seconds']:.1f}</td></tr></table>"
            + (_figure_html(figure, "Fine-tuning: loss per epoch and test accuracy against the probe.",
                            "finetune/finetune.png") if figure.is_file() else ""))


def _params(best_params: dict) -> str:
    return ", ".join(f"{key.split('__')[-1]}={value}" for key, value in best_params.items())


def _figure_html(path: Path, caption: str, href: str | None = None) -> str:
    """The PNG inlined (the page stays self-contained) and linked; `href` when it is not beside the page."""
    data = base64.b64encode(path.read_bytes()).decode()
    href = html.escape(href or path.name)
    return (f'<figure><a href="{href}"><img alt="{html.escape(caption)}" '
            f'src="data:image/png;base64,{data}"></a><figcaption>{html.escape(caption)} '
            f'(<a href="{href}">{href}</a>)</figcaption></figure>')


def _ranking_section(metrics: dict) -> str:
    if "rank" not in metrics:
        return ""
    return ("<h2>Backbone chosen by ranking</h2><p class=\"sub\">features.backbones: auto ranked the candidates "
            "by LogME on the training split (no probes) and used the first.</p>" + rank_table(metrics["rank"]))


def write_report(out: Path, metrics: dict, results: dict, best: str, test: FeatureSet, y_test: np.ndarray,
                 classes: list[str]) -> Path:
    """Write the PNG figures and report.html into `out`; return the HTML path."""
    result = results[best]
    figures = [
        (confusion_figure(y_test, result.predicted, classes, f"confusion matrix: {best}", out / "confusion.png"),
         f"Confusion matrix of the best head ({best}) on the test split."),
        (projection_figure(test.features.compute(), y_test, classes,
                           f"test embeddings, {test.backbone} [{test.layer}], PCA", out / "projection.png"),
         "The test images' embeddings projected to two dimensions (PCA), coloured by true class."),
        (worst_figure(test.paths, y_test, result.proba, classes, out / "worst.png"),
         "Worst-classified test images: the lowest probability given to the true class (red: misclassified)."),
    ]
    precision, recall, f1, support = precision_recall_fscore_support(
        y_test, result.predicted, labels=range(len(classes)), zero_division=0)
    figures.append((per_class_figure(precision, recall, classes, out / "per_class.png"),
                    "Per-class precision and recall of the best head."))

    head_rows = "".join(
        f'<tr class="{"best" if name == best else ""}"><td>{html.escape(name)}</td><td>{m["type"]}</td>'
        f'<td>{html.escape(" + ".join(m["sources"]))}</td><td>{m["accuracy"]:.1%}</td><td>{m["macro_f1"]:.3f}</td>'
        f'<td>{"-" if m["cv_accuracy"] is None else format(m["cv_accuracy"], ".1%")}</td>'
        f'<td>{m["fit_seconds"]:.2f}</td>'
        f'<td>{html.escape(_params(m["best_params"]))}</td></tr>'
        for name, m in sorted(metrics["heads"].items(), key=lambda kv: -kv[1]["accuracy"]))
    class_rows = "".join(
        f"<tr><td>{html.escape(c)}</td><td>{p:.2f}</td><td>{r:.2f}</td><td>{f:.2f}</td><td>{int(s)}</td></tr>"
        for c, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True))
    ex = metrics["extract"]
    title = f"Run report: {html.escape(out.name)}"
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>{_STYLE}</style></head><body>
<h1>Run report: {html.escape(out.name)}</h1>
<p class="sub">{len(test.paths)} test images, {len(classes)} classes. Features: {ex["images"]} images,
{ex["computed"]} rows computed, {ex["reused"]} reused from the cache, {ex["skipped"]} files skipped,
{ex["seconds"]:.1f} s. Best head: <b>{html.escape(best)}</b> at {result.accuracy:.1%} test accuracy.</p>
<h2>Heads</h2>
<table class="heads"><tr><th>head</th><th>type</th><th>features</th><th>test accuracy</th><th>macro-F1</th>
<th>CV accuracy</th><th>fit time (s)</th><th>chosen by CV</th></tr>{head_rows}</table>
{_ranking_section(metrics)}{_finetune_section(out, metrics)}{_compare_section(out, metrics)}
<h2>Best head: {html.escape(best)}</h2>
{"".join(_figure_html(p, c) for p, c in figures)}
<h2>Per class</h2>
<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>test images</th></tr>{class_rows}</table>
<p class="sub">Files: <code>metrics.json</code>, <code>predictions.csv</code>, <code>heads/*.skops</code>.</p>
</body></html>"""
    path = out / "report.html"
    path.write_text(page)
    return path


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
    return _save(fig, path)


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def rank_table(rows: list[dict]) -> str:
    """The ranking as an HTML table, best LogME first (rows as `pipeline.rank.as_json` writes them)."""
    body = "".join(
        f'<tr class="{"best" if i == 0 else ""}">'
        f'<td class="cand">{html.escape(r["candidate"]).replace("+", " + ")}</td>'
        f'<td>{r["logme"]:.3f}</td>'
        f'<td>{r["hscore"]:.2f}</td><td>{_cell(r["probe_accuracy"], ".1%")}</td><td>{r["dim"]}</td>'
        f'<td>{_cell(r["images_per_second"], ".0f")}</td><td>{r["cache_bytes"] / 2**20:.1f}</td>'
        f'<td>{r["score_seconds"]:.2f}</td><td>{_cell(r["probe_seconds"], ".2f")}</td></tr>'
        for i, r in enumerate(rows))
    return ("<table><tr><th>candidate</th><th>LogME</th><th>H-score</th><th>probe accuracy</th><th>dim</th>"
            "<th>extraction img/s</th><th>cache MB</th><th>score time (s)</th><th>probe time (s)</th></tr>"
            f"{body}</table>")


def write_rank_report(out: Path, rows: list) -> Path:
    """rank.html (table, and the score plot when probes ran) plus rank_scores.png in `out`."""
    from pipeline.heads.rank import as_json, spearman

    out.mkdir(parents=True, exist_ok=True)
    rhos = {label: spearman(rows, score) for score, label in (("logme", "LogME"), ("hscore", "H-score"))}
    agreement = "; ".join(f"Spearman correlation of {label} with the probe accuracy: {rho:+.2f}"
                          for label, rho in rhos.items() if rho is not None)
    figure = ""
    if any(r.probe_accuracy is not None for r in rows):
        figure = _figure_html(rank_figure(rows, out / "rank_scores.png"),
                              "Training-free scores against the cross-validated linear-probe accuracy.")
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Backbone ranking</title>
<style>{_STYLE}</style></head><body>
<h1>Backbone ranking</h1>
<p class="sub">{len(rows)} candidates, best LogME first. LogME and H-score need no training; the probe is a
standardised logistic regression (C=0.1) scored by 5-fold stratified cross-validation on the same images.
{agreement}.</p>
{rank_table(as_json(rows))}
{figure}
</body></html>"""
    path = out / "rank.html"
    path.write_text(page)
    return path


def _compare_table(rows: list[dict]) -> str:
    cells = "".join(
        f"<tr><td>{html.escape(r['method'])}</td><td>{html.escape(r['shots'])}</td><td>{r['images']:.0f}</td>"
        f"<td>{r['accuracy']:.1%} ± {r['std']:.1%}</td><td>{r['seconds']:.2f}</td></tr>" for r in rows)
    return ("<table><tr><th>method</th><th>labels per class</th><th>training images</th>"
            f"<th>test accuracy (mean ± std)</th><th>seconds</th></tr>{cells}</table>")


_COMPARE_NOTE = ("Fine-tuning starts from the probe (LP-FT), so its time includes the probe's; the frozen "
                 "features were extracted once beforehand, in {:.1f} s, not counted in the times.")


def _compare_section(out: Path, metrics: dict) -> str:
    if "compare" not in metrics:
        return ""
    figure = out / "compare" / "compare.png"
    return ("<h2>Transfer vs. scratch</h2><p class=\"sub\">The config's compare: section: the linear probe, "
            "fine-tuning and a small CNN from scratch trained on the same k-shot draws of the training split. "
            + _COMPARE_NOTE.format(metrics["compare"]["extract_seconds"]) + "</p>"
            + _compare_table(metrics["compare"]["summary"])
            + _figure_html(figure, "Accuracy and time against labelled images per class.", "compare/compare.png"))


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
    return _save(fig, path)


def compare_report(out: Path, result: dict) -> Path:
    """compare.png and compare.html (table of means over seeds) in `out`; returns the HTML path."""
    figure = _figure_html(compare_figure(result, out / "compare.png"),
                          "Transfer against training from scratch on the same k-shot draws.")
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Transfer vs. scratch</title>
<style>{_STYLE}</style></head><body>
<h1>Transfer vs. scratch</h1>
<p class="sub">{result['train_images']} training and {result['test_images']} test images, {len(result['classes'])}
classes. Backbone {html.escape(result['options']['backbone'])}. {_COMPARE_NOTE.format(result['extract_seconds'])}</p>
{_compare_table(compare_rows(result["runs"]))}
{figure}
</body></html>"""
    path = out / "compare.html"
    path.write_text(page)
    return path
