"""`pipeline run CONFIG`: the metrics.json contract, saved heads, predictions and the report."""

import csv
import json
import logging
import re
import shutil

import pytest

from pipeline.app.run import run
from pipeline.cli.main import main
from pipeline.core.errors import ConfigError

from .conftest import FLOWERS, TINY, TINY_WIDE, make_folder, make_image, needs_flowers

HEADS = f"""heads:
  - {{name: logreg, type: logistic_regression}}
  - {{name: svm, type: svm, kernel: linear}}
  - {{name: knn, type: knn}}
  - {{name: fusion, type: pca_fusion, sources: [{TINY}, '{TINY}:stage1'], components: 8}}
"""


def _config(tmp_path, train, test, heads=HEADS, extra="", backbone=TINY):
    path = tmp_path / "run.yaml"
    path.write_text(f"data: {{train: {train}, test: {test}}}\n"
                    f"features: {{backbones: [{backbone}], cache_dir: {tmp_path / 'cache'}}}\n"
                    f"{heads}output_dir: {tmp_path / 'out'}\n{extra}")
    return path


def _check_contract(out, head_names, images):
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["heads"]) == set(head_names)
    for scores in metrics["heads"].values():
        assert isinstance(scores["accuracy"], float) and isinstance(scores["macro_f1"], float)
    extract = metrics["extract"]
    assert {k: type(v) for k, v in extract.items()} == {"images": int, "computed": int, "reused": int,
                                                          "skipped": int, "seconds": float}
    assert extract["images"] == images
    for name in head_names:
        assert (out / "heads" / f"{name}.skops").is_file() and (out / "heads" / f"{name}.skops.sha256").is_file()
    return metrics


def test_run_writes_the_metrics_contract_heads_predictions_and_report(tmp_path, capsys):
    train = make_folder(tmp_path / "train", classes=3, per_class=6)
    test = make_folder(tmp_path / "test", classes=3, per_class=3, start_seed=100)
    assert main(["run", str(_config(tmp_path, train, test)), "--quiet"]) == 0
    out = tmp_path / "out"
    metrics = _check_contract(out, ["logreg", "svm", "knn", "fusion"], images=27)
    assert metrics["extract"]["computed"] == 27 and metrics["heads"]["logreg"]["accuracy"] >= 0.8
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 9 and {"path", "image_id", "true_class", "predicted_class", "p_class0"} <= rows[0].keys()
    page = (out / "report.html").read_text()
    for figure in ("confusion.png", "projection.png", "worst.png", "per_class.png"):
        assert (out / figure).stat().st_size > 1000 and f'href="{figure}"' in page
    assert "data:image/png;base64," in page and "<td>logreg</td>" in page
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out

    again = run(_config(tmp_path, train, test), progress=False)  # a second run: features all from the cache
    assert again["extract"]["computed"] == 0 and again["extract"]["reused"] == 27


def test_report_escapes_the_names_a_user_chose(tmp_path):
    """Class folders and the output folder are the user's; the template engine escapes them in report.html."""
    names = ["<script>alert(1)", "R&D <u>"]  # a folder name cannot hold "/", so no closing tag
    for split, per_class, seed in (("train", 5, 0), ("test", 2, 100)):
        for c, name in enumerate(names):
            for i in range(per_class):
                (tmp_path / split / name).mkdir(parents=True, exist_ok=True)
                make_image(seed + 10 * c + i, tint=c).save(tmp_path / split / name / f"img{i}.jpg")
    out = tmp_path / "out & <i>"
    path = tmp_path / "run.yaml"
    path.write_text(f"data: {{train: {tmp_path / 'train'}, test: {tmp_path / 'test'}}}\n"
                    f"features: {{backbones: [{TINY}], cache_dir: {tmp_path / 'cache'}}}\n"
                    "heads:\n  - {name: lr_1.a-b, type: logistic_regression, C: 1.0}\n"
                    f"output_dir: '{out}'\n")
    run(path, progress=False)
    page = (out / "report.html").read_text()
    assert "<script" not in page and "<u>" not in page and "<i>" not in page
    assert "<td>&lt;script&gt;alert(1)</td>" in page and "<td>R&amp;D &lt;u&gt;</td>" in page
    assert "<title>Run report: out &amp; &lt;i&gt;</title>" in page and "<td>lr_1.a-b</td>" in page


@pytest.mark.parametrize("heads,message", [
    ("heads:\n  - {name: a, type: logistic_regression, Cs: [1]}\n", r"unknown key 'heads\[0\]\.Cs'"),
    ("heads:\n  - {name: a, type: random_forest}\n", r"'heads\[0\]\.type': unknown type 'random_forest'"),
    ("heads:\n  - {name: a, type: knn, source: resnet18}\n", "source 'resnet18' is not among features.backbones"),
    (f"heads:\n  - {{name: a, type: knn, source: '{TINY}:layer9'}}\n", "no layer 'layer9'"),
    ("heads:\n  - {name: a, type: knn}\n  - {name: a, type: svm}\n", "'a' is used twice"),
    ("heads: []\n", "at least one head"),
    ("heads:\n  - {name: a, type: logistic_regression, C: '1'}\n",
     r"'heads\[0\]\.C' must be a finite positive number.*got '1'"),
    ("heads:\n  - {name: a, type: svm, kernel: poly}\n", r"'heads\[0\]\.kernel' must be linear or rbf"),
    ("heads:\n  - {name: a, type: pca_fusion, components: 0}\n",
     r"'heads\[0\]\.components' must be a positive integer"),
    ("heads:\n  - {name: a, type: pca_fusion, order: random}\n", r"'heads\[0\]\.order' must be pca_then_concat"),
    ("heads:\n  - {name: ../a, type: knn}\n", "it names the saved file"),
])
def test_bad_run_configs_are_refused_before_any_work(tmp_path, heads, message):
    train = make_folder(tmp_path / "train", classes=2, per_class=2)
    with pytest.raises(ConfigError, match=message):
        run(_config(tmp_path, train, train, heads=heads), progress=False)
    assert not (tmp_path / "cache").exists()


