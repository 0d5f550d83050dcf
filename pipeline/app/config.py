"""YAML run configs: validated in full before any work starts.

Every error names the file, the key and what was expected, so a typo costs seconds, not a run.
Command-line options override the config's values.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.errors import ConfigError, PipelineError, first_line
from pipeline.core.names import DEFAULT_BACKBONE, SAFE_NAME_RULE, is_safe_name

# key -> (accepted types, what the message says is expected)
FEATURES_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "backbones": ((list, str), "a list of backbone names, or auto (rank the candidates, use the best)"),
    "candidates": ((list,), "a list of backbone names for backbones: auto to rank"),
    "layers": ((list,), "a list of layer names (NAME or BACKBONE:NAME)"),
    "cache_dir": ((str,), "a folder path"),
    "device": ((str,), "auto, cpu or cuda"),
    "precision": ((str,), "auto, bf16 or fp32"),
    "batch_size": ((int,), "a positive integer"),
    "shard_size": ((int,), "a positive integer"),
    "scheduler": ((str, type(None)), "a dask.distributed scheduler address"),
    "weights": ((str,), "a local state-dict path"),
}
TOP_LEVEL_KEYS = {"data": "a folder path, or a mapping of split name to folder path",
                  "features": "a mapping of feature-extraction settings",
                  "heads": "a list of heads, each {name: NAME, type: TYPE, ...}",
                  "output_dir": "a folder for the run's models, metrics and report",
                  "memory_budget_mb": "a positive integer: past it, heads are fitted out of core",
                  "finetune": "a mapping of fine-tuning settings (stage 3)",
                  "compare": "a mapping of transfer-vs-scratch settings"}
DEFAULTS: dict[str, Any] = {"cache_dir": "cache", "device": "auto", "precision": "auto", "batch_size": 32,
                            "shard_size": 256, "scheduler": None, "weights": None}


def load_config(path: str | Path) -> dict:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {first_line(exc)}") from None
    return parse_config(raw, path)


def parse_config(raw: object, path: Path) -> dict:
    """Validate a config mapping; `path` names it in messages and anchors its relative data paths."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(f"{path}: unknown key {key!r}; expected one of: {', '.join(TOP_LEVEL_KEYS)}")
    _check_section(raw, "features", FEATURES_KEYS, path, _bad_feature)
    features = raw.get("features") or {}
    for key, kind in (("heads", list), ("output_dir", str), ("memory_budget_mb", int)):
        value = raw.get(key)
        if key in raw and (not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 1)):
            raise ConfigError(f"{path}: '{key}' must be {TOP_LEVEL_KEYS[key]}, got {value!r}")
    _check_section(raw, "finetune", FINETUNE_KEYS, path)
    _check_section(raw, "compare", COMPARE_KEYS, path, _bad_compare)
    return {"data": _data_sources(raw.get("data"), path), "features": features, "heads": raw.get("heads"),
            "output_dir": raw.get("output_dir"), "memory_budget_mb": raw.get("memory_budget_mb", 4096),
            "finetune": raw.get("finetune"), "compare": raw.get("compare"), "path": path}


def _data_sources(data: Any, path: Path) -> dict[str, Path]:
    """Relative data paths are taken from the config file's folder, so a config works from anywhere."""
    if data is None:
        return {}
    if isinstance(data, str):
        data = {"data": data}
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ConfigError(f"{path}: 'data' must be {TOP_LEVEL_KEYS['data']}")
    sources = {}
    for split, folder in data.items():
        resolved = Path(folder) if Path(folder).is_absolute() else path.parent / folder
        if not resolved.exists():
            raise ConfigError(f"{path}: 'data.{split}': folder not found: {resolved}")
        sources[split] = resolved
    return sources


def extract_settings(args: argparse.Namespace) -> tuple[dict[str, Path], dict[str, Any]]:
    """(data sources, keyword arguments for `extract`) from a config and command-line overrides."""
    config = load_config(args.config) if args.config else {"data": {}, "features": {}}
    features = {**DEFAULTS, **config["features"]}
    if features.get("backbones") == "auto":  # extract (or rank) every candidate
        features["backbones"] = auto_candidates(features)
    features.pop("candidates", None)
    overrides = {"backbones": args.backbone, "layers": args.layer, "cache_dir": args.cache,
                 "device": args.device, "precision": args.precision, "batch_size": args.batch_size,
                 "shard_size": args.shard_size, "scheduler": args.scheduler, "weights": args.weights}
    features.update({k: v for k, v in overrides.items() if v is not None})
    sources = {"data": Path(args.data)} if args.data else config["data"]
    if not sources:
        raise ConfigError("nothing to extract: pass --data DIR, or --config FILE with a data: section")
    return sources, features


