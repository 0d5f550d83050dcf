"""The trust options through a run: refused values, metrics.json, predictions and the saved head's
`unknown` answer in predict and batch, and MLflow tracking read back from a real local store."""

import csv
import json
import subprocess
import sys

import pytest

from pipeline.app.run import run
from pipeline.heads.bundle import load_bundle
from pipeline.heads.predict import predict, write_predictions

from .conftest import TINY, config_error, make_folder, make_image

BASE = "data: {train: %s, test: %s}\nfeatures: {backbones: [%s], cache_dir: %s}\noutput_dir: %s\n"


@pytest.mark.parametrize(("head", "expected"), [
    ("calibration: platt", "'heads[0].calibration' must be none, sigmoid, isotonic or temperature, got 'platt'"),
    ("reject: {threshold: 1.0}", "'heads[0].reject.threshold' must be a number between 0 and 1 (both excluded), "
                                 "got 1.0"),
    ("reject: {threshold: 0}", "'heads[0].reject.threshold' must be a number between 0 and 1"),
    ("reject: {threshold: -0.2}", "'heads[0].reject.threshold' must be a number between 0 and 1"),
    ("reject: {coverage: 1.5}", "'heads[0].reject.coverage' must be a number between 0 and 1"),
    ("reject: {coverage: 0.9, threshold: 0.5}", "'heads[0].reject': give exactly one of threshold or coverage"),
    ("reject: {}", "'heads[0].reject': give exactly one of threshold or coverage"),
    ("reject: {cover: 0.9}", "unknown key 'heads[0].reject.cover' (did you mean coverage?)"),
    ("reject: 0.5", "'heads[0].reject' must be {threshold: P} or {coverage: C}, each between 0 and 1, got 0.5"),
    ("class_weight: auto", "'heads[0].class_weight' must be balanced or null, got 'auto'"),
    ("tune_threshold: 'yes'", "'heads[0].tune_threshold' must be true or false, got 'yes'"),
])
def test_bad_trust_options_are_refused_in_one_line(tmp_path, head, expected):
    message = config_error(tmp_path, f"heads:\n  - {{name: h, type: logistic_regression, {head}}}\n")
    assert expected in message


def test_knn_takes_no_class_weight_and_tracking_takes_only_mlflow(tmp_path):
    assert "unknown key 'heads[0].class_weight'" in config_error(
        tmp_path, "heads:\n  - {name: h, type: knn, class_weight: balanced}\n")
    assert "'tracking' must be mlflow, or a mapping of tracking settings, got 'wandb'" in config_error(
        tmp_path, "tracking: wandb\n")
    assert "unknown key 'tracking.url' (did you mean uri?)" in config_error(
        tmp_path, "tracking: {backend: mlflow, url: http://x}\n")


@pytest.fixture(scope="module")
def trusted_run(tmp_path_factory):
    """One run of three heads on the tiny backbone, with a reject threshold high enough to answer unknown,
    tracked in a local MLflow store."""
    root = tmp_path_factory.mktemp("trust")
    train = make_folder(root / "train", classes=3, per_class=8)
    test = make_folder(root / "test", classes=3, per_class=4, start_seed=100)
    config = root / "run.yaml"
    config.write_text(BASE % (train, test, TINY, root / "cache", root / "out")
                      + "heads:\n"
                        "  - {name: lr, type: logistic_regression, C: 1.0, reject: {threshold: 0.9}}\n"
                        "  - {name: cov, type: logistic_regression, C: 1.0, calibration: isotonic,"
                        " reject: {coverage: 0.8}, class_weight: balanced}\n"
                        "  - {name: plain, type: knn, n_neighbors: 3, calibration: none}\n"
                        "tracking: mlflow\n")
    metrics = run(config, progress=False)
    return root, metrics


def test_metrics_carry_calibration_before_and_after_balanced_accuracy_and_reject(trusted_run):
    root, metrics = trusted_run
    lr, cov, plain = (metrics["heads"][name] for name in ("lr", "cov", "plain"))
    assert lr["calibration"]["method"] == "temperature"  # the default
    assert set(lr["calibration"]["before"]) == {"ece", "log_loss"} and 0 <= lr["calibration"]["ece"] <= 1
    assert plain["calibration"]["before"] is None and plain["reject"] is None
    assert 0 <= lr["balanced_accuracy"] <= 1
    assert lr["reject"]["threshold"] == 0.9 and lr["reject"]["train_coverage"] is None
    assert cov["reject"]["train_coverage"] == 0.8 and 0 < cov["reject"]["threshold"] <= 1  # isotonic reaches 1
    saved = json.loads((root / "out" / "metrics.json").read_text())
    assert saved["heads"]["cov"]["reject"] == cov["reject"]
    page = (root / "out" / "report.html").read_text()
    assert 'href="reliability.png"' in page and 'href="coverage.png"' in page and "ECE before" in page


