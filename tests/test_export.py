"""`pipeline export`: a saved head and its backbones as one ONNX model, checked against `pipeline predict`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from pipeline.cli.main import main
from pipeline.deploy.export import export_onnx
from pipeline.deploy.onnx_head import ExportError
from pipeline.features.extract import extract
from pipeline.features.sources import matrix, source_meta
from pipeline.heads.bundle import HeadBundle, load_bundle, save_bundle
from pipeline.heads.fit import fit_head
from pipeline.heads.outofcore import fit_incremental
from pipeline.heads.predict import feature_options, predict_with
from pipeline.heads.spec import HEAD_OPTIONS, HeadSpec
from pipeline.heads.trust_options import CALIBRATIONS
from pipeline.images.decode import decode
from pipeline.images.preprocess import Preprocess

from .conftest import FLOWERS, TINY, TINY_WIDE, make_folder, needs_flowers

HEADS = {  # name -> (type, sources, options)
    "logreg": ("logistic_regression", [f"{TINY}:head"], {"C": 1.0}),
    "svm": ("svm", [f"{TINY}:head"], {"C": 1.0, "gamma": "scale"}),
    "knn": ("knn", [f"{TINY}:head"], {"n_neighbors": 3}),
    "fusion": ("pca_fusion", [f"{TINY}:head", f"{TINY}:stage1", f"{TINY_WIDE}:head"], {"components": 4, "C": 1.0}),
    "selected": ("pca_fusion", [f"{TINY}:head", f"{TINY}:stage2"],
                 {"components": 6, "C": 1.0, "order": "concat_then_pca", "select_k": 4, "variance_threshold": 0.0}),
}
# every head type with each calibration other than its default (HEADS: the defaults)
CALIBRATED = {f"{name}_{method}": (head_type, sources, {**options, "calibration": method})
              for name, (head_type, sources, options) in HEADS.items() if name != "selected"
              for method in CALIBRATIONS if method != HEAD_OPTIONS[head_type]["calibration"]}
# strongly regularised, uncalibrated: probabilities spread around the threshold (calibrated heads give these
# separable tiny classes probabilities of 1)
REJECT = {"reject": ("logistic_regression", [f"{TINY}:head"],
                     {"C": 0.001, "calibration": "none", "reject": {"coverage": 0.5}})}


def fitted_heads(root: Path, heads: dict, precision: str = "fp32", out_of_core: tuple[str, ...] = (),
                 runtime: str = "auto") -> dict:
    """Each head of `heads` fitted on fp32 features of a small train folder and saved: name -> path."""
    train = make_folder(root / "train", classes=3, per_class=6)
    sources = sorted({s for _t, srcs, _o in heads.values() for s in srcs})
    backbones = list(dict.fromkeys(s.split(":")[0] for s in sources))
    report = extract(train, backbones, layers=sources, cache_dir=root / "cache", precision=precision, progress=False,
                     runtime=runtime)
    paths = {}
    for name, (head_type, srcs, options) in heads.items():
        spec = HeadSpec(name, head_type, srcs, {**HEAD_OPTIONS[head_type], **options})
        X, dims = matrix(report.feature_sets, srcs)
        first = report.feature_sets[tuple(srcs[0].split(":"))]
        if name in out_of_core:
            fitted = fit_incremental(spec, [report.feature_sets[tuple(s.split(":"))].features for s in srcs],
                                     first.labels, block_rows=8)
        else:
            fitted = fit_head(spec, X, first.labels, dims)
        paths[name] = save_bundle(root / f"{name}.skops", HeadBundle.of(
            fitted, first.class_names, source_meta(report.feature_sets, srcs, root / "cache")))
    return paths


def onnx_vs_predict(model: Path, onnx_path: Path, data: Path, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of `pipeline predict` (the torch path through the cache) and of onnxruntime on the same
    decoded images, in the same order."""
    bundle = load_bundle(model)
    result = predict_with(bundle, data, cache_dir=cache, progress=False, **feature_options(bundle, model))
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    inputs = json.loads({p.key: p.value for p in onnx.load(onnx_path).metadata_props}["inputs"])
    assert [i.name for i in session.get_inputs()] == list(inputs)
    pres = {name: Preprocess(g["resize_shorter_side"], g["center_crop"], (0, 0, 0), (1, 1, 1), g["interpolation"])
            for name, g in inputs.items()}
    paths, rows = result.features.paths, []
    for start in range(0, len(paths), 32):  # 32 at a time: onnxruntime's activations grow with the batch
        feeds = {name: np.stack([decode(p, pre) for p in paths[start:start + 32]]) for name, pre in pres.items()}
        rows.append(session.run(["probabilities"], feeds)[0])
    return result.proba, np.vstack(rows)