def test_run_config_with_an_unknown_top_level_key_names_it(tmp_path, capsys):
    train = make_folder(tmp_path / "train", classes=2, per_class=2)
    assert main(["run", str(_config(tmp_path, train, train, extra="ouptut: x\n"))]) == 2
    assert re.search(r"run.yaml:9:1: unknown key 'ouptut'", capsys.readouterr().err)


@needs_flowers
@pytest.mark.slow
def test_run_on_a_small_real_set(tmp_path):
    # 20 + 10 photos per species: at 8 + 4 one photo is 8% of the test and the runtimes' last bits decide it
    # (logistic regression, 4 test photos each: torch 12 of 12, OpenVINO bf16 10 of 12; at 20 + 10: 30 and 29)
    for split, count in (("train", 20), ("test", 10)):
        for cls in ("daisy", "sunflower", "iris"):
            (tmp_path / split / cls).mkdir(parents=True)
            for photo in sorted((FLOWERS / split / cls).glob("*"))[:count]:
                shutil.copy(photo, tmp_path / split / cls / photo.name)
    config = _config(tmp_path, tmp_path / "train", tmp_path / "test", backbone="efficientnet_lite0",
                     heads="heads:\n  - {name: logreg, type: logistic_regression}\n  - {name: knn, type: knn}\n")
    run(config, progress=False)
    metrics = _check_contract(tmp_path / "out", ["logreg", "knn"], images=90)
    assert metrics["heads"]["logreg"]["accuracy"] >= 0.9  # three easy species, 20 photos each


@pytest.mark.slow
def test_run_past_the_memory_budget_fits_out_of_core(tmp_path, caplog):
    train = make_folder(tmp_path / "train", classes=3, per_class=70)  # 210 x 2048 floats: 1.7 MB
    test = make_folder(tmp_path / "test", classes=3, per_class=3, start_seed=1000)
    heads = ("heads:\n  - {name: sgd, type: logistic_regression, C: [1.0], reject: {threshold: 0.5}}\n"
             f"  - {{name: fusion, type: pca_fusion, sources: [{TINY_WIDE}, '{TINY_WIDE}:stage1'], components: 8}}\n")
    with caplog.at_level(logging.INFO, logger="pipeline"):
        metrics = run(_config(tmp_path, train, test, heads=heads, extra="memory_budget_mb: 1\n", backbone=TINY_WIDE),
                      progress=False)
    assert caplog.text.count("fitting out of core") == 2
    assert metrics["heads"]["sgd"]["best_params"]["out_of_core"] and metrics["heads"]["sgd"]["accuracy"] >= 0.8
    # a given reject threshold holds out of core; the default calibration needs the rows in memory: said, not done
    assert metrics["heads"]["sgd"]["reject"]["threshold"] == 0.5
    assert metrics["heads"]["sgd"]["calibration"]["method"] == "none"
    assert caplog.text.count("fitted out of core without calibration") == 2


def test_test_split_with_fewer_classes_and_a_corrupt_file(tmp_path):
    train = make_folder(tmp_path / "train", classes=3, per_class=6)
    test = make_folder(tmp_path / "test", classes=2, per_class=3, start_seed=200)  # class0 and class1 only
    (test / "class1" / "broken.jpg").write_bytes(b"not a jpeg")
    metrics = run(_config(tmp_path, train, test, heads="heads:\n  - {name: lr, type: logistic_regression}\n"),
                  progress=False)
    assert metrics["extract"]["skipped"] == 1
    with open(tmp_path / "out" / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and all(r["true_class"] == r["path"].split("/")[-2] for r in rows)
    assert sum(r["true_class"] == r["predicted_class"] for r in rows) >= 5
    assert all(abs(sum(float(r[f"p_class{i}"]) for i in range(3)) - 1) < 1e-4 for r in rows)


def test_a_class_with_one_image_needs_a_single_setting(tmp_path):
    train = make_folder(tmp_path / "train", classes=2, per_class=4)
    (tmp_path / "train" / "class2").mkdir()
    (tmp_path / "train" / "class0" / "img0.jpg").rename(tmp_path / "train" / "class2" / "only.jpg")
    with pytest.raises(ConfigError, match="class2 has 1"):
        run(_config(tmp_path, train, train, heads="heads:\n  - {name: lr, type: logistic_regression}\n"),
            progress=False)
    single = "heads:\n  - {name: lr, type: logistic_regression, C: 1.0, calibration: none}\n"
    metrics = run(_config(tmp_path, train, train, heads=single), progress=False)
    assert metrics["heads"]["lr"]["cv_accuracy"] is None


def test_unlabelled_training_data_is_refused_before_any_work(tmp_path):
    flat = make_folder(tmp_path / "images", classes=1, per_class=3) / "class0"
    with pytest.raises(ConfigError, match="'data.train' must be a labelled folder"):
        run(_config(tmp_path, flat, flat), progress=False)
    assert not (tmp_path / "cache").exists()