def test_a_saved_head_answers_unknown_below_its_threshold_in_predict(trusted_run):
    root, metrics = trusted_run
    bundle = load_bundle(root / "out" / "heads" / "lr.skops")
    assert bundle.decision.reject_threshold == 0.9
    mixed = root / "mixed"  # test images of the three classes, and images of none of them (no class colour)
    mixed.mkdir()
    for i, path in enumerate(sorted((root / "test").rglob("*.jpg"))[::2]):
        (mixed / f"seen{i}.jpg").hardlink_to(path)
    for i in range(6):
        make_image(500 + i).save(mixed / f"unseen{i}.jpg")
    result = predict(root / "out" / "heads" / "lr.skops", mixed, cache_dir=root / "cache", progress=False)
    top = result.proba.max(axis=1)
    threshold = (top.min() + top.max()) / 2  # the tiny backbone is sure of most images: a threshold between
    assert top.min() < threshold < top.max()  # the least sure (an image of no class) and the surest
    result.bundle.decision.reject_threshold = threshold
    answers = result.bundle.decide(result.proba).answers(result.bundle.classes)  # what a server calls
    out = write_predictions(result, root / "predicted.csv")
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:5] == ["path", "image_id", "predicted_class", "top_class", "top_probability"]
    unknown = [r for r in rows if r["predicted_class"] == "unknown"]
    assert unknown and len(unknown) < len(rows)
    assert [r["predicted_class"] for r in rows] == answers
    for row in rows:
        top = max(float(row[f"p_class{i}"]) for i in range(3))
        assert (row["predicted_class"] == "unknown") == (top < threshold)
        assert row["top_class"] in {"class0", "class1", "class2"}
        assert float(row["top_probability"]) == pytest.approx(top)
    assert 0 < metrics["heads"]["lr"]["reject"]["coverage"] <= 1


def test_the_run_is_read_back_from_the_local_mlflow_store(trusted_run):
    from mlflow.tracking import MlflowClient

    root, metrics = trusted_run
    client = MlflowClient(f"sqlite:///{root / 'out' / 'mlflow' / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    assert found.info.run_name == "out" and found.info.status == "FINISHED"
    assert found.data.tags["best_head"] == metrics["best_head"]
    assert found.data.params["heads.cov.calibration"] == "isotonic"
    assert found.data.params["features.backbones"] == str([TINY])
    assert found.data.metrics["lr.accuracy"] == pytest.approx(metrics["heads"]["lr"]["accuracy"])
    assert found.data.metrics["cov.reject.coverage"] == pytest.approx(metrics["heads"]["cov"]["reject"]["coverage"])
    assert found.data.metrics["lr.calibration.before.ece"] == pytest.approx(
        metrics["heads"]["lr"]["calibration"]["before"]["ece"])
    files = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"config.json", "metrics.json", "report.html", "reliability.png", "coverage.png", "heads"} <= files
    heads = {a.path for a in client.list_artifacts(found.info.run_id, "heads")}
    assert {"heads/lr.skops", "heads/lr.skops.sha256"} <= heads


def test_without_tracking_mlflow_is_never_imported(tmp_path):
    train = make_folder(tmp_path / "train", classes=2, per_class=3)
    config = tmp_path / "run.yaml"
    config.write_text(BASE % (train, train, TINY, tmp_path / "cache", tmp_path / "out")
                      + "heads:\n  - {name: lr, type: logistic_regression, C: 1.0}\n")
    code = ("import sys; from pipeline.app.run import run; run(sys.argv[1], progress=False); "
            "print('mlflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False"
    assert not (tmp_path / "out" / "mlflow").exists()



def test_pipeline_fit_takes_the_trust_options_as_flags(tmp_path, capsys):
    from sklearn.calibration import CalibratedClassifierCV

    from pipeline.cli.main import main

    train = make_folder(tmp_path / "train", classes=3, per_class=6)
    model = tmp_path / "lr.skops"
    common = ["fit", "--data", str(train), "--backbone", TINY, "--cache", str(tmp_path / "cache"), "--quiet"]
    assert main([*common, "--type", "logistic_regression", "--out", str(model), "--calibration", "isotonic",
                 "--reject-coverage", "0.8", "--class-weight", "balanced"]) == 0
    assert "; calibration isotonic; unknown below " in capsys.readouterr().out
    bundle = load_bundle(model)
    assert bundle.decision.reject_coverage == 0.8 and bundle.decision.reject_threshold is not None
    clf = bundle.pipeline.named_steps["clf"]
    assert isinstance(clf, CalibratedClassifierCV) and clf.method == "isotonic"
    assert clf.calibrated_classifiers_[0].estimator.class_weight == "balanced"
    assert main([*common, "--type", "knn", "--out", str(tmp_path / "k.skops"), "--reject-threshold", "0.7"]) == 0
    assert load_bundle(tmp_path / "k.skops").decision.reject_threshold == 0.7

    for flags, expected in ((["--type", "logistic_regression", "--reject-threshold", "1.5"],
                             "'heads[0].reject.threshold' must be a number between 0 and 1 (both excluded), got 1.5"),
                            (["--type", "knn", "--class-weight", "balanced"], "unknown key 'heads[0].class_weight'"),
                            (["--type", "logistic_regression", "--tune-threshold"],
                             "tune_threshold is for two-class heads, and the training folder has 3 classes")):
        assert main([*common, *flags, "--out", str(tmp_path / "bad.skops")]) != 0
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):  # argparse: one of the two
        main([*common, "--type", "knn", "--out", str(tmp_path / "x.skops"), "--reject-threshold", "0.5",
              "--reject-coverage", "0.9"])
    assert "not allowed with argument --reject-threshold" in capsys.readouterr().err