def auto_candidates(features: dict) -> list[str]:
    """What `backbones: auto` chooses from: the config's candidates, else every backbone whose weights
    are on disk (each checked to be registered before any work)."""
    from pipeline.models.registry import get_spec, list_backbones

    if features.get("candidates"):
        for name in features["candidates"]:
            get_spec(name)
        return list(features["candidates"])
    available = []
    for name in list_backbones():
        try:
            get_spec(name).locate_weights()
        except PipelineError:
            continue
        available.append(name)
    return available


def head_specs(config: dict) -> list:
    """The `heads:` list as HeadSpecs, every key checked against its type's options."""
    from pipeline.heads.fit import HEAD_OPTIONS, OPTION_CHECKS, HeadSpec
    from pipeline.models.registry import get_spec

    path = config["path"]
    auto = config["features"].get("backbones") == "auto"
    backbones = auto_candidates(config["features"]) if auto else (
        config["features"].get("backbones") or [DEFAULT_BACKBONE])
    specs, names = [], set()
    for i, raw in enumerate(config["heads"] or []):
        where = f"{path}: 'heads[{i}]'"
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or "type" not in raw:
            raise ConfigError(f"{where} must be a mapping with at least name: and type:")
        if raw["type"] not in HEAD_OPTIONS:
            raise ConfigError(f"{where}.type: unknown head type {raw['type']!r}; expected one of: "
                              f"{', '.join(HEAD_OPTIONS)}")
        if not is_safe_name(raw["name"]):
            raise ConfigError(f"{where}.name: {raw['name']!r} must be {SAFE_NAME_RULE} (it names the saved file)")
        if raw["name"] in names:
            raise ConfigError(f"{where}.name: {raw['name']!r} is used twice")
        names.add(raw["name"])
        options = dict(HEAD_OPTIONS[raw["type"]])
        for key, value in raw.items():
            if key in ("name", "type"):
                continue
            if key not in options:
                raise ConfigError(f"{where}.{key}: unknown option for a {raw['type']} head; expected one of: "
                                  f"{', '.join(options)}")
            check, expected = OPTION_CHECKS[key]
            if not check(value):
                raise ConfigError(f"{where}.{key} must be {expected}, got {value!r}")
            options[key] = value
        if auto and (options.get("source") or options.get("sources")):
            raise ConfigError(f"{where}: with features.backbones: auto a head takes the chosen backbone; "
                              "remove its source/sources, or list the backbones")
        sources = options.pop("sources", None) or options.pop("source", None) or (
            backbones if raw["type"] == "pca_fusion" else backbones[:1])
        sources = [sources] if isinstance(sources, str) else list(sources)
        resolved = []
        for source in sources:
            backbone, _, layer = str(source).partition(":")
            if backbone not in backbones:
                raise ConfigError(f"{where}: source {source!r} is not among features.backbones "
                                  f"({', '.join(backbones)})")
            try:
                resolved.append(f"{backbone}:{get_spec(backbone).layer(layer or None)}")
            except PipelineError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        specs.append(HeadSpec(raw["name"], raw["type"], resolved, options))
    if not specs:
        raise ConfigError(f"{path}: 'heads' must name at least one head")
    return specs


# finetune: key -> (accepted types, what is expected); the values' ranges are checked by pipeline.finetune.
_NUMBER = ((int, float), "a number")
FINETUNE_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "backbone": ((str,), "a backbone name (default: the first of features.backbones)"),
    "unfreeze": ((str,), "head, all or last:N"),
    "lr": _NUMBER, "lr_decay": _NUMBER, "weight_decay": _NUMBER, "warmup": _NUMBER, "label_smoothing": _NUMBER,
    "val_fraction": _NUMBER, "probe_C": _NUMBER,
    "epochs": ((int,), "a positive integer"), "patience": ((int,), "a positive integer"),
    "batch_size": ((int,), "a positive integer"), "seed": ((int,), "an integer"),
    "init": ((str,), "probe or random"), "train_bn": ((bool,), "true or false"),
    "name": ((str,), "the id of the saved backbone"), "backbones_dir": ((str,), "a folder path"),
    "resume": ((bool,), "true or false"),
}


