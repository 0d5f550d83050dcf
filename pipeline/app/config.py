"""YAML run configs: typed models, validated in full before any work starts.

`RunConfig` is the contract of a run config: every section and key with its type, default and
description (docs/reference/config.md is generated from these models; `pipeline schema` rewrites it).
Defaults come from the layer that uses them: `features:` from `pipeline.features.settings`, the heads'
options from `pipeline.heads.spec`, `finetune:` and `compare:` from `pipeline.tuning.options`.
Every error names the file, the line and column, and the key, so a typo costs seconds, not a run:
`run.yaml:7:5: 'features.batch_size' must be a positive integer, got 'many'`.
Command-line options override the config's values.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, PositiveInt

from pipeline.app.tracking import TrackingSection, tracking_shorthand
from pipeline.core.configfile import ConfigFile, existing, from_config_folder, near_config
from pipeline.core.errors import ConfigError, PipelineError
from pipeline.core.names import DEFAULT_BACKBONE
from pipeline.core.schema import (
    Fraction,
    Level,
    NonNegativeFinite,
    PositiveFinite,
    Section,
    dataclass_default,
    one_of,
    option,
)
from pipeline.features.settings import ExtractSettings
from pipeline.heads.spec import AnyHead, HeadSpec
from pipeline.tuning.options import INITS, CompareOptions, FinetuneOptions, TrainSettings

logger = logging.getLogger(__name__)


def _none_is_empty(value: Any) -> Any:
    """An empty section (`features:` with every key commented out) is a section of defaults."""
    return {} if value is None else value


def _splits(value: Any) -> Any:
    """`data: FOLDER` is one split named data."""
    return {"data": value} if isinstance(value, str) else _none_is_empty(value)


DataFolder = Annotated[Path, Field(strict=False), AfterValidator(near_config), AfterValidator(existing("folder"))]
DataSplits = Annotated[dict[str, DataFolder],
                       BeforeValidator(_splits, json_schema_input_type=str | dict[str, str] | None)]


class FeaturesSection(ExtractSettings):
    """`features:` what is extracted and how (cache_dir and weights relative to the config file's folder)."""

    backbones: list[str] | Literal["auto"] | None = option(
        None, accepts="a list of backbone names, or auto (rank the candidates, use the best)",
        about=f"registered backbones to extract (default: [{DEFAULT_BACKBONE}]); auto ranks the candidates by "
              "LogME on the training split and uses the best")
    candidates: list[str] | None = option(
        None, accepts="a list of backbone names for backbones: auto to rank",
        about="what backbones: auto ranks (default: every registered backbone whose weights are on disk, and "
              "the curated timm zoo when downloads are allowed)")
    layers: list[str] | None = option(
        None, accepts="a list of layer names (NAME or BACKBONE:NAME)",
        about="tap points (default: each backbone's last feature block); a run extracts its heads' sources")


_FT_TRAIN: TrainSettings = dataclass_default(FinetuneOptions, "train")  # the training loop's fine-tuning defaults
_POSITIVE = "a finite positive number"
_NON_NEGATIVE = "a finite number >= 0"
_FRACTION = "a number from 0 up to (not including) 1"
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]  # what NumPy and scikit-learn take as a seed
_SEED = "an integer from 0 to 4294967295"


