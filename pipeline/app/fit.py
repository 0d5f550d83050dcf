"""`pipeline fit`: one head on one labelled folder, saved as a bundle. With no test split, its
cross-validated accuracy is the only score there is."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.app.config import RunConfig, head_specs
from pipeline.core.names import DEFAULT_BACKBONE
from pipeline.features.extract import extract
from pipeline.features.settings import DEFAULTS
from pipeline.features.sources import feature_set, matrix, source_meta
from pipeline.features.trained_on import warn_trained_on
from pipeline.heads.bundle import HeadBundle, save_bundle
from pipeline.heads.fit import FittedHead, fit_head
from pipeline.heads.zero_shot import check_source, prior_for
from pipeline.images.data import require_labelled, scan


@dataclass
class FitResult:
    fitted: FittedHead
    path: Path  # the saved bundle; its checksum is beside it, in `path.sha256`
    skipped: list[tuple[str, str]]  # (path, reason) of the files of `data` that were not used
    trained_on: dict[str, int]  # backbone -> images of `data` that trained its network (its CV is optimistic)


def fit(data: str | os.PathLike, head_type: str, out: str | os.PathLike, name: str = "head",
        backbones: list[str] | None = None, sources: list[str] | None = None, cache_dir: str = DEFAULTS.cache_dir,
        progress: bool = True, options: dict | None = None) -> FitResult:
    """Fit a head of `head_type` on the labelled folder `data` and save it at `out`.

    `sources` are `BACKBONE[:LAYER]` (several for a pca_fusion head; default: the first backbone's
    default layer); `backbones` default to those the sources name, else the default backbone. `options`
    are more keys of the head (calibration, reject, class_weight, tune_threshold), checked exactly as a run
    config's `heads:` entry."""
    backbones = backbones or list(dict.fromkeys(s.split(":")[0] for s in sources or [])) or [DEFAULT_BACKBONE]
    head: dict = {**(options or {}), "name": name, "type": head_type}
    if sources:
        fusion = head_type == "pca_fusion"  # a single-source head takes one source as a string
        head["sources" if fusion else "source"] = sources if fusion or len(sources) > 1 else sources[0]
    config = RunConfig.parse({"data": {"train": str(Path(data).absolute())}, "heads": [head],
                              "features": {"backbones": backbones, "cache_dir": cache_dir}}, "command line")
    (spec,) = head_specs(config)
    check_source(spec)
    dataset = require_labelled(scan(config.data["train"]), f"--data {data}")
    report = extract(dataset, progress=progress, **{**config.features.model_dump(exclude={"candidates"}),
                                                    "layers": spec.sources})
    trained_on = warn_trained_on(report.feature_sets.values(), f"--data {data}")
    X, dims = matrix(report.feature_sets, spec.sources)
    first = feature_set(report.feature_sets, spec.sources[0])
    fitted = fit_head(spec, X, first.labels, dims, class_names=first.class_names,
                      prior=prior_for(spec, first.class_names))
    path = save_bundle(out, HeadBundle.of(fitted, first.class_names,
                                          source_meta(report.feature_sets, spec.sources, Path(cache_dir))))
    return FitResult(fitted, path, report.skipped, trained_on)
