"""Config files as typed models: one-line errors with file, line, column and key; duplicate keys; strict
types; defaults from one source; the generated reference; the typed contracts between stages."""

import json
from pathlib import Path

import joblib
import pytest

from pipeline.app.batch_state import BatchLogEntry, HeadLog
from pipeline.app.config import RunConfig
from pipeline.cli.main import build_parser, main
from pipeline.core.hashing import file_sha256
from pipeline.heads.bundle import BundleError, HeadBundle, load_bundle
from pipeline.heads.spec import HEAD_OPTIONS
from pipeline.tuning.options import CompareOptions, FinetuneOptions

from .conftest import config_error

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text,message", [
    ("data: {train: .}\nfeatures:\n  device: cpu\n  batch_size: many\n",
     ":4:15: 'features.batch_size' must be a positive integer, got 'many'"),
    ("features: {batch_size: true}\n", ":1:24: 'features.batch_size' must be a positive integer, got True"),
    ("features: {batch_size: '32'}\n", ":1:24: 'features.batch_size' must be a positive integer, got '32'"),
    ("features: {batch_sise: 8}\n", ":1:12: unknown key 'features.batch_sise' (did you mean batch_size?)"),
    ("finetune: {lr: 1e-3}\n", ":1:16: 'finetune.lr' must be a finite positive number, got '1e-3' (YAML reads 1e-3 "
                               "as text: write 1.0e-3)"),
    ("finetune: {warmup: false}\n", ":1:20: 'finetune.warmup' must be a finite number >= 0, got False"),
    ("heads:\n  - {name: a, type: svm}\n  - {name: b, type: knn, n_neighbors: [3, 0]}\n",
     ":3:39: 'heads[1].n_neighbors' must be a positive integer or a list of them, got [3, 0]"),
    ("heads:\n  - {name: a}\n",
     ":2:5: 'heads[0].type' is required: logistic_regression, svm, knn, pca_fusion or zero_shot"),
    ("heads:\n  - {name: a, type: svm, C: [true]}\n", ":2:29: 'heads[0].C' must be a finite positive number or a "
                                                      "list of them, got [True]"),
    ("compare: {seeds: [0, x]}\n", ":1:22: 'compare.seeds' must be a list of seeds, each an integer from 0 to "
                                    "4294967295, got [0, 'x']"),
    ("output_dir: out\nfeatures: [1]\n", ":2:11: 'features' must be a mapping of feature-extraction settings, "
                                         "got [1]"),
    ("- a\n", ":1:1: expected a mapping with keys data, features, heads"),
    ("features:\n  cache_dir: a\n  device: cpu\n  cache_dir: b\n",
     ":4:3: duplicate key 'features.cache_dir' (first at line 2)"),
    ("features: {device: cpu\n", ":2:1: not valid YAML"),
])
def test_config_errors_name_the_file_line_column_and_key(tmp_path, text, message):
    assert config_error(tmp_path, text).startswith(message)