TINY_40 = "tiny_test_40"  # the tiny network on 40 px crops: a second input geometry


def register_tiny_40() -> None:
    """TINY's network and weights under another resize and crop, so that a fusion needs two inputs."""
    import dataclasses

    from pipeline.models.registry import get_spec, register

    register(TINY_40, lambda: dataclasses.replace(get_spec(TINY), name=TINY_40,
                                                  preprocess=Preprocess(44, 40, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    register_tiny_40()
    root = tmp_path_factory.mktemp("export")
    paths = fitted_heads(root, {**HEADS, **CALIBRATED, **REJECT,
                                "two_inputs": ("pca_fusion", [f"{TINY}:head", f"{TINY_40}:stage2"],
                                               {"components": 4, "C": 1.0}),
                                "sgd": ("logistic_regression", [f"{TINY}:head"], {"C": 1.0}),
                                "incremental_fusion": ("pca_fusion", [f"{TINY}:head", f"{TINY}:stage1"],
                                                       {"components": 4, "C": 1.0})},
                         out_of_core=("sgd", "incremental_fusion"))
    test = make_folder(root / "test", classes=3, per_class=3, start_seed=100)
    return root, paths, test


@pytest.mark.parametrize("name", [*HEADS, *CALIBRATED, "two_inputs", "sgd"])
def test_exported_model_matches_predict_on_every_image(saved, name):
    """Every head type, calibrated by default (HEADS) and by each other method (CALIBRATED)."""
    root, paths, test = saved
    result = export_onnx(paths[name], root / f"{name}.onnx")
    assert result.check_max_abs_diff <= 1e-3
    expected, got = onnx_vs_predict(paths[name], result.path, test, root / "cache")
    assert got.shape == expected.shape == (9, 3)
    assert np.abs(got - expected).max() <= 1e-3
    assert (got.argmax(1) == expected.argmax(1)).all()


def _calibrated_head(base: str, method: str, classes: int) -> tuple[object, np.ndarray, np.ndarray]:
    """A head as pipeline.heads.fit makes it (an SVM: Platt scaling inside), calibrated by `method`, fitted
    on synthetic rows; and queries near them (noisy copies: none at distance 0 of a training row)."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    from pipeline.heads.calibration import StratifiedFolds, calibrated

    X, y = make_classification(150, 12, n_informative=6, n_classes=classes, random_state=classes)
    X = X.astype(np.float32)
    cv = StratifiedFolds(3)
    steps, clf = {"logreg": ([("scale", StandardScaler())], LogisticRegression()),
                  "svm": ([("scale", StandardScaler())], CalibratedClassifierCV(SVC(), cv=cv, ensemble=False)),
                  "knn": ([], KNeighborsClassifier(7, metric="cosine", weights="distance"))}[base]
    head = Pipeline([*steps, ("clf", calibrated(clf, method, cv))]).fit(X, y)
    noise = np.random.default_rng(0).normal(0, 0.7, (80, 12)).astype(np.float32)
    return head, X, X[:80] + noise


@pytest.mark.parametrize("classes", [2, 3])
@pytest.mark.parametrize("method", CALIBRATIONS)
@pytest.mark.parametrize("base", ["logreg", "svm", "knn"])
def test_calibrated_head_graphs_compute_what_sklearn_computes(base, method, classes):
    """Temperature scaling, and sklearn's sigmoid and isotonic one-vs-rest calibration (of decision_function
    for logistic regression, of predict_proba for the SVM's Platt scaling and for our kNN graph), two
    classes and three."""
    from pipeline.deploy.onnx_head import head_graph

    head, X, queries = _calibrated_head(base, method, classes)
    session = ort.InferenceSession(head_graph(head, 12, "h").SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(["probabilities"], {"features": queries})
    expected = head.predict_proba(queries)
    assert np.abs(got - expected).max() <= 1e-4  # float32 against float64 (steep isotonic steps: 2e-5)
    top2 = np.sort(expected, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-5  # isotonic maps are steps: ties are possible, and either side is right
    assert (got.argmax(1) == expected.argmax(1))[clear].all() and clear.mean() > 0.8
    assert len(np.unique(expected.max(1).round(3))) > 5  # the probabilities vary: the test compares something


def test_knn_graph_weights_neighbours_by_distance_as_sklearn_does():
    """skl2onnx's own kNN converter weights uniformly (off by up to 0.78 on such data); ours matches sklearn,
    training rows among the queries (a distance near 0: that neighbour nearly alone counts)."""
    from sklearn.datasets import make_classification
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import Pipeline

    from pipeline.deploy.onnx_head import head_graph

    X, y = make_classification(120, 16, n_informative=8, n_classes=4, random_state=0)
    X = X.astype(np.float32)
    knn = Pipeline([("clf", KNeighborsClassifier(7, metric="cosine", weights="distance"))]).fit(X, y)
    queries = np.vstack([X[:3], X[3:40] + np.random.default_rng(0).normal(0, 0.5, (37, 16)).astype(np.float32)])
    expected = knn.predict_proba(queries)
    session = ort.InferenceSession(head_graph(knn, 16, "knn").SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(["probabilities"], {"features": queries})
    assert ((expected > 0.01) & (expected < 0.99)).sum() > 20  # mixed neighbourhoods: the weights matter
    assert np.abs(got - expected).max() <= 1e-5
    assert (got[:3].max(1) > 0.999).all()


def test_metadata_names_classes_and_preprocessing_and_the_cli_writes_the_model(saved, capsys):
    root, paths, _test = saved
    out = root / "cli" / "logreg.onnx"
    assert main(["export", "--head", str(paths["logreg"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "input images: uint8 RGB, N x 32 x 32 x 3 (shorter side resized to 40 bilinear" in printed
    assert "output probabilities: N x 3 (class0, class1, class2)" in printed and f"wrote {out}" in printed
    model = onnx.load(out)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["classes"]) == ["class0", "class1", "class2"]
    assert json.loads(meta["inputs"]) == {"images": {"resize_shorter_side": 40, "center_crop": 32,
                                                     "interpolation": "bilinear", "layout": "NHWC uint8 RGB",
                                                     "shape": [None, 32, 32, 3]}}
    assert json.loads(meta["head"]) == {"name": "logreg", "type": "logistic_regression"}
    decision = json.loads(meta["decision"])
    assert decision["reject_threshold"] is None and decision["binary_threshold"] is None
    assert meta["fitted_on_precision"] == "fp32" and "scikit-learn" in json.loads(meta["versions"])
    assert [o.name for o in model.graph.output] == ["probabilities"]
    (images,) = model.graph.input
    assert images.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    two = export_onnx(paths["two_inputs"], root / "two.onnx")
    assert {name: g["center_crop"] for name, g in two.inputs.items()} == {"images_40_32_bilinear": 32,
                                                                         "images_44_40_bilinear": 40}


def test_a_head_that_cannot_be_exported_is_refused_in_one_line(saved, capsys):
    root, paths, _test = saved
    out = root / "refused.onnx"
    with pytest.raises(ExportError, match=r"head 'incremental_fusion' \(FusedIncrementalPCA, StandardScaler, "
                                          r"SGDClassifier\) cannot be exported to ONNX"):
        export_onnx(paths["incremental_fusion"], out)
    assert main(["export", "--head", str(paths["incremental_fusion"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: head 'incremental_fusion'") and err.count("\n") == 1 and not out.exists()
    assert main(["export", "--head", str(root / "missing.skops"), "--out", str(out)]) == 2
    assert "model file not found" in capsys.readouterr().err


EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "onnx_predict.py"
# Runs the example as a script in a process where `import pipeline` (and any module under it) fails.
WITHOUT_PACKAGE = ("import runpy, sys; sys.modules['pipeline'] = None; sys.argv = sys.argv[1:]; "
                   "runpy.run_path(sys.argv[0], run_name='__main__')")


def run_example(onnx_path: Path, images: list[Path]) -> list[dict]:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", WITHOUT_PACKAGE, str(EXAMPLE), str(onnx_path), *map(str, images)],
                          capture_output=True, text=True, timeout=900, cwd=onnx_path.parent)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_the_standalone_example_runs_without_this_package_and_agrees(saved):
    """docs/examples/onnx_predict.py (numpy, Pillow, onnxruntime) on the exported model: its resampling, written
    out in numpy, agrees with OpenCV's to a grey level, and the probabilities with `pipeline predict`."""
    root, paths, test = saved
    onnx_path = root / "example.onnx"
    export_onnx(paths["fusion"], onnx_path)
    images = sorted(test.rglob("*.jpg"))
    answers = run_example(onnx_path, images)
    expected, _ = onnx_vs_predict(paths["fusion"], onnx_path, test, root / "cache")
    classes = ["class0", "class1", "class2"]
    assert [a["path"] for a in answers] == list(map(str, images))
    got = np.array([[a["probabilities"][c] for c in classes] for a in answers])
    assert [a["class"] for a in answers] == [classes[i] for i in expected.argmax(1)]
    assert np.abs(got - expected).max() <= 1e-3
    assert all("top_class" not in a for a in answers)  # no reject threshold: the class alone
    blocked = subprocess_output(["-c", "import sys; sys.modules['pipeline'] = None; import pipeline"])
    assert "ModuleNotFoundError" in blocked or "ImportError" in blocked  # the blocker works


def test_the_example_answers_unknown_below_the_reject_threshold_as_predict_does(saved):
    """A head with reject (coverage 0.5 of its training images): the rule travels in the model's metadata,
    and the example's answers, top classes and probabilities are `decide`'s on `pipeline predict`'s
    probabilities."""
    root, paths, test = saved
    onnx_path = export_onnx(paths["reject"], root / "reject.onnx").path
    bundle = load_bundle(paths["reject"])
    rule = json.loads({p.key: p.value for p in onnx.load(onnx_path).metadata_props}["decision"])
    assert rule["reject_threshold"] == bundle.decision.reject_threshold is not None and rule["unknown"] == "unknown"
    images = sorted(test.rglob("*.jpg"))
    answers = run_example(onnx_path, images)
    expected, _ = onnx_vs_predict(paths["reject"], onnx_path, test, root / "cache")
    decisions = bundle.decide(expected)
    classes = ["class0", "class1", "class2"]
    assert [a["class"] for a in answers] == decisions.answers(classes)
    assert 0 < sum(a["class"] == "unknown" for a in answers) < len(answers)  # both kinds of answer
    assert [a["top_class"] for a in answers] == [classes[i] for i in decisions.label]
    assert np.abs(np.array([a["top_probability"] for a in answers]) - decisions.top_probability).max() <= 1e-3


def test_the_example_applies_a_two_class_threshold_and_a_reject_threshold_as_decide_does():
    """The example's rule (written out for programs without this package) against `decide` on random
    probabilities: a tuned two-class threshold, a reject threshold, both, and neither."""
    import runpy

    from pipeline.heads.decision import DecisionRule, decide

    example = runpy.run_path(str(EXAMPLE))
    rng = np.random.default_rng(0)
    for classes, rule in ((["a", "b"], DecisionRule(binary_threshold=0.3)),
                          (["a", "b"], DecisionRule(binary_threshold=0.7, reject_threshold=0.6)),
                          (["a", "b", "c"], DecisionRule(reject_threshold=0.5)), (["a", "b", "c"], DecisionRule())):
        proba = rng.dirichlet(np.ones(len(classes)), 200).astype(np.float32)
        decisions = decide(rule, proba)
        meta = {**rule.model_dump(), "unknown": "unknown"}
        got = [example["answer"](row, classes, meta) for row in proba]
        assert [a["class"] for a in got] == decisions.answers(classes)
        if rule.reject_threshold is not None:
            assert [a["top_class"] for a in got] == [classes[i] for i in decisions.label]
            assert "unknown" in decisions.answers(classes)


def subprocess_output(args: list[str]) -> str:
    import subprocess
    import sys

    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60).stderr


@pytest.mark.slow
@needs_flowers
def test_exported_lite0_heads_match_predict_on_real_photos(tmp_path):
    """EfficientNet-Lite0 (fp32 features) with logistic regression and kNN heads, fitted on 10 training photos
    a class, exported and compared with `pipeline predict` on all 240 test photos of flowers12; the
    standalone example on the same photos."""
    train = tmp_path / "train"
    for folder in sorted((FLOWERS / "train").iterdir()):
        (train / folder.name).mkdir(parents=True)
        for photo in sorted(folder.glob("*.jpg"))[:10]:
            (train / folder.name / photo.name).symlink_to(photo)
    report = extract(train, "efficientnet_lite0", cache_dir=tmp_path / "cache", precision="fp32", progress=False)
    features = report.feature_sets[("efficientnet_lite0", "head")]
    for name, head_type, options in (("logreg", "logistic_regression", {"C": 1.0}), ("knn", "knn", {"n_neighbors": 5})):
        spec = HeadSpec(name, head_type, ["efficientnet_lite0:head"], {**HEAD_OPTIONS[head_type], **options})
        fitted = fit_head(spec, features.features.compute(), features.labels, [1280])
        model = save_bundle(tmp_path / f"{name}.skops", HeadBundle.of(
            fitted, features.class_names, source_meta(report.feature_sets, spec.sources, tmp_path / "cache")))
        onnx_path = export_onnx(model, tmp_path / f"{name}.onnx").path
        expected, got = onnx_vs_predict(model, onnx_path, FLOWERS / "test", tmp_path / "cache")
        assert got.shape == (240, 12)
        assert np.abs(got - expected).max() <= 1e-3, name
        assert (got.argmax(1) == expected.argmax(1)).all(), name
        if name == "logreg":
            answers = run_example(onnx_path, sorted((FLOWERS / "test").rglob("*.jpg")))
            example = np.array([[a["probabilities"][c] for c in features.class_names] for a in answers])
            assert (example.argmax(1) == expected.argmax(1)).all()
            assert np.abs(example - expected).max() <= 1e-3
