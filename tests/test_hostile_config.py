"""Hostile and careless configs: numbers that are not finite, grids the data cannot hold, paths that
depended on the folder a job was started from, an output folder of another config. Each is refused in
one line that names the file, place and key, or handled with a warning that names both sides."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from pipeline.app.config import RunConfig
from pipeline.core.errors import ConfigError
from pipeline.heads.fit import fit_head
from pipeline.heads.spec import HeadSpec


def _error(tmp_path, text: str, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        RunConfig.load(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}:")
    return message.removeprefix(str(path))


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
    message = _error(tmp_path, f"heads:\n  - {value}\n")
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
    message = _error(tmp_path, f"{section}:\n  {key}: {value}\n")
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
