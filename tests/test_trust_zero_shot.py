"""The trust options on a zero_shot head: reject works (a threshold, or a coverage of the training
images), calibration and the options that need learning are refused in one line."""

import csv
import json

import numpy as np
import pytest

from pipeline.heads.decision import decide
from pipeline.heads.fit import fit_head
from pipeline.heads.spec import HEAD_OPTIONS, HeadSpec
from pipeline.heads.zero_shot import ZeroShotClassifier

from .conftest import config_error, make_folder
from .test_zero_shot import _write_config, tiny_clip  # noqa: F401 (tiny_clip is a fixture)


@pytest.mark.parametrize(("option", "expected"), [
    ("calibration: temperature",
     "'heads[0].calibration' must be none (a zero_shot head learns nothing from the training images), "
     "got 'temperature'"),
    ("tune_threshold: true", "unknown key 'heads[0].tune_threshold'"),
    ("class_weight: balanced", "unknown key 'heads[0].class_weight'"),
    ("reject: {threshold: 1.5}", "'heads[0].reject.threshold' must be a number between 0 and 1"),
])
def test_what_a_zero_shot_head_cannot_do_is_refused_in_one_line(tmp_path, option, expected):
    assert expected in config_error(tmp_path, f"heads:\n  - {{name: z, type: zero_shot, {option}}}\n")


def _zero_shot(rows=90, seed=0):
    """Three class embeddings and CLIP-like image embeddings near them (some far from all three)."""
    rng = np.random.default_rng(seed)
    E = rng.normal(size=(3, 16))
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    y = np.arange(rows) % 3
    X = E[y] * rng.uniform(0.05, 1.0, size=(rows, 1)) + rng.normal(scale=0.15, size=(rows, 16))
    return ZeroShotClassifier(E, 20.0), X, y


@pytest.mark.parametrize("reject", [{"threshold": 0.8, "coverage": None}, {"threshold": None, "coverage": 0.7}])
def test_a_zero_shot_head_answers_unknown_below_its_reject_threshold(reject):
    prior, X, y = _zero_shot()
    spec = HeadSpec("z", "zero_shot", ["clip:embedding"], {**HEAD_OPTIONS["zero_shot"], "reject": reject})
    fitted = fit_head(spec, X, y, [16], prior=prior)
    top = prior.predict_proba(X).max(axis=1)
    if reject["coverage"] is None:
        assert fitted.decision.reject_threshold == 0.8
    else:  # nothing is learned, so the out-of-fold probabilities of the training images are their own
        assert fitted.decision.reject_threshold == np.quantile(top, 0.3, method="higher")
        assert (top >= fitted.decision.reject_threshold).mean() == pytest.approx(0.7, abs=0.02)
    decisions = decide(fitted.decision, fitted.pipeline.predict_proba(X))
    np.testing.assert_array_equal(decisions.unknown, top < fitted.decision.reject_threshold)
    assert 0 < decisions.unknown.sum() < len(y)
    assert fitted.calibration == "none" and fitted.cv_accuracy is None


def test_a_zero_shot_head_with_reject_runs_through_run_and_predict(tiny_clip, tmp_path):  # noqa: F811
    """On the tiny CLIP (random weights, so its probabilities are near uniform): a threshold above every
    top probability answers unknown to every test image, in metrics and in `pipeline predict`."""
    from pipeline.cli.main import main

    data = tmp_path / "data"
    make_folder(data / "train", classes=3, per_class=3)
    make_folder(data / "test", classes=3, per_class=2, start_seed=100)
    out, cache = tmp_path / "run", tmp_path / "cache"
    config = _write_config(tmp_path / "run.yaml", data, cache, out,
                           "  - {name: zs, type: zero_shot, reject: {threshold: 0.99}}")
    assert main(["run", str(config), "--quiet"]) == 0
    reject = json.loads((out / "metrics.json").read_text())["heads"]["zs"]["reject"]
    assert reject["threshold"] == 0.99 and reject["coverage"] == 0 and reject["accuracy"] is None
    predictions = tmp_path / "predictions.csv"
    assert main(["predict", "--model", str(out / "heads" / "zs.skops"), "--data", str(data / "test"),
                 "--cache", str(cache), "--out", str(predictions), "--quiet"]) == 0
    rows = list(csv.DictReader(predictions.open()))
    assert len(rows) == 6 and {r["predicted_class"] for r in rows} == {"unknown"}
    assert {r["top_class"] for r in rows} <= {"class0", "class1", "class2"}
