"""Stage 3 as a user runs it: fine-tuning and the transfer-vs-scratch comparison, each followed by its
figures. The tuning layer computes and saves results; drawing them is done here, after they are saved,
so a plotting failure loses nothing computed (and matplotlib loads only for these runs)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.tuning.compare import CompareOptions
from pipeline.tuning.finetune import FinetuneOptions, FinetuneResult


def run_finetune(options: FinetuneOptions, progress: bool = True,
                 on_epoch: Callable[[int, dict], None] | None = None) -> FinetuneResult:
    """Fine-tune and save the backbone (`finetune.json` in `options.out`), then draw `finetune.png`."""
    from pipeline.reporting.figures import finetune_figure
    from pipeline.tuning.finetune import finetune

    result = finetune(options, progress=progress, on_epoch=on_epoch)
    finetune_figure(result.metrics, Path(options.out) / "finetune.png")
    return result


def run_compare(options: CompareOptions, progress: bool = True) -> dict:
    """Every (shots, seed) run (`compare.json` in `options.out`), then `compare.png` and `compare.html`."""
    from pipeline.reporting.pages import compare_report
    from pipeline.tuning.compare import compare

    result = compare(options, progress=progress)
    compare_report(Path(options.out), result)
    return result
