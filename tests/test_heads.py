"""Stage 2 heads on cached features, their bundles, and predict/evaluate on new images."""

import time

import numpy as np
import pytest

from pipeline.cli.main import main
from pipeline.features.extract import extract
from pipeline.features.sources import SourceMeta
from pipeline.heads.bundle import BundleError, HeadBundle, HeadMetrics, load_bundle, save_bundle
from pipeline.heads.fit import fit_head
from pipeline.heads.spec import HEAD_OPTIONS, HeadSpec

from .conftest import TINY, make_folder


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    data = make_folder(root / "train", classes=3, per_class=6)
    report = extract(data, TINY, layers=["head", "stage1"], cache_dir=root / "cache", progress=False)
    head = report.feature_sets[(TINY, "head")]
    stage1 = report.feature_sets[(TINY, "stage1")]
    return root, data, head.features.compute(), stage1.features.compute(), head.labels


# zero_shot learns nothing from the images (tests/test_zero_shot.py checks it on a tiny CLIP)
@pytest.mark.parametrize("head_type", [t for t in HEAD_OPTIONS if t != "zero_shot"])
def test_every_head_fits_and_predicts_on_cached_features(cached, head_type):
    _root, _data, head, stage1, labels = cached
    options = dict(HEAD_OPTIONS[head_type])
    if head_type == "pca_fusion":
        options["components"] = 4
        X, dims = np.hstack([head, stage1]), [head.shape[1], stage1.shape[1]]
    else:
        X, dims = head, [head.shape[1]]
    started = time.perf_counter()
    fitted = fit_head(HeadSpec("h", head_type, [f"{TINY}:head"], options), X, labels, dims)
    elapsed = time.perf_counter() - started
    proba = fitted.pipeline.predict_proba(X)
    assert proba.shape == (len(labels), 3) and np.allclose(proba.sum(1), 1)
    assert (fitted.pipeline.predict(X) == labels).mean() >= 0.8  # training images of three distinct patterns
    assert 0 <= fitted.cv_accuracy <= 1 and 0 < fitted.fit_seconds <= elapsed


def test_concat_then_pca_and_feature_selection(cached):
    _root, _data, head, stage1, labels = cached
    options = {**HEAD_OPTIONS["pca_fusion"], "order": "concat_then_pca", "components": 6, "select_k": 4,
               "variance_threshold": 0.0}
    fitted = fit_head(HeadSpec("f", "pca_fusion", ["a", "b"], options), np.hstack([head, stage1]), labels,
                      [head.shape[1], stage1.shape[1]])
    assert fitted.pipeline.named_steps["select"].k == 4
    assert fitted.pipeline[:-1].transform(np.hstack([head, stage1])).shape == (len(labels), 4)


def test_fit_save_reload_gives_identical_predictions_and_tampering_is_refused(cached, capsys):
    root, data, head, _stage1, _labels = cached
    model = root / "lr.skops"
    assert main(["fit", "--data", str(data), "--backbone", TINY, "--type", "logistic_regression", "--out", str(model),
                 "--cache", str(root / "cache"), "--quiet"]) == 0
    assert "cross-validated accuracy" in capsys.readouterr().out
    bundle = load_bundle(model)
    assert bundle.classes == ["class0", "class1", "class2"]
    assert bundle.sources[0].backbone == TINY and "scikit-learn" in bundle.versions
    expected = bundle.pipeline.predict_proba(head)  # head: the cached features, in the folder's order

    out = root / "preds.csv"
    assert main(["predict", "--model", str(model), "--data", str(data), "--out", str(out),
                 "--cache", str(root / "cache"), "--quiet"]) == 0
    assert "rows computed: 0 | rows reused: 18" in capsys.readouterr().out
    lines = out.read_text().splitlines()
    assert lines[0] == "path,image_id,predicted_class,p_class0,p_class1,p_class2" and len(lines) == 19
    from_csv = np.array([[float(v) for v in line.split(",")[3:]] for line in lines[1:]])
    assert np.allclose(from_csv, expected, atol=1e-6)  # the reloaded head, through the cache, agrees
    assert main(["evaluate", "--model", str(model), "--data", str(data), "--cache", str(root / "cache"),
                 "--quiet"]) == 0
    assert "accuracy 100.0%" in capsys.readouterr().out

    data_bytes = model.read_bytes()
    model.write_bytes(data_bytes[:-1] + bytes([data_bytes[-1] ^ 1]))
    assert main(["evaluate", "--model", str(model), "--data", str(data), "--quiet"]) == 2
    assert "does not match its checksum" in capsys.readouterr().err
    model.write_bytes(data_bytes)
    (root / "lr.skops.sha256").unlink()
    with pytest.raises(BundleError, match="refusing to load an unverified"):
        load_bundle(model)


def test_a_bundle_needing_an_unknown_backbone_is_refused(tmp_path):
    source = SourceMeta(backbone="resnet9000", layer="head", cache_key="k", precision="fp32", weights_sha256="")
    path = save_bundle(tmp_path / "x.skops", HeadBundle(
        pipeline=None, classes=[], head=HeadSpec("h", "knn", ["resnet9000:head"]), sources=[source],
        metrics=HeadMetrics(cv_accuracy=None, best_params={}, fit_seconds=0.0)))
    with pytest.raises(BundleError, match="needs backbone 'resnet9000'"):
        load_bundle(path)


@pytest.mark.slow
def test_cross_validation_folds_run_on_a_dask_cluster(cached):
    from distributed import LocalCluster

    _root, _data, head, _stage1, labels = cached
    spec = HeadSpec("h", "logistic_regression", [f"{TINY}:head"], dict(HEAD_OPTIONS["logistic_regression"]))
    local = fit_head(spec, head, labels, [head.shape[1]])
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        remote = fit_head(spec, head, labels, [head.shape[1]], scheduler=cluster.scheduler_address)
    assert remote.best_params == local.best_params and remote.cv_accuracy == local.cv_accuracy


@pytest.mark.parametrize("head_type", ["logistic_regression", "pca_fusion"])
def test_out_of_core_heads_learn_block_by_block(cached, head_type):
    import dask.array as da

    from pipeline.heads.outofcore import fit_incremental, predict_proba_blocks

    _root, _data, head, stage1, labels = cached
    order = np.random.default_rng(1).permutation(len(labels))  # blocks must not be single-class
    sources = [da.from_array(head[order], chunks=5), da.from_array(stage1[order], chunks=5)]
    options = {**HEAD_OPTIONS[head_type], "components": 3} if head_type == "pca_fusion" else HEAD_OPTIONS[head_type]
    used = sources if head_type == "pca_fusion" else sources[:1]
    fitted = fit_incremental(HeadSpec("o", head_type, ["a", "b"][: len(used)], dict(options)), used, labels[order],
                             block_rows=5)
    proba = predict_proba_blocks(fitted.pipeline, used, block_rows=4)
    assert proba.shape == (18, 3) and fitted.best_params["out_of_core"]
    assert (fitted.pipeline.classes_[proba.argmax(1)] == labels[order]).mean() >= 0.8


def test_heads_that_need_all_rows_in_memory_refuse_the_out_of_core_path(cached):
    import dask.array as da

    from pipeline.core.errors import ConfigError
    from pipeline.heads.outofcore import fit_incremental

    _root, _data, head, _stage1, labels = cached
    with pytest.raises(ConfigError, match="needs all features in memory"):
        fit_incremental(HeadSpec("k", "knn", ["a"], dict(HEAD_OPTIONS["knn"])), [da.from_array(head)], labels)