class FinetuneSection(Section):
    """`finetune:` stage 3 after the heads, on data.train (and data.test), with features:' cache, device and
    precision; the options of `pipeline finetune`. Value ranges are checked with the section, before any work."""

    backbone: str | None = option(None, accepts="a backbone name (default: the first of features.backbones)",
                                  about="backbone to start from (default: the first of features.backbones)")
    unfreeze: str = option(dataclass_default(FinetuneOptions, "unfreeze"), accepts="head, all or last:N",
                           about="what trains besides the new linear layer: nothing, the N blocks nearest the head "
                                 "(efficientnet_lite0 has 18), or every block")
    lr: PositiveFinite = option(_FT_TRAIN.lr, accepts=_POSITIVE, about="learning rate of the new layer")
    lr_decay: PositiveFinite = option(dataclass_default(FinetuneOptions, "lr_decay"), accepts=_POSITIVE,
                             about="each earlier block learns at this factor times the next block's rate")
    weight_decay: NonNegativeFinite = option(_FT_TRAIN.weight_decay, accepts=_NON_NEGATIVE, about="AdamW weight decay")
    epochs: PositiveInt = option(_FT_TRAIN.epochs, accepts="a positive integer",
                                 about="epochs to train (fewer only when patience stops the run early)")
    warmup: NonNegativeFinite = option(_FT_TRAIN.warmup, accepts=_NON_NEGATIVE,
                                       about="epochs of linear warm-up before cosine decay")
    label_smoothing: Fraction = option(_FT_TRAIN.label_smoothing, accepts=_FRACTION,
                                       about="label smoothing of the loss")
    init: Literal[INITS] = option(
        dataclass_default(FinetuneOptions, "init"), accepts=one_of(INITS),
        about="probe: start the new layer from the logistic-regression probe on cached features (LP-FT); "
              "random: PyTorch's default initialisation")
    probe_C: PositiveFinite | None = option(dataclass_default(FinetuneOptions, "probe_C"),
                                            accepts=f"{_POSITIVE}, or null",
                                   about="the probe's C (default: chosen by 5-fold cross-validation)")
    train_bn: bool = option(dataclass_default(FinetuneOptions, "train_bn"), accepts="true or false",
                            about="let BatchNorm layers of unfrozen blocks learn and update statistics")
    val_fraction: Fraction = option(dataclass_default(FinetuneOptions, "val_fraction"), accepts=_FRACTION,
                                 about="stratified share of the training folder held out to choose what is kept: "
                                       "the best epoch, or the linear probe when no epoch beats it there; 0 for "
                                       "none: train every epoch, keep the last")
    guard_alpha: Level = option(_FT_TRAIN.guard_alpha, accepts="a number above 0 up to 1",
                                about="with a held-out part: the best trained epoch replaces the starting weights "
                                      "(the probe) when it beats them there: by any lead at 1 (the default, chosen "
                                      "by cross-validation), by more than chance at a lower level (a one-sided "
                                      "exact McNemar test)")
    patience: PositiveInt = option(_FT_TRAIN.patience, accepts="a positive integer",
                                   about="with a held-out part: epochs without a better held-out accuracy "
                                         "before stopping (the default equals the default epochs: no early stopping)")
    batch_size: PositiveInt = option(_FT_TRAIN.batch_size, accepts="a positive integer", about="images per step")
    seed: Seed = option(_FT_TRAIN.seed, accepts=_SEED, about="seed of the split, shuffling and augmentation")
    name: str | None = option(None, accepts="the id of the saved backbone",
                              about="id of the saved backbone (default: BACKBONE_ft_<name of output_dir>)")
    backbones_dir: Annotated[str | None, AfterValidator(from_config_folder("finetune.backbones_dir"))] = option(
        None, accepts="a folder path (relative to the config file's folder)",
        about="where the backbone is saved (default: the first folder of $PIPELINE_BACKBONES, else backbones/)")
    ensemble: bool = option(dataclass_default(FinetuneOptions, "ensemble"), accepts="true or false",
                            about="keep the last epoch's network averaged with the linear probe, saved as one twin "
                                  "backbone (the parent's blocks shared, the trained ones run in both versions); "
                                  "the probe is kept instead when the ensemble is below it on the held-out part. "
                                  "On by default where it can be made (LP-FT with trained blocks); off: the "
                                  "held-out part judges the epochs (the best one, or the probe)")
    resume: bool = option(dataclass_default(FinetuneOptions, "resume"), accepts="true or false",
                          about="continue from the checkpoint in output_dir/finetune (same options needed)")


Shots = list[PositiveInt | Literal["all"]]


class CompareSection(Section):
    """`compare:` transfer vs. training from scratch on data.train, scored on data.test, with features:'
    cache, device and precision; the options of `pipeline compare`."""

    backbone: str | None = option(None, accepts="a backbone name (default: the first of features.backbones)",
                                  about="backbone for the probe and fine-tuning (default: the first of "
                                        "features.backbones)")
    unfreeze: str = option(dataclass_default(CompareOptions, "unfreeze"), accepts="head, all or last:N",
                           about="fine-tuning's blocks")
    shots: Shots = option(["all" if k is None else k for k in dataclass_default(CompareOptions, "shots")],
                          accepts="a list of labelled images per class: positive integers or all",
                          about="labelled images per class of each draw")
    seeds: list[Seed] = option(dataclass_default(CompareOptions, "seeds"), accepts=f"a list of seeds, each {_SEED}",
                              about="seeds of the k-shot draws")
    finetune_steps: PositiveInt = option(dataclass_default(CompareOptions, "finetune_steps"),
                                         accepts="a positive integer", about="optimizer steps of each fine-tuning run")
    scratch_steps: PositiveInt = option(dataclass_default(CompareOptions, "scratch_steps"),
                                        accepts="a positive integer", about="optimizer steps of each from-scratch run")
    scratch_size: int = option(dataclass_default(CompareOptions, "scratch_size"),
                               accepts="an input size in pixels (at least 16)",
                               about="input size of the from-scratch CNN")
    probe_C: PositiveFinite = option(dataclass_default(CompareOptions, "probe_C"), accepts=_POSITIVE,
                            about="the linear probe's C, fixed: with one image per class there is nothing to "
                                  "cross-validate")
    batch_size: PositiveInt = option(dataclass_default(CompareOptions, "batch_size"), accepts="a positive integer",
                                     about="images per step")


