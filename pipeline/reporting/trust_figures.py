"""The report's figures about trust: reliability diagrams (is a 0.9 right nine times in ten?) before and
after each head's calibration, and the accuracy-coverage curve of answering only the confident images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.heads.scores import ECE_BINS, accuracy_coverage, expected_calibration_error, reliability
from pipeline.reporting.figures import plt, save_figure


def _curve(ax: plt.Axes, y: np.ndarray, proba: np.ndarray, label: str, color: str) -> None:
    curve = reliability(y, proba)
    ax.plot(curve.confidence, curve.accuracy, "-", color=color,
            label=f"{label} (ECE {expected_calibration_error(y, proba):.3f})")
    ax.scatter(curve.confidence, curve.accuracy, s=np.clip(curve.count * 2.0, 9, 120), color=color, zorder=3)


def reliability_figure(heads: dict[str, tuple[np.ndarray, np.ndarray | None, str]], y: np.ndarray,
                       path: Path) -> Path:
    """One panel per head: test accuracy against mean top probability in 15 equal-width bins (marker
    size: images in the bin), after calibration and, where it was calibrated, before. `heads`: name ->
    (probabilities, probabilities before calibration or None, method)."""
    cols = min(3, len(heads))
    rows = int(np.ceil(len(heads) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, (proba, before, method)) in zip(axes.flat, heads.items(), strict=False):
        ax.axis("on")
        ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
        if before is not None:
            _curve(ax, y, before, "before", "#8c8c8c")
        _curve(ax, y, proba, method if before is not None else "calibration none", "#4c72b0")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(f"top probability ({ECE_BINS} bins)")
        ax.set_ylabel("test accuracy in the bin")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    return save_figure(fig, path)


def coverage_figure(heads: dict[str, tuple[np.ndarray, float | None]], y: np.ndarray, path: Path) -> Path:
    """Accuracy on the answered test images against the share answered, each head answering its most
    confident images first; a head with a reject threshold is marked where its threshold puts it.
    `heads`: name -> (probabilities, reject threshold or None)."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, (name, (proba, threshold)) in enumerate(heads.items()):
        color = plt.get_cmap("tab10")(i % 10)
        coverage, accuracy = accuracy_coverage(y, proba)
        ax.plot(coverage, accuracy, "-", color=color, label=name)
        if threshold is not None:
            answered = proba.max(axis=1) >= threshold
            if answered.any():
                right = (proba.argmax(axis=1) == y)[answered].mean()
                ax.plot([answered.mean()], [right], "D", color=color, markersize=8,
                        label=f"{name}: reject below {threshold:.2f}")
    ax.set_xlabel("coverage: share of test images answered (most confident first)")
    ax.set_ylabel("accuracy on the answered images")
    ax.set_xlim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("accuracy-coverage: what answering unknown below a threshold buys")
    return save_figure(fig, path)