def test_the_first_error_in_the_file_is_reported_and_the_cli_prints_it_on_one_line(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("compare: {shots: [1]}\ndata: {train: missing}\nfeatures: {device: gpu}\n")
    assert main(["extract", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {config}:2:15: 'data.train': folder not found: {tmp_path / 'missing'}\n"


def test_relative_paths_are_taken_from_the_config_folder(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "photos").mkdir()
    (tmp_path / "configs" / "run.yaml").write_text("data: ../photos\nfeatures:\n  scheduler: null\n")
    monkeypatch.chdir(ROOT)
    config = RunConfig.load(tmp_path / "configs" / "run.yaml")
    assert config.data == {"data": tmp_path / "configs" / ".." / "photos"}
    assert config.features.scheduler is None and config.features.cache_dir == str(tmp_path / "configs" / "cache")


def test_a_grid_or_a_single_value(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("heads:\n  - {name: a, type: logistic_regression, C: 1}\n"
                    "  - {name: b, type: svm, gamma: [scale]}\n")
    a, b = RunConfig.load(path).heads
    assert a.options()["C"] == 1.0 and a.options()["zero_shot_prior"] is None
    assert b.options()["gamma"] == ["scale"] and b.options()["C"] == [0.1, 1.0, 10.0]
    # the per-type defaults benchmarks/calibration.py chose (sigmoid on top of the SVM's Platt scaling)
    assert (a.options()["calibration"], b.options()["calibration"]) == ("temperature", "sigmoid")
    assert (HEAD_OPTIONS["knn"]["calibration"], HEAD_OPTIONS["pca_fusion"]["calibration"]) == ("sigmoid", "temperature")


def test_command_line_defaults_come_from_the_options_dataclasses():
    parser = build_parser()
    finetune = parser.parse_args(["finetune", "--data", "d"])
    options = FinetuneOptions("d")
    assert (finetune.lr, finetune.weight_decay, finetune.warmup, finetune.label_smoothing, finetune.epochs,
            finetune.patience, finetune.batch_size, finetune.seed) == (
        options.train.lr, options.train.weight_decay, options.train.warmup, options.train.label_smoothing,
        options.train.epochs, options.train.patience, options.train.batch_size, options.train.seed)
    assert (finetune.unfreeze, finetune.lr_decay, finetune.init, finetune.val_fraction, finetune.cache, finetune.out) \
        == (options.unfreeze, options.lr_decay, options.init, options.val_fraction, options.cache_dir, options.out)
    compare = parser.parse_args(["compare", "--data", "d", "--test", "t"])
    defaults = CompareOptions("d", "t")
    assert (compare.shots, compare.seeds) == ("1,5,10,all", "0,1,2") and defaults.shots == [1, 5, 10, None]
    assert (compare.unfreeze, compare.finetune_steps, compare.scratch_steps, compare.scratch_size, compare.device) \
        == (defaults.unfreeze, defaults.finetune_steps, defaults.scratch_steps, defaults.scratch_size, defaults.device)
    help_text = parser._subparsers._group_actions[0].choices["extract"].format_help()
    assert "(default: 32)" in help_text and "(default: 256)" in help_text


def test_the_committed_config_reference_is_generated_from_the_models():
    """docs/reference is written by `pipeline schema`; rerun it after changing a config model."""
    from pipeline.app.schema import reference_files

    for name, text in reference_files().items():
        assert (ROOT / "docs" / "reference" / name).read_text() == text, f"docs/reference/{name} is stale"


def test_a_head_saved_as_a_plain_dict_by_an_earlier_version_still_loads_when_trusted(tmp_path):
    source = {"backbone": "efficientnet_lite0", "layer": "head", "cache_key": "k", "precision": "fp32",
              "weights_sha256": "0"}  # before custom weights were recorded
    path = tmp_path / "old.joblib"
    joblib.dump({"pipeline": None, "classes": ["a", "b"], "sources": [source], "format": 1,
                 "head": {"name": "lr", "type": "logistic_regression", "sources": ["efficientnet_lite0:head"],
                          "options": {"C": 1.0}},
                 "metrics": {"accuracy": 0.5, "macro_f1": 0.5, "cv_accuracy": None, "best_params": {"clf__C": 1.0},
                             "fit_seconds": 0.1},
                 "versions": {"scikit-learn": "1.9.1", "joblib": "1.6.0", "torch": "2.15.0"}}, path)
    path.with_name("old.joblib.sha256").write_text(f"{file_sha256(path)}  old.joblib\n")
    with pytest.raises(BundleError, match="is a pickle .*--trust-pickle"):
        load_bundle(path)
    bundle = load_bundle(path, trust_pickle=True)
    assert isinstance(bundle, HeadBundle) and bundle.head.options == {"C": 1.0} and bundle.sources[0].weights is None
    no_rule = {"binary_threshold": None, "reject_threshold": None, "reject_coverage": None}  # none was saved then
    assert bundle.to_disk() == joblib.load(path) | {"sources": [{**source, "weights": None, "runtime": "torch"}],
                                                    "decision": no_rule}


def test_every_batch_log_line_has_every_key():
    heads = {"lr": HeadLog(file=None, sha256="ab", rows=0)}
    lines = [json.loads(json.dumps(e.model_dump(mode="json"))) for e in (
        BatchLogEntry.begin("r1", heads), BatchLogEntry.recovered("r0", heads, "2026-01-01T00:00:00Z", "killed"))]
    assert lines[0].keys() == lines[1].keys() == BatchLogEntry.model_fields.keys()
    with pytest.raises(ValueError):
        BatchLogEntry.begin("r2", heads).seen = "three"