class RunConfig(ConfigFile):
    """A run config (`pipeline run CONFIG`; `extract` and `rank` read its data: and features:)."""

    data: DataSplits = option(
        default_factory=dict, accepts="a folder path, or a mapping of split name to folder path",
        about="image folders by split (a run needs labelled train: and test:); relative paths are taken from "
              "the config file's folder")
    features: Annotated[FeaturesSection, BeforeValidator(_none_is_empty)] = option(
        default_factory=dict, validate_default=True, accepts="a mapping of feature-extraction settings",
        about="what is extracted and how")
    heads: list[AnyHead] | None = option(None, accepts="a list of heads, each {name: NAME, type: TYPE, ...}",
                                         about="the heads a run fits on the cached features (one table per type below)")
    output_dir: Annotated[str | None, AfterValidator(from_config_folder("output_dir"))] = option(
        None, accepts="a folder for the run's models, metrics and report",
        about="where a run writes (required by pipeline run; relative to the config file's folder); a folder "
              "another config wrote is refused unless pipeline run --overwrite")
    memory_budget_mb: PositiveInt = option(4096, accepts="a positive integer",
                                           about="past it, a head's training features are fitted out of core")
    finetune: FinetuneSection | None = option(None, accepts="a mapping of fine-tuning settings (stage 3)",
                                              about="fine-tune a backbone after the heads (keys below)")
    compare: CompareSection | None = option(None, accepts="a mapping of transfer-vs-scratch settings",
                                            about="compare transfer with training from scratch (keys below)")
    tracking: Annotated[TrackingSection | None, BeforeValidator(tracking_shorthand,
                                                                json_schema_input_type=str | dict | None)] = option(
        None, accepts="mlflow, or a mapping of tracking settings",
        about="record the run (config, metrics, figures, heads) in MLflow (keys below)")


def extract_settings(config_path: str | os.PathLike | None, data: str | os.PathLike | None,
                     overrides: dict[str, Any]) -> tuple[dict[str, Path], dict[str, Any]]:
    """(data sources, keyword arguments for `extract`) from a config (if any), then `overrides`: the
    options given on the command line (None values are not given). `data` replaces the config's data."""
    config = RunConfig.load(config_path) if config_path else RunConfig()
    features = config.features.model_dump(exclude={"candidates"})
    if features["backbones"] == "auto":  # extract (or rank) every candidate
        features["backbones"] = auto_candidates(config.features.candidates)
    features.update({k: v for k, v in overrides.items() if v is not None})
    sources = {"data": Path(data)} if data else config.data
    if not sources:
        raise ConfigError("nothing to extract: pass --data DIR, or --config FILE with a data: section")
    return sources, features


def auto_candidates(candidates: list[str] | None) -> list[str]:
    """What `backbones: auto` chooses from: the config's candidates, else every backbone whose weights are
    on disk and, when downloads are allowed, the curated timm zoo too (logging what it will fetch and how
    much). Each is checked to be registered before any work."""
    from pipeline.models.download import offline
    from pipeline.models.registry import get_spec, list_backbones
    from pipeline.models.timm_zoo import CURATED
    from pipeline.models.weights import weights_on_disk

    if candidates:
        for name in candidates:
            get_spec(name)
        return list(candidates)
    available, to_fetch = [], []
    for name in list_backbones():
        spec = get_spec(name)
        if weights_on_disk(spec) is not None:
            available.append(name)
        elif name in CURATED and spec.remote is not None and not offline():
            to_fetch.append(spec)
    if to_fetch:
        total = sum(spec.remote.size for spec in to_fetch) / 1e6
        logger.info(f"backbones: auto will download {len(to_fetch)} backbones not on disk, about {total:,.0f} MB: "
                    + ", ".join(f"{s.name} ({s.remote.size / 1e6:,.0f} MB)" for s in to_fetch)
                    + "; features.candidates lists what to rank, --offline ranks only what is on disk")
    return available + [spec.name for spec in to_fetch]


