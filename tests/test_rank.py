"""Ranking candidates: LogME against a slow reference, score sanity, and `rank` reading only the cache."""

import json
import sys

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from pipeline.cli.main import main
from pipeline.core.errors import ConfigError, PipelineError
from pipeline.heads.rank import EPSILON, candidates, hscore, logme, rank, spearman
from tests.conftest import TINY, TINY_WIDE, make_folder


def slow_logme(features: np.ndarray, labels: np.ndarray) -> float:
    """The paper's Algorithm 1 one class at a time with explicit matrices (and the authors' epsilon), the
    evidence taken from the Gaussian marginal likelihood N(y; 0, F F^T / alpha + I / beta) itself."""
    f = features.astype(np.float64)
    n, dim = f.shape
    eig = np.linalg.eigvalsh(f.T @ f)
    evidences = []
    for k in np.unique(labels):
        y = (labels == k).astype(np.float64)
        alpha, beta = 1.0, 1.0
        for _ in range(1000):
            A = alpha * np.eye(dim) + beta * f.T @ f
            m = beta * np.linalg.inv(A) @ f.T @ y
            gamma = np.sum(beta * eig / (alpha + beta * eig))
            new_alpha = gamma / (m @ m + EPSILON)
            new_beta = (n - gamma) / (np.sum((y - f @ m) ** 2) + EPSILON)
            done = abs(new_alpha / new_beta - alpha / beta) <= 1e-12 * alpha / beta
            alpha, beta = new_alpha, new_beta
            if done:
                break
        cov = f @ f.T / alpha + np.eye(n) / beta
        evidences.append(multivariate_normal(np.zeros(n), cov).logpdf(y) / n)
    return float(np.mean(evidences))


@pytest.mark.parametrize("n,dim", [(40, 8), (30, 50), (12, 400)])  # more images than dimensions, and fewer
def test_logme_matches_slow_reference(n: int, dim: int) -> None:
    rng = np.random.default_rng(n + dim)
    labels = rng.integers(0, 3, n)
    features = rng.normal(size=(n, dim)) + labels[:, None] * rng.normal(size=dim) * 0.5
    assert logme(features, labels) == pytest.approx(slow_logme(features, labels), abs=1e-6)


@pytest.mark.parametrize("n,dim", [(60, 10), (20, 90)])
def test_hscore_matches_sklearn_ledoit_wolf(n: int, dim: int) -> None:
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(dim)
    labels = rng.integers(0, 4, n)
    features = rng.normal(size=(n, dim)) + rng.normal(size=(4, dim))[labels]
    x = features - features.mean(0)
    means = np.stack([x[labels == k].mean(0) for k in range(4)])
    cov_means = sum(np.mean(labels == k) * np.outer(means[k], means[k]) for k in range(4))
    cov = LedoitWolf(assume_centered=True).fit(x).covariance_
    assert hscore(features, labels) == pytest.approx(np.trace(np.linalg.solve(cov, cov_means)), rel=1e-8)


def test_logme_is_finite_when_no_linear_map_helps() -> None:
    """Labels unrelated to the features would send alpha to infinity, and labels fitted exactly by more
    dimensions than images would send beta there; both stay finite."""
    rng = np.random.default_rng(1)
    assert np.isfinite(logme(rng.normal(size=(50, 10)), rng.integers(0, 3, 50)))
    assert np.isfinite(logme(rng.normal(size=(18, 1280)), np.repeat(np.arange(3), 6)))


def test_linear_labels_score_higher_than_shuffled() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 20))
    labels = (features @ rng.normal(size=(20, 4))).argmax(1)  # classes from a linear map of the features
    shuffled = rng.permutation(labels)
    assert logme(features, labels) > logme(features, shuffled) + 0.05
    assert hscore(features, labels) > 5 * hscore(features, shuffled)


