"""CLIP backbones and zero-shot heads, on a tiny OpenCLIP model whose weights the test writes.

The tiny CLIP (a 1-block ViT on 32 px images, a 1-layer text transformer, OpenCLIP's real BPE tokenizer)
has random weights: it serves plumbing only. It is registered through the public API by the plugin
function `register_tiny_clip` (PIPELINE_PLUGINS, so that subprocesses and workers know it too), its
weights file named by $PIPELINE_TINY_CLIP_WEIGHTS.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.errors import ConfigError
from pipeline.heads.calibration import TemperatureScaling
from pipeline.heads.fit import fit_head
from pipeline.heads.spec import DEFAULT_TEMPLATES, HEAD_OPTIONS, HeadSpec
from pipeline.heads.zero_shot import ZeroShotBlend, ZeroShotClassifier, prompts
from pipeline.models.registry import PLUGINS_ENV
from tests.conftest import make_folder

NAME = "tiny_clip_test"
WEIGHTS_ENV = "PIPELINE_TINY_CLIP_WEIGHTS"
PLUGIN = "tests.test_zero_shot:register_tiny_clip"
CONFIG = {"embed_dim": 16,
          "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def _locate() -> Path:
    from pipeline.core.errors import BackboneError

    if WEIGHTS_ENV not in os.environ:  # outside the tests that write it
        raise BackboneError(f"{NAME}: ${WEIGHTS_ENV} is not set")
    return Path(os.environ[WEIGHTS_ENV])


def register_tiny_clip() -> None:
    from pipeline.models.openclip import ClipModel, register_openclip

    register_openclip(NAME, ClipModel(CONFIG, remote=None, source="tiny random CLIP (tests)", locate=_locate))


def _reference_model():
    import open_clip

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = open_clip.CLIP(**CONFIG)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory):
    """The tiny CLIP's whole checkpoint (both towers, as OpenCLIP saves one), registered here and for
    every process started from here."""
    path = tmp_path_factory.mktemp("tinyclip") / "tiny_clip.pth"
    model = _reference_model()
    torch.save(model.state_dict(), path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(WEIGHTS_ENV, str(path))
        patch.setenv(PLUGINS_ENV, ",".join(filter(None, [os.environ.get(PLUGINS_ENV), PLUGIN])))
        yield model


def test_the_backbone_layer_is_openclips_normalised_image_embedding(tiny_clip):
    from pipeline.models.weights import load_backbone

    loaded = load_backbone(NAME)
    assert loaded.spec.default_layer == "embedding" and loaded.spec.layers["embedding"].dim == 16
    assert loaded.spec.preprocess.crop == 32
    x = torch.randn(3, 3, 32, 32)
    ours = loaded.network(x)
    np.testing.assert_allclose(ours.numpy(), tiny_clip.encode_image(x, normalize=True).detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(ours.norm(dim=1).numpy(), 1.0, atol=1e-6)


def test_class_embeddings_match_openclips_zero_shot_classifier(tiny_clip):
    import open_clip

    from pipeline.models.openclip import text_embeddings

    names = ["sea_lion", "red-fox", "tabby cat"]
    texts = prompts(names, list(DEFAULT_TEMPLATES), {"tabby cat": "tabby"})
    assert texts[0][0] == "itap of a sea lion." and texts[1][1] == "a bad photo of the red fox."
    assert texts[2][-1] == "a photo of the small tabby."
    ours, scale = text_embeddings(NAME, texts)
    with torch.inference_mode():
        reference = open_clip.build_zero_shot_classifier(
            tiny_clip, open_clip.SimpleTokenizer(), ["sea lion", "red fox", "tabby"],
            [lambda c, t=t: t.replace("{}", c) for t in DEFAULT_TEMPLATES], device="cpu")
    np.testing.assert_allclose(ours, reference.T.numpy(), atol=1e-5)
    assert scale == pytest.approx(float(tiny_clip.logit_scale.detach().exp()))


def test_prompts_refuse_class_prompts_for_unknown_classes():
    with pytest.raises(ConfigError, match="not class folders: dog"):
        prompts(["cat"], ["a {}."], {"dog": "hound"})


def test_zero_shot_probabilities_are_the_softmax_of_scaled_cosines():
    rng = np.random.default_rng(0)
    E = rng.normal(size=(3, 8))
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    X = rng.normal(size=(5, 8)) * 7  # any length: rows are normalised
    clf = ZeroShotClassifier(E, 50.0).fit(X)
    cos = (X / np.linalg.norm(X, axis=1, keepdims=True)) @ E.T
    expected = np.exp(50 * cos) / np.exp(50 * cos).sum(1, keepdims=True)
    np.testing.assert_allclose(clf.predict_proba(X), expected, rtol=1e-9)
    assert list(clf.predict(X)) == list(cos.argmax(1))
    with pytest.raises(ValueError, match="width 7 do not match the 8-wide"):
        clf.predict_proba(X[:, :7])


def test_the_blend_spans_regression_and_zero_shot_and_is_chosen_by_cross_validation():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    E = np.linalg.qr(rng.normal(size=(8, 3)))[0].T  # three orthonormal class directions
    y = np.arange(30) % 3
    X = E[y] + rng.normal(scale=0.8, size=(30, 8))
    prior = ZeroShotClassifier(E, 20.0)
    alone = ZeroShotBlend(prior, C=1.0, weight=1.0).fit(X, y)
    np.testing.assert_allclose(alone.predict_proba(X), prior.fit(X).predict_proba(X), atol=1e-9)
    none = ZeroShotBlend(prior, C=1.0, weight=0.0).fit(X, y)
    regression = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, solver="newton-cg", max_iter=3000))
    np.testing.assert_allclose(none.predict_proba(X), regression.fit(X, y).predict_proba(X), atol=1e-6)
    spec = HeadSpec("few", "logistic_regression", ["clip:embedding"],
                    {**HEAD_OPTIONS["logistic_regression"], "C": [0.1, 1.0], "zero_shot_prior": [0.0, 0.5, 1.0]})
    fitted = fit_head(spec, X, y, [8], prior=prior)
    assert set(fitted.best_params) == {"clf__C", "clf__weight"} and fitted.cv_accuracy is not None
    proba = fitted.pipeline.predict_proba(X)
    np.testing.assert_allclose(proba.sum(1), 1.0)


def test_a_zero_shot_head_without_its_prior_is_refused():
    spec = HeadSpec("zs", "zero_shot", ["clip:embedding"], dict(HEAD_OPTIONS["zero_shot"]))
    with pytest.raises(ConfigError, match="needs the class embeddings"):
        fit_head(spec, np.zeros((4, 8)), np.array([0, 1, 0, 1]), [8])


def _write_config(path: Path, data: Path, cache: Path, out: Path, heads: str, backbone: str = NAME) -> Path:
    path.write_text(f"data: {{train: {data / 'train'}, test: {data / 'test'}}}\n"
                    f"features: {{backbones: [{backbone}], cache_dir: {cache}, device: cpu}}\n"
                    f"heads:\n{heads}\noutput_dir: {out}\n")
    return path


def test_a_zero_shot_head_runs_end_to_end_through_run_report_and_predict(tiny_clip, tmp_path):
    """Config file -> pipeline run -> metrics, report, saved head -> pipeline predict, on the tiny CLIP."""
    from pipeline.cli.main import main
    from pipeline.heads.bundle import load_bundle

    data = tmp_path / "data"
    make_folder(data / "train", classes=3, per_class=4)
    make_folder(data / "test", classes=3, per_class=3, start_seed=100)
    out, cache = tmp_path / "run", tmp_path / "cache"
    heads = ("  - {name: zs, type: zero_shot, templates: ['a photo of a {}.', 'a {} pattern.'],"
             " class_prompts: {class0: red stripes}}\n"
             "  - {name: few, type: logistic_regression, C: 1.0, zero_shot_prior: [0.0, 0.5]}\n"
             "  - {name: logreg, type: logistic_regression, C: 1.0}")
    config = _write_config(tmp_path / "run.yaml", data, cache, out, heads)
    assert main(["run", str(config), "--quiet"]) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["heads"]["zs"]["type"] == "zero_shot"
    assert metrics["heads"]["zs"]["sources"] == [f"{NAME}:embedding"]
    assert metrics["heads"]["zs"]["cv_accuracy"] is None and metrics["heads"]["zs"]["best_params"] == {}
    assert set(metrics["heads"]["few"]["best_params"]) == {"clf__C", "clf__weight"}
    assert "zs" in (out / "report.html").read_text()

    bundle = load_bundle(out / "heads" / "zs.skops")
    clf = bundle.pipeline.named_steps["clf"]
    assert isinstance(clf, ZeroShotClassifier) and clf.class_embeddings.shape == (3, 16)
    assert bundle.head.options["templates"] == ["a photo of a {}.", "a {} pattern."]
    few = load_bundle(out / "heads" / "few.skops").pipeline.named_steps["clf"]  # calibrated as a logistic head is
    assert isinstance(few, TemperatureScaling) and isinstance(few.estimator_, ZeroShotBlend)

    predictions = tmp_path / "predictions.csv"
    assert main(["predict", "--model", str(out / "heads" / "zs.skops"), "--data", str(data / "test"),
                 "--cache", str(cache), "--out", str(predictions), "--quiet"]) == 0
    rows = list(csv.DictReader(predictions.open()))
    assert len(rows) == 9
    # The saved head predicts what it scored in the run: the same accuracy on the same test folder.
    correct = [Path(row["path"]).parent.name == row["predicted_class"] for row in rows]
    assert np.mean(correct) == pytest.approx(metrics["heads"]["zs"]["accuracy"])
    np.testing.assert_allclose([sum(float(row[f"p_class{c}"]) for c in range(3)) for row in rows], 1.0, atol=1e-5)

    # The recurring batch job uses it like any head: the same predicted class for every image.
    batch = tmp_path / "batch.yaml"
    batch.write_text(json.dumps({"inputs": [str(data / "test")], "heads": {"zs": str(out / "heads" / "zs.skops")},
                                 "features": {"cache_dir": str(cache)}, "output_dir": str(tmp_path / "batch"),
                                 "log": str(tmp_path / "runs.jsonl")}))
    assert main(["batch", str(batch), "--quiet"]) == 0
    batch_rows = [r for path in (tmp_path / "batch").glob("*/run-*.csv") for r in csv.DictReader(path.open())]
    predicted = {Path(row["path"]).name + Path(row["path"]).parent.name: row["predicted_class"] for row in rows}
    assert len(batch_rows) == 9
    assert {Path(r["path"]).name + Path(r["path"]).parent.name: r["predicted_class"] for r in batch_rows} == predicted


def test_a_zero_shot_head_on_a_backbone_without_a_text_tower_is_refused_before_extraction(tiny_clip, tmp_path):
    from pipeline.app.run import run

    data = tmp_path / "data"
    make_folder(data / "train", classes=2, per_class=2)
    make_folder(data / "test", classes=2, per_class=1, start_seed=50)
    config = _write_config(tmp_path / "run.yaml", data, tmp_path / "cache", tmp_path / "out",
                           "  - {name: zs, type: zero_shot}", backbone="tiny_test")
    with pytest.raises(ConfigError, match="head 'zs': a zero_shot head reads a CLIP backbone's embedding layer, "
                                          "not tiny_test:head"):
        run(config, progress=False)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("templates", [[], ["no placeholder"], ["{} and {}"], ["a {} of {x}"]])
def test_bad_templates_are_refused_with_the_config_line(tmp_path, templates):
    from tests.conftest import config_error

    (tmp_path / "a").mkdir()
    text = f"data: {{train: a, test: a}}\nheads:\n  - {{name: zs, type: zero_shot, templates: {json.dumps(templates)}}}"
    error = config_error(tmp_path, text)
    assert error.startswith(":3:") and "'heads[0].templates' must be a list of texts, each with one {}" in error
    assert error.endswith(f"got {templates}")


def test_a_clip_checkpoint_in_the_hub_cache_serves_both_towers_offline_and_listings_never_download(
        tiny_clip, tmp_path, monkeypatch, capsys):
    """A registered CLIP entry pinned like the curated ones finds its checkpoint in a Hugging Face hub cache
    layout with downloads off; `pipeline backbones` lists the curated ones as not on disk, downloading nothing."""
    from pipeline.cli.main import main
    from pipeline.core.hashing import file_sha256
    from pipeline.models import download
    from pipeline.models.openclip import ClipModel, register_openclip, text_embeddings
    from pipeline.models.weights import load_backbone

    source = Path(os.environ[WEIGHTS_ENV])
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hf" / "models--org--tiny-clip" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(source.read_bytes())
    for name in ("HF_HOME", "TORCH_HOME"):
        monkeypatch.setenv(name, str(tmp_path / name))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv(download.OFFLINE_ENV, "1")
    monkeypatch.delenv(download.WEIGHTS_ENV, raising=False)
    remote = download.RemoteFile(url="https://127.0.0.1:9/tiny.bin", sha256=file_sha256(source),
                                 size=source.stat().st_size, file_name="tiny-clip.bin",
                                 hub=("org/tiny-clip", revision, "open_clip_pytorch_model.bin"))
    register_openclip("tiny_clip_hub", ClipModel(CONFIG, remote, source="tiny random CLIP in a hub cache"))
    loaded = load_backbone("tiny_clip_hub")
    assert loaded.weights_path == snapshot / "open_clip_pytorch_model.bin"
    embeddings, _ = text_embeddings("tiny_clip_hub", [["a cat."], ["a dog."]])
    assert embeddings.shape == (2, 16)

    def no_download(*_args, **_kwargs):
        raise AssertionError("a listing tried to download")

    monkeypatch.setattr(download, "download", no_download)
    monkeypatch.delenv(download.OFFLINE_ENV)  # downloads allowed: the listing still must not fetch
    assert main(["backbones"]) == 0
    listing = capsys.readouterr().out
    assert f"tiny_clip_hub\n  tiny random CLIP in a hub cache\n  weights: on disk: {snapshot}" in listing
    b16 = listing[listing.index("clip_vit_b16_laion2b\n"):].split("\n")[:4]
    assert b16[2].startswith("  weights: not on disk; downloaded on first use (") and "laion/CLIP-ViT-B-16" in b16[2]
    assert b16[3] == ("  licence: MIT; 86.2 M parameters; 70.2% ImageNet zero-shot top-1 (model card of "
                      "laion/CLIP-ViT-B-16-laion2B-s34B-b88K (OpenCLIP))")