def head_specs(config: RunConfig) -> list[HeadSpec]:
    """The `heads:` list as HeadSpecs, their sources resolved against features.backbones and the registry."""
    from pipeline.models.registry import get_spec

    auto = config.features.backbones == "auto"
    backbones = auto_candidates(config.features.candidates) if auto else (
        config.features.backbones or [DEFAULT_BACKBONE])
    for i, name in enumerate([] if auto else config.features.backbones or []):
        try:
            get_spec(name)
        except PipelineError as exc:  # named where it is written, before any head uses it
            raise config.error(("features", "backbones", i), f"'features.backbones[{i}]': {exc}") from None
    specs: list[HeadSpec] = []
    first_use: dict[str, int] = {}
    for i, head in enumerate(config.heads or []):
        where = f"'heads[{i}]'"
        if head.name in first_use:
            raise config.error(("heads", i, "name"), f"'heads[{i}].name': {head.name!r} is used twice (first by "
                                                      f"heads[{first_use[head.name]}])")
        first_use[head.name] = i
        given = head.given_sources()
        key = ("heads", i, "sources" if head.fuses else "source")
        if auto and given:
            raise config.error(key, f"{where}: with features.backbones: auto a head takes the chosen backbone; "
                                    "remove its source/sources, or list the backbones")
        resolved = []
        for j, source in enumerate(given or (backbones if head.fuses else backbones[:1])):
            at = (*key, j) if given and head.fuses else key if given else ("heads", i)
            backbone, _, layer = source.partition(":")
            if backbone not in backbones:
                raise config.error(at, f"{where}: source {source!r} is not among features.backbones "
                                       f"({', '.join(backbones)})")
            try:
                resolved.append(f"{backbone}:{get_spec(backbone).layer(layer or None)}")
            except PipelineError as exc:
                raise config.error(at, f"{where}: {exc}") from None
        specs.append(HeadSpec(head.name, head.type, resolved, head.options()))
    if not specs:
        raise config.error(("heads",), "'heads' must name at least one head")
    return specs


def _backbone(section: FinetuneSection | CompareSection, features: dict) -> str:
    return section.backbone or (features.get("backbones") or [DEFAULT_BACKBONE])[0]


def finetune_options(config: RunConfig, output_dir: Path, features: dict) -> FinetuneOptions | None:
    """The run config's finetune: section as FinetuneOptions (None without one), checked before any work.
    Data comes from data.train/test, the cache, device and precision from `features` (extract's keywords)."""
    from pipeline.tuning.finetune import check_options

    section = config.finetune
    if section is None:
        return None
    values = section.model_dump(exclude={"backbone", "name"})
    train = {key: values.pop(key) for key in list(values) if key in TrainSettings.__dataclass_fields__}
    backbone = _backbone(section, features)
    options = FinetuneOptions(config.data["train"], config.data.get("test"), backbone=backbone,
                              name=section.name or f"{backbone}_ft_{output_dir.name}", **values,
                              out=output_dir / "finetune", cache_dir=features["cache_dir"],
                              train=TrainSettings(**train, device=features["device"], precision=features["precision"]))
    try:
        check_options(options)
    except PipelineError as exc:
        raise config.error(("finetune",), f"'finetune': {exc}") from None
    return options


def compare_options(config: RunConfig, output_dir: Path, features: dict) -> CompareOptions | None:
    """The run config's compare: section as CompareOptions (None without one), checked before any work.
    It trains on data.train and scores on data.test; cache, device and precision come from `features`."""
    from pipeline.tuning.compare import check_options

    section = config.compare
    if section is None:
        return None
    if "train" not in config.data or "test" not in config.data:
        raise config.error(("compare",), "'compare' needs data.train and data.test (labelled folders)")
    values = section.model_dump(exclude={"backbone"})
    values["shots"] = [None if k == "all" else k for k in section.shots]
    options = CompareOptions(config.data["train"], config.data["test"], backbone=_backbone(section, features),
                             **values, cache_dir=features["cache_dir"], out=output_dir / "compare",
                             device=features["device"], precision=features["precision"])
    try:
        check_options(options)
    except PipelineError as exc:
        raise config.error(("compare",), f"'compare': {exc}") from None
    return options