def test_spearman_orders_rows() -> None:
    from pipeline.heads.rank import RankRow

    rows = [RankRow(str(i), logme=float(i), hscore=float(-i), probe_accuracy=i / 10, dim=1,
                    images_per_second=None, cache_bytes=0, score_seconds=0, probe_seconds=0) for i in range(4)]
    assert spearman(rows) == pytest.approx(1.0)
    assert spearman(rows, "hscore") == pytest.approx(-1.0)


def test_candidates_and_bad_fusion() -> None:
    got = candidates(["efficientnet_lite0"], ["head", "stage6"], ["efficientnet_lite0+efficientnet_lite0:stage6"])
    assert [c.name for c in got] == ["efficientnet_lite0:head", "efficientnet_lite0:stage6",
                                     "efficientnet_lite0:head+efficientnet_lite0:stage6"]
    with pytest.raises(ConfigError, match="joined by"):
        candidates(["efficientnet_lite0"], None, ["efficientnet_lite0+"])


def test_rank_reads_only_the_cache_the_second_time(tmp_path, monkeypatch, capsys) -> None:
    from pipeline.features.cache import FeatureStore

    data = make_folder(tmp_path / "data", classes=3, per_class=6)
    cache = tmp_path / "cache"
    fusion = f"{TINY}+{TINY}:stage1"
    first = rank(data, [TINY], ["head", "stage1"], [fusion], cache_dir=cache, progress=False).rows
    assert sorted(r.candidate for r in first) == [f"{TINY}:head", f"{TINY}:head+{TINY}:stage1", f"{TINY}:stage1"]
    assert [r.logme for r in first] == sorted((r.logme for r in first), reverse=True)
    # the speed is the one the cache's shard records give; a fusion of one backbone's layers costs one pass
    recorded = {s.meta["layer"]: s.summary()["images_per_second"] for s in FeatureStore.all_in(cache)}
    by_name = {r.candidate: r for r in first}
    assert by_name[f"{TINY}:head"].images_per_second == pytest.approx(recorded["head"], rel=1e-12)
    assert by_name[f"{TINY}:stage1"].images_per_second == pytest.approx(recorded["stage1"], rel=1e-12)
    assert by_name[f"{TINY}:head+{TINY}:stage1"].images_per_second == by_name[f"{TINY}:head"].images_per_second
    assert {r.candidate: r.dim for r in first}[f"{TINY}:head+{TINY}:stage1"] == sum(
        by_name[f"{TINY}:{layer}"].dim for layer in ("head", "stage1"))

    def no_forward(*args, **kwargs):
        raise AssertionError("rank ran the network although every feature was cached")

    monkeypatch.setattr(sys.modules["pipeline.features.extract"], "forward", no_forward)
    out = tmp_path / "rank.json"
    assert main(["rank", "--data", str(data), "--backbone", TINY, "--cache", str(cache), "--layer", "head",
                 "--layer", "stage1", "--fusion", fusion, "--out", str(out), "--report", str(tmp_path / "report"),
                 "--quiet"]) == 0
    rows = json.loads(out.read_text())
    assert [r["candidate"] for r in rows] == [r.candidate for r in first]
    assert {"candidate", "logme", "hscore", "probe_accuracy"} <= set(rows[0])
    for row in rows:
        assert row["logme"] == pytest.approx(by_name[row["candidate"]].logme, rel=1e-9)
    printed = capsys.readouterr().out
    assert "LogME" in printed and "rows computed: 0" in printed
    html = (tmp_path / "report" / "rank.html").read_text()
    assert "rank_scores.png" in html and (tmp_path / "report" / "rank_scores.png").stat().st_size > 0


def _auto_config(tmp_path, heads: str):
    train = make_folder(tmp_path / "train", classes=3, per_class=5)
    test = make_folder(tmp_path / "test", classes=3, per_class=2, start_seed=100)
    path = tmp_path / "auto.yaml"
    path.write_text(f"data: {{train: {train}, test: {test}}}\n"
                    f"features: {{backbones: auto, candidates: [{TINY}, {TINY_WIDE}], "
                    f"cache_dir: {tmp_path / 'cache'}}}\n{heads}output_dir: {tmp_path / 'out'}\n")
    return path