# compare: key -> (accepted types, what is expected); values are checked by pipeline.compare.check_options.
COMPARE_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "backbone": FINETUNE_KEYS["backbone"], "unfreeze": FINETUNE_KEYS["unfreeze"],
    "shots": ((list,), "a list of labelled images per class: positive integers or all"),
    "seeds": ((list,), "a list of integer seeds"),
    "finetune_steps": ((int,), "a positive integer"), "scratch_steps": ((int,), "a positive integer"),
    "scratch_size": ((int,), "an input size in pixels (at least 16)"),
    "probe_C": _NUMBER, "batch_size": ((int,), "a positive integer"),
}


def _bad_feature(key: str, value: Any) -> bool:
    """What the features: types alone let through: lists of non-strings, counts below one, a word
    other than auto for backbones."""
    bad_list = isinstance(value, list) and not all(isinstance(v, str) for v in value)
    bad_count = isinstance(value, int) and value < 1
    return bad_list or bad_count or (key == "backbones" and isinstance(value, str) and value != "auto")


def _bad_compare(key: str, value: Any) -> bool:
    """The items of compare.shots (positive integers or all) and compare.seeds (integers)."""
    def integer(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if key == "shots":
        return not all(v == "all" or (integer(v) and v > 0) for v in value)
    return key == "seeds" and not all(integer(v) for v in value)


def _check_section(raw: dict, name: str, keys: dict[str, tuple[tuple[type, ...], str]], path: Path,
                   bad: Callable[[str, Any], bool] | None = None) -> None:
    """Keys and value types of an optional section; bool is never taken for a number; `bad` adds
    the section's own value rules."""
    section = raw.get(name)
    if section is None:
        return
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: '{name}' must be {TOP_LEVEL_KEYS[name]}")
    for key, value in section.items():
        if key not in keys:
            raise ConfigError(f"{path}: unknown key '{name}.{key}'; expected one of: {', '.join(keys)}")
        types, expected = keys[key]
        if (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
                or (bad is not None and bad(key, value))):
            raise ConfigError(f"{path}: '{name}.{key}' must be {expected}, got {value!r}")


def finetune_options(config: dict, output_dir: Path, features: dict):
    """The run config's finetune: section as FinetuneOptions (None without one), checked before any work.
    Data comes from data.train/test, the cache, device and precision from features:."""
    from pipeline.tuning.finetune import EPOCHS, LR, FinetuneOptions, check_options
    from pipeline.tuning.training import TrainSettings

    section = config.get("finetune")
    if section is None:
        return None
    section = dict(section)
    train = {k: section.pop(k) for k in ("epochs", "lr", "weight_decay", "warmup", "label_smoothing", "batch_size",
                                          "patience", "seed") if k in section}
    backbone = section.pop("backbone", None) or (features.get("backbones") or [DEFAULT_BACKBONE])[0]
    options = FinetuneOptions(config["data"]["train"], config["data"].get("test"), **{
        "backbone": backbone, "name": f"{backbone}_ft_{output_dir.name}", **section,
        "out": output_dir / "finetune", "cache_dir": features["cache_dir"]},
        train=TrainSettings(**{"lr": LR, "epochs": EPOCHS, **train}, device=features["device"],
                            precision=features["precision"]))
    try:
        check_options(options)
    except PipelineError as exc:
        raise ConfigError(f"{config['path']}: 'finetune': {exc}") from None
    return options


def compare_options(config: dict, output_dir: Path, features: dict):
    """The run config's compare: section as CompareOptions (None without one), checked before any work.
    It trains on data.train and scores on data.test; cache, device and precision come from features:."""
    from pipeline.tuning.compare import CompareOptions, check_options

    section = config.get("compare")
    if section is None:
        return None
    where = f"{config['path']}: 'compare"  # closed by each message
    if "train" not in config["data"] or "test" not in config["data"]:
        raise ConfigError(f"{where}' needs data.train and data.test (labelled folders)")
    section = dict(section)  # its keys and items were checked with the config
    if "shots" in section:
        section["shots"] = [None if s == "all" else s for s in section["shots"]]
    backbone = section.pop("backbone", None) or (features.get("backbones") or [DEFAULT_BACKBONE])[0]
    options = CompareOptions(config["data"]["train"], config["data"]["test"], backbone=backbone, **section,
                             cache_dir=features["cache_dir"], out=output_dir / "compare", device=features["device"],
                             precision=features["precision"])
    try:
        check_options(options)
    except PipelineError as exc:
        raise ConfigError(f"{where}': {exc}") from None
    return options
