"""Hostile and careless configs: numbers that are not finite, grids the data cannot hold, paths that
depended on the folder a job was started from, an output folder of another config. Each is refused in
one line that names the file, place and key, or handled with a warning that names both sides."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.app.batch import BatchConfig
from pipeline.app.config import CompareSection, FinetuneSection, RunConfig, head_specs
from pipeline.cli.main import main
from pipeline.core.errors import ConfigError
from pipeline.features.settings import ExtractSettings
from pipeline.heads.fit import fit_head
from pipeline.heads.spec import HeadSpec

from .conftest import TINY, config_error, make_folder

# --------------------------------------------------------------------------- numbers

@pytest.mark.parametrize("key,value,accepts", [
    ("heads[0].C", "{name: a, type: logistic_regression, C: .inf}", "a finite positive number or a list of them"),
    ("heads[0].C", "{name: a, type: svm, C: [1.0, .nan]}", "a finite positive number or a list of them"),
    ("heads[0].gamma", "{name: a, type: svm, gamma: [scale, -.inf]}",
     "scale, auto, a finite positive number, or a list of them"),
    ("heads[0].variance_threshold", "{name: a, type: pca_fusion, variance_threshold: .inf}",
     "a finite number >= 0, or null"),
    ("heads[0].C", "{name: a, type: pca_fusion, C: 1.0e+400}", "a finite positive number or a list of them"),
])
def test_head_numbers_must_be_finite(tmp_path, key, value, accepts):
    message = config_error(tmp_path, f"heads:\n  - {value}\n")
    assert message.startswith(":2:") and f"'{key}' must be {accepts}, got" in message


@pytest.mark.parametrize("section,key,value,accepts", [
    ("finetune", "lr", ".inf", "a finite positive number"),
    ("finetune", "lr", "0.0", "a finite positive number"),
    ("finetune", "lr_decay", ".nan", "a finite positive number"),
    ("finetune", "weight_decay", ".inf", "a finite number >= 0"),
    ("finetune", "warmup", "-.inf", "a finite number >= 0"),
    ("finetune", "label_smoothing", "1.0", "a number from 0 up to (not including) 1"),
    ("finetune", "val_fraction", ".nan", "a number from 0 up to (not including) 1"),
    ("finetune", "probe_C", ".inf", "a finite positive number, or null"),
    ("finetune", "seed", "-1", "an integer from 0 to 4294967295"),
    ("compare", "probe_C", ".inf", "a finite positive number"),
    ("compare", "seeds", "[0, 4294967296]", "a list of seeds, each an integer from 0 to 4294967295"),
])
def test_stage_numbers_must_be_finite_and_in_range(tmp_path, section, key, value, accepts):
    message = config_error(tmp_path, f"{section}:\n  {key}: {value}\n")
    assert message.startswith(":2:") and f"'{section}.{key}' must be {accepts}, got" in message


def test_the_command_line_refuses_what_the_config_refuses():
    """`pipeline finetune --lr inf` and `compare --probe-c nan` bypass the config models; the stage's own
    checks refuse them before any work."""
    from pipeline.tuning.compare import check_options as check_compare
    from pipeline.tuning.options import CompareOptions, FinetuneOptions, TrainSettings

    with pytest.raises(ConfigError, match="all finite"):
        TrainSettings(lr=float("inf")).check()
    with pytest.raises(ConfigError, match="finite"):
        check_compare(CompareOptions("d", "t", probe_C=float("nan")))
    from pipeline.tuning.finetune import check_options as check_finetune

    with pytest.raises(ConfigError, match="finite"):
        check_finetune(FinetuneOptions("d", lr_decay=float("inf")))


# --------------------------------------------------------------------------- grids the data cannot hold

def _rows(per_class: int = 10, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(classes), per_class)
    return rng.normal(size=(len(y), 8)) + y[:, None], y


def test_a_knn_grid_is_clipped_to_the_folds_with_a_warning_naming_the_head_and_values(caplog):
    X, y = _rows()
    spec = HeadSpec("near", "knn", ["tiny:head"], {"n_neighbors": [1, 3, 1000000000, 50]})
    with caplog.at_level(logging.WARNING, logger="pipeline.heads.fit"):
        fitted = fit_head(spec, X, y, [8])
    assert fitted.best_params["clf__n_neighbors"] in (1, 3)
    (record,) = [r for r in caplog.records if r.name == "pipeline.heads.fit"]
    assert record.getMessage() == ("head 'near': n_neighbors 1000000000, 50 dropped from its grid: more than the 24 "
                                   "training images of the smallest cross-validation fold")


def test_a_knn_head_whose_whole_grid_is_impossible_is_one_line():
    X, y = _rows()
    with pytest.raises(ConfigError) as info:
        fit_head(HeadSpec("near", "knn", ["tiny:head"], {"n_neighbors": 1000000000}), X, y, [8])
    assert str(info.value) == ("head 'near': n_neighbors 1000000000 is more than the 30 training images; give a k of "
                               "at most 30")
    with pytest.raises(ConfigError) as info:  # each fits all 30 rows, none the 24 of a fold
        fit_head(HeadSpec("near", "knn", ["tiny:head"], {"n_neighbors": [25, 30]}), X, y, [8])
    assert str(info.value) == ("head 'near': n_neighbors 25, 30 are all more than the 24 training images of the "
                               "smallest cross-validation fold; give a k of at most 24")


def test_a_knn_grid_that_fits_is_fitted_without_a_warning(caplog):
    X, y = _rows()
    with caplog.at_level(logging.WARNING, logger="pipeline.heads.fit"):
        fit_head(HeadSpec("near", "knn", ["tiny:head"], {"n_neighbors": [1, 3]}), X, y, [8])
    assert not [r for r in caplog.records if r.name == "pipeline.heads.fit"]


# --------------------------------------------------------------------------- paths, from the config's folder

def _configs(tmp_path):
    """tmp/configs/ holding the configs, tmp/photos/ the data, tmp/elsewhere/ the folder a job runs in."""
    (tmp_path / "configs").mkdir()
    make_folder(tmp_path / "photos", classes=2, per_class=2)
    (tmp_path / "elsewhere").mkdir()
    return tmp_path / "configs"


def test_every_run_config_path_is_taken_from_the_config_folder(tmp_path, monkeypatch, caplog):
    configs = _configs(tmp_path)
    (configs / "run.yaml").write_text("data: ../photos\nfeatures: {cache_dir: cache, weights: w.pt}\n"
                                      "output_dir: out\nfinetune: {backbones_dir: bb}\n")
    monkeypatch.chdir(tmp_path / "elsewhere")  # as cron would: another folder
    with caplog.at_level(logging.WARNING):
        config = RunConfig.load(configs / "run.yaml")
    assert config.data == {"data": configs / "../photos"}
    assert (config.features.cache_dir, config.features.weights, config.output_dir, config.finetune.backbones_dir) == (
        str(configs / "cache"), str(configs / "w.pt"), str(configs / "out"), str(configs / "bb"))
    assert not caplog.records  # nothing was at the places the folder you run in gave
    (configs / "defaults.yaml").write_text("data: ../photos\n")
    assert RunConfig.load(configs / "defaults.yaml").features.cache_dir == str(configs / "cache")


def test_absolute_paths_and_command_line_configs_keep_their_paths(tmp_path, monkeypatch):
    configs = _configs(tmp_path)
    (configs / "run.yaml").write_text(f"features: {{cache_dir: {tmp_path / 'c'}}}\noutput_dir: {tmp_path / 'o'}\n")
    config = RunConfig.load(configs / "run.yaml")
    assert (config.features.cache_dir, config.output_dir) == (str(tmp_path / "c"), str(tmp_path / "o"))
    monkeypatch.chdir(tmp_path / "elsewhere")
    made = RunConfig.parse({"features": {"cache_dir": "cache"}}, "command line")  # pipeline fit's config
    assert made.features.cache_dir == "cache"
    assert RunConfig().features.cache_dir == "cache"  # no config: the folder you run in


def test_batch_config_paths_are_taken_from_the_config_folder(tmp_path, monkeypatch):
    from pipeline.app.batch import load_batch_config

    configs = _configs(tmp_path)
    head = tmp_path / "heads" / "a.joblib"
    head.parent.mkdir()
    head.write_bytes(b"x")
    (configs / "batch.yaml").write_text("inputs: ../photos\nheads: [../heads/a.joblib]\n"
                                        "output_dir: out\nlog: out/runs.jsonl\n")
    monkeypatch.chdir(tmp_path / "elsewhere")
    config = load_batch_config(configs / "batch.yaml")
    assert (config.output_dir, config.log, config.features.cache_dir) == (
        configs / "out", configs / "out/runs.jsonl", str(configs / "cache"))


def test_a_config_path_that_moved_warns_once_naming_both_places(tmp_path, monkeypatch, caplog):
    configs = _configs(tmp_path)
    (tmp_path / "elsewhere" / "cache").mkdir()  # what the folder you run in gave before
    (tmp_path / "elsewhere" / "out").mkdir()
    (configs / "run.yaml").write_text("data: ../photos\noutput_dir: out\n")  # cache_dir: its default
    monkeypatch.chdir(tmp_path / "elsewhere")
    with caplog.at_level(logging.WARNING, logger="pipeline.core.configfile"):
        RunConfig.load(configs / "run.yaml")
        RunConfig.load(configs / "run.yaml")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        f"{configs / 'run.yaml'}: 'features.cache_dir' (cache) is now taken from the config file's folder "
        f"({configs / 'cache'}), no longer from the folder you run in, where {tmp_path / 'elsewhere' / 'cache'} "
        "exists: move it, or write its absolute path in the config to keep using it",
        f"{configs / 'run.yaml'}: 'output_dir' (out) is now taken from the config file's folder ({configs / 'out'}), "
        f"no longer from the folder you run in, where {tmp_path / 'elsewhere' / 'out'} exists: move it, or write "
        "its absolute path in the config to keep using it"]


def test_no_warning_for_a_config_that_is_refused_or_run_from_its_own_folder(tmp_path, monkeypatch, caplog):
    configs = _configs(tmp_path)
    (tmp_path / "elsewhere" / "out").mkdir()
    (configs / "out").mkdir()
    (configs / "bad.yaml").write_text("output_dir: out\nfeatures: {batch_size: 0}\n")
    (configs / "run.yaml").write_text("output_dir: out\n")
    with caplog.at_level(logging.WARNING, logger="pipeline.core.configfile"):
        monkeypatch.chdir(tmp_path / "elsewhere")
        with pytest.raises(ConfigError, match="batch_size"):  # the error comes first; the note waits
            RunConfig.load(configs / "bad.yaml")
        monkeypatch.chdir(configs)  # the same place either way
        RunConfig.load(configs / "run.yaml")
    assert not caplog.records


# --------------------------------------------------------------------------- an output_dir of another config

def _run_config(folder, data, out):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(f"data: {{train: {data / 'train'}, test: {data / 'test'}}}\n"
                    f"features: {{backbones: [{TINY}], cache_dir: {data / 'cache'}}}\n"
                    "heads:\n  - {name: logreg, type: logistic_regression, C: 1.0}\n"
                    f"output_dir: {out}\n")
    return path


def test_an_output_dir_of_another_config_is_refused_unless_overwrite(tmp_path, capsys):
    make_folder(tmp_path / "train", classes=2, per_class=3)
    make_folder(tmp_path / "test", classes=2, per_class=2, start_seed=50)
    out = tmp_path / "out"
    mine = _run_config(tmp_path / "a", tmp_path, out)
    theirs = _run_config(tmp_path / "b", tmp_path, out)
    assert main(["run", str(mine), "--quiet"]) == 0
    assert json.loads((out / "run-config.json").read_text()) == {"config": str(mine)}
    assert main(["run", str(mine), "--quiet"]) == 0  # the same config again: fine
    metrics = (out / "metrics.json").read_bytes()
    capsys.readouterr()
    assert main(["run", str(theirs), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {theirs}:5:13: 'output_dir': {out} holds the results of another config ({mine}); "
                   "choose another output_dir, or pass --overwrite to replace them\n")
    assert (out / "metrics.json").read_bytes() == metrics
    assert main(["run", str(theirs), "--quiet", "--overwrite"]) == 0
    assert json.loads((out / "run-config.json").read_text()) == {"config": str(theirs)}


def test_an_output_dir_without_an_owner_is_taken(tmp_path):
    """Written before output folders were marked (or by hand): nothing names another config."""
    from pipeline.app.run import _check_owner

    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    config = RunConfig.parse({"output_dir": str(out)}, tmp_path / "run.yaml")
    assert _check_owner(config, out, overwrite=False) is True
    (out / "run-config.json").write_text("not json")
    with pytest.raises(ConfigError, match=r"holds the results of another config \(unknown: .* cannot be read\)"):
        _check_owner(config, out, overwrite=False)


# --------------------------------------------------------------------------- no input crashes the parsers

_KEYS = sorted({*RunConfig.model_fields, *BatchConfig.model_fields, *ExtractSettings.model_fields,
                *FinetuneSection.model_fields, *CompareSection.model_fields, "train", "test", "name", "type",
                "C", "gamma", "n_neighbors", "kernel", "sources", "source", "components", "order",
                "variance_threshold", "select_k", "logistic_regression", "svm", "knn", "pca_fusion"})
_SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(-2**70, 2**70) | st.floats()
            | st.sampled_from(["", ".", "..", "auto", "scale", "all", "cpu", "head", "last:3", "1e-3", "x" * 300,
                               "a/b", "/", "\x00", "~", "efficientnet_lite0", TINY, "tiny:head", "logreg"])
            | st.text(st.characters(codec="utf-8"), max_size=20))
_VALUES = st.recursive(
    _SCALARS, lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=8) | st.integers(), inner, max_size=5),
    max_leaves=25)
_CONFIGS = st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=8) | _VALUES
_PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _only_config_errors(parse, data) -> None:
    try:
        parse(data)
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message, message


@_PROPERTY
@given(data=_CONFIGS)
def test_no_run_config_data_raises_anything_but_a_one_line_config_error(tmp_path, data):
    _only_config_errors(lambda d: RunConfig.parse(d, tmp_path / "run.yaml"), data)


@_PROPERTY
@given(data=_CONFIGS)
def test_no_batch_config_file_raises_anything_but_a_one_line_config_error(tmp_path, data):
    from pipeline.app.batch import load_batch_config

    def load(value):
        path = tmp_path / "batch.yaml"
        path.write_text(yaml.safe_dump(value, allow_unicode=True))
        return load_batch_config(path)

    _only_config_errors(load, data)


@_PROPERTY
@given(text=st.text(st.characters(codec="utf-8"), max_size=200)
       | st.lists(st.sampled_from(["data:", " train:", "- ", "{", "}", "[", "]", ": ", "&a", "*a", "!!python/none",
                                   "<<: *a", "'", '"', "\t", "\n", "  ", "heads:", "C: .inf", "? ", "%YAML 1.1",
                                   "---", "..."]), max_size=30).map("".join))
def test_no_run_config_text_raises_anything_but_a_one_line_config_error(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    _only_config_errors(lambda _: RunConfig.load(path), None)


def test_an_unknown_backbone_is_named_where_it_is_written(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"features:\n  backbones: [{TINY}, nonet]\nheads:\n  - {{name: a, type: knn}}\n")
    with pytest.raises(ConfigError) as info:
        head_specs(RunConfig.load(path))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:2:") and "'features.backbones[1]': unknown backbone 'nonet'" in message