def test_run_with_auto_backbones_uses_the_best_ranked(tmp_path) -> None:
    from pipeline.app.run import run

    metrics = run(_auto_config(tmp_path, "heads: [{name: lr, type: logistic_regression, C: 1.0}]\n"), progress=False)
    ranked = metrics["rank"]
    assert sorted(r["candidate"] for r in ranked) == [f"{TINY}:head", f"{TINY_WIDE}:head"]
    assert ranked[0]["logme"] > ranked[1]["logme"] and ranked[0]["probe_accuracy"] is None
    assert metrics["heads"]["lr"]["sources"] == [f"{ranked[0]['candidate']}"]
    assert "Backbone chosen by ranking" in (tmp_path / "out" / "report.html").read_text()


@pytest.mark.parametrize("features,heads,message", [
    ("{backbones: best}", "[{name: lr, type: logistic_regression}]", "'features.backbones' must be"),
    ("{backbones: auto}", "[{name: lr, type: logistic_regression, source: efficientnet_lite0}]",
     "takes the chosen backbone"),
    ("{backbones: auto, candidates: [nope]}", "[{name: lr, type: logistic_regression}]", "unknown backbone 'nope'"),
])
def test_auto_config_errors(tmp_path, features: str, heads: str, message: str) -> None:
    from pipeline.app.config import RunConfig, head_specs

    path = tmp_path / "bad.yaml"
    path.write_text(f"features: {features}\nheads: {heads}\noutput_dir: out\n")
    with pytest.raises(PipelineError, match=message):
        head_specs(RunConfig.load(path))


def test_auto_backbones_check_the_stage_sections_before_ranking_extracts(tmp_path) -> None:
    from pipeline.app.run import run

    path = _auto_config(tmp_path, "heads: [{name: lr, type: logistic_regression, C: 1.0}]\n")
    path.write_text(path.read_text() + "compare: {unfreeze: some}\n")
    with pytest.raises(PipelineError, match="'compare': unfreeze must be"):
        run(path, progress=False)
    assert not (tmp_path / "cache").exists()


def test_rank_page_escapes_candidate_names_and_skips_the_plot_without_probes(tmp_path) -> None:
    from pipeline.heads.rank import RankRow
    from pipeline.reporting.pages import write_rank_report

    rows = [RankRow("a<b>:head+c&d:head", -0.5, 1.25, None, 8, None, 2**20, 0.1, None),
            RankRow("plain:head", -0.75, 1.0, None, 4, 100.0, 0, 0.2, None)]
    page = write_rank_report(tmp_path / "rank", rows).read_text()
    assert '<tr class="best"><td class="cand">a&lt;b&gt;:head + c&amp;d:head</td><td>-0.500</td>' in page
    assert '<tr><td class="cand">plain:head</td><td>-0.750</td>' in page
    assert "<img" not in page and not (tmp_path / "rank" / "rank_scores.png").exists()
    assert "2 candidates" in page and "Spearman" not in page


def test_rank_prints_a_broken_training_image_and_writes_the_skip_list(tmp_path, capsys) -> None:
    data = make_folder(tmp_path / "data", classes=3, per_class=4)
    broken = data / "class0" / "broken.jpg"
    broken.write_bytes(b"not an image")
    skipped = tmp_path / "rank-skipped.csv"
    assert main(["rank", "--data", str(data), "--backbone", TINY, "--cache", str(tmp_path / "cache"), "--no-probe",
                 "--report", str(tmp_path / "report"), "--skipped", str(skipped), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"skipped {broken}: not an image (unknown format)" in out
    assert f"full list, with reasons: {skipped}" in out
    assert skipped.read_text().splitlines() == ["path,reason", f"{broken},not an image (unknown format)"]
