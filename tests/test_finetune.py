"""Stage 3: fine-tuning the tiny test backbone on tiny generated images (one or two epochs, batch 4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.errors import BackboneError, ConfigError
from pipeline.features.extract import extract
from pipeline.heads.fit import fit_head
from pipeline.heads.spec import HeadSpec
from pipeline.images.data import require_labelled, scan
from pipeline.models.registry import BACKBONES_ENV, get_spec, list_backbones
from pipeline.models.weights import load_backbone
from pipeline.tuning.finetune import FinetuneOptions, finetune, fit_probe, prepare
from pipeline.tuning.network import blocks, linear_from_probe, unfrozen_count
from pipeline.tuning.training import TrainResult, TrainSettings, _guard, mcnemar_p, train

from .conftest import TINY, make_folder, stage_run_config


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ft")
    make_folder(root / "train", classes=3, per_class=4)
    make_folder(root / "test", classes=3, per_class=2, start_seed=100)
    return root


def _options(folders: Path, tmp_path: Path, **kwargs) -> FinetuneOptions:
    settings = {"epochs": 1, "batch_size": 4, "device": "cpu", **kwargs.pop("train", {})}
    defaults = {"backbone": TINY, "test": folders / "test", "unfreeze": "last:2", "val_fraction": 0.25, "probe_C": 1.0,
                "out": tmp_path / "out", "name": "tiny_ft", "backbones_dir": tmp_path / "backbones",
                "cache_dir": folders / "cache"}
    return FinetuneOptions(folders / "train", **{**defaults, **kwargs}, train=TrainSettings(**settings))


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("train_bn", [False, True])
def test_only_the_chosen_blocks_change_and_frozen_batchnorm_stays_bit_identical(folders, tmp_path, train_bn):
    p = prepare(_options(folders, tmp_path, train_bn=train_bn), progress=False)
    units = blocks(p.model.network, p.parent.layers["head"].module)
    names = {id(m): n for n, m in p.model.named_modules()}
    trained = {names[id(m)] for unit in units[-2:] for m in unit}
    before = _snapshot(p.model)
    train(p.model, p.groups, p.fit_set, None, p.parent.preprocess, _settings(), progress=False)
    after = p.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    in_trained = {k for k in before if any(k.startswith(t + ".") for t in trained)}
    assert changed, "training changed nothing"
    assert changed <= in_trained | {"classifier.weight", "classifier.bias"}  # everything else bit-identical
    assert {"classifier.weight", "classifier.bias"} <= changed
    bn_keys = {k for k in in_trained if "_bn" in k}
    conv_keys = {k for k in in_trained if "conv" in k and k.endswith(".weight") and "_bn" not in k}
    assert conv_keys and conv_keys <= changed
    if train_bn:  # the unfrozen blocks' BatchNorm learns and updates its statistics
        assert {k for k in bn_keys if "running_mean" in k} <= changed and bn_keys & changed
    else:  # weights, biases and running statistics of every BatchNorm untouched
        assert not bn_keys & changed


def _settings() -> TrainSettings:
    return TrainSettings(epochs=1, batch_size=4, device="cpu", precision="bf16", lr=1e-2)


def test_lpft_head_starts_with_the_probes_weights_and_reproduces_its_predictions(folders, tmp_path):
    p = prepare(_options(folders, tmp_path), progress=False)
    weight, bias = linear_from_probe(p.probe, 3)
    assert torch.equal(p.model.classifier.weight, weight) and torch.equal(p.model.classifier.bias, bias)
    # on the cached features the probe was fitted on, the folded layer gives the probe's logits
    fs = extract(folders / "test", TINY, ["head"], folders / "cache", "cpu", "bf16",
                 progress=False).feature_sets[(TINY, "head")]
    X = fs.features.compute()
    with torch.no_grad():
        logits = p.model.classifier(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(logits, p.probe.decision_function(X), rtol=1e-4, atol=1e-4)
    assert (logits.argmax(1) == p.probe.predict(X)).all()
    random = prepare(_options(folders, tmp_path, init="random"), progress=False)
    assert random.probe is None and not torch.equal(random.model.classifier.weight, weight)


def test_binary_probe_folds_into_two_logits():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 5)) * 3 + 1, np.arange(40) % 2
    pipe = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression())]).fit(X, y)
    weight, bias = linear_from_probe(pipe, 2)
    proba = torch.softmax(torch.from_numpy(X).float() @ weight.T + bias, 1).numpy()
    np.testing.assert_allclose(proba, pipe.predict_proba(X), atol=1e-5)


def test_resume_after_an_interruption_continues_at_the_next_epoch_and_matches(folders, tmp_path):
    whole = finetune(_options(folders, tmp_path / "a", train={"epochs": 2}), progress=False)

    def stop(epoch: int, _record: dict) -> None:
        if epoch == 1:
            raise KeyboardInterrupt
    options = _options(folders, tmp_path / "b", train={"epochs": 2})
    with pytest.raises(KeyboardInterrupt):
        finetune(options, progress=False, on_epoch=stop)
    assert not (tmp_path / "b" / "backbones" / "tiny_ft").exists()
    seen = []
    resumed = finetune(_options(folders, tmp_path / "b", train={"epochs": 2}, resume=True), progress=False,
                       on_epoch=lambda epoch, _r: seen.append(epoch))
    assert seen == [2] and resumed.metrics["resumed_from_epoch"] == 1
    assert [h["loss"] for h in resumed.metrics["history"]] == [h["loss"] for h in whole.metrics["history"]]
    a = torch.load(whole.folder / "weights.pth", weights_only=True)
    b = torch.load(resumed.folder / "weights.pth", weights_only=True)
    for part in ("state_dict", "classifier"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), key
    with pytest.raises(ConfigError, match="other settings .*lr_decay"):
        finetune(_options(folders, tmp_path / "b", lr_decay=0.9, resume=True, name="other"), progress=False)


def test_saved_backbone_loads_through_the_registry_and_gets_its_own_cache_key(folders, tmp_path, monkeypatch):
    result = finetune(_options(folders, tmp_path, name="flowers_ft", val_fraction=0, ensemble=False), progress=False)
    monkeypatch.setenv(BACKBONES_ENV, str(tmp_path / "backbones"))
    assert "flowers_ft" in list_backbones()
    spec = get_spec("flowers_ft")
    assert spec.parent == TINY and spec.preprocess == get_spec(TINY).preprocess
    loaded = load_backbone("flowers_ft")
    saved = torch.load(result.folder / "weights.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in loaded.network.state_dict().items())
    cache = tmp_path / "cache"
    sets = {name: extract(folders / "train", name, None, cache, "cpu", "bf16", progress=False)
            .feature_sets[(name, "head")] for name in (TINY, "flowers_ft")}
    assert sets["flowers_ft"].cache_key != sets[TINY].cache_key
    assert sets["flowers_ft"].cache_key.startswith("flowers_ft-head-bf16-")
    X = sets["flowers_ft"].features.compute()
    assert not np.allclose(X, sets[TINY].features.compute())
    head = fit_head(HeadSpec("lr", "logistic_regression", ["flowers_ft:head"], {"C": 1.0}), X,
                    sets["flowers_ft"].labels, [X.shape[1]])
    assert head.pipeline.score(X, sets["flowers_ft"].labels) > 0.5
    with pytest.raises(ConfigError, match="already exists"):
        finetune(_options(folders, tmp_path, name="flowers_ft"), progress=False)
    weights = result.folder / "weights.pth"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(BackboneError, match="do not match the SHA-256 in its manifest") as info:
        load_backbone("flowers_ft")
    assert "\n" not in str(info.value)


def test_unfreeze_choices_and_blocks_of_lite0():
    loaded = load_backbone("efficientnet_lite0")
    units = blocks(loaded.network, "_head_act")
    assert len(units) == 18  # stem, 16 MBConv blocks, head convolution (each with its BatchNorm)
    assert [type(m).__name__ for m in units[-1]] == ["SameConv2d", "BatchNorm2d"]
    assert (unfrozen_count("head", 18), unfrozen_count("last:3", 18), unfrozen_count("all", 18)) == (0, 3, 18)
    for bad in ("last:0", "last:19", "some"):
        with pytest.raises(ConfigError, match="unfreeze must be"):
            unfrozen_count(bad, 18)


def _run_config(folders: Path, tmp_path: Path, finetune: str) -> Path:
    return stage_run_config(tmp_path / "run.yaml", folders, folders / "cache", tmp_path / "out",
                            f"finetune: {finetune}")


@pytest.mark.parametrize(("section", "message"), [
    ("{epochs: 1, unfrezee: last:2}", r"unknown key 'finetune\.unfrezee'"),
    ("{epochs: one}", r"'finetune\.epochs' must be a positive integer"),
    ("{train_bn: 1}", r"'finetune\.train_bn' must be true or false"),
    ("{unfreeze: some}", r"'finetune': unfreeze must be head, all or last:N"),
    ("{init: warm}", r"'finetune\.init' must be probe or random, got 'warm'"),
    ("[1, 2]", r"'finetune' must be a mapping"),
])
def test_run_config_finetune_section_is_validated_naming_file_and_key(folders, tmp_path, section, message):
    from pipeline.app.run import run

    path = _run_config(folders, tmp_path, section)
    with pytest.raises(ConfigError, match=message) as info:
        run(path, progress=False)
    assert str(path) in str(info.value)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_run_config_finetune_section_adds_its_metrics(folders, tmp_path, monkeypatch):
    import json

    from pipeline.app.run import run

    monkeypatch.setenv(BACKBONES_ENV, str(tmp_path / "backbones"))
    path = _run_config(folders, tmp_path, "{epochs: 1, batch_size: 4, unfreeze: last:1, probe_C: 1.0, val_fraction: 0}")
    run(path, progress=False)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["finetune"]
    assert set(metrics) == {"accuracy", "macro_f1", "seconds", "backbone", "probe_accuracy", "best_epoch",
                            "kept"}
    assert metrics["backbone"] == f"{TINY}_ft_out" and isinstance(metrics["accuracy"], float)
    assert get_spec(f"{TINY}_ft_out").parent == TINY
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<h2>Fine-tuning</h2>" in page and 'href="finetune/finetune.png"' in page
    assert (tmp_path / "out" / "finetune" / "finetune.png").stat().st_size > 10_000


def _stripes(root: Path, per_class: int, seed: int) -> Path:
    """Two classes told apart only by the direction of faint stripes under noise: the tiny random
    backbone's pooled features barely see it (its probe is near chance), training the blocks does."""
    y, x = np.mgrid[0:48, 0:48] / 48
    for c, axis in enumerate((x, y)):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng(seed + 100 * c + i)
            stripes = (np.sin(axis * 20 + rng.uniform(0, 6)) > 0)[..., None]
            pixels = rng.uniform(60, 200, 3) * (0.8 + 0.2 * stripes) + rng.normal(0, 30, (48, 48, 3))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def _predicts_with(backbone: str, train: Path, test: Path, tmp_path: Path) -> list[str]:
    """Fit a head on the saved backbone's features and predict the test folder, as a user does."""
    import csv

    from pipeline.cli.main import main

    cache, head, out = str(tmp_path / "use-cache"), str(tmp_path / "head.skops"), tmp_path / "predictions.csv"
    assert main(["fit", "--data", str(train), "--type", "logistic_regression", "--backbone", backbone,
                 "--out", head, "--cache", cache, "--quiet"]) == 0
    assert main(["predict", "--model", head, "--data", str(test), "--out", str(out), "--cache", cache,
                 "--quiet"]) == 0
    with out.open() as fh:
        return [row["predicted_class"] for row in csv.DictReader(fh)]


def test_a_run_that_cannot_beat_its_probe_keeps_the_probe_and_says_so(folders, tmp_path, monkeypatch, caplog):
    """lr 1000 wrecks the network in one step: no epoch can beat the probe on the held-out part (the
    default 20% of the training folder), so the saved backbone is the parent network with the probe,
    refitted on every training image, as its head; the run says so in the log and finetune.json."""
    import json

    options = _options(folders, tmp_path, val_fraction=FinetuneOptions("x").val_fraction, unfreeze="all",
                       ensemble=False, train={"epochs": 2, "lr": 1e3})
    with caplog.at_level("INFO", logger="pipeline"):
        result = finetune(options, progress=False)
    m = result.metrics
    assert m["kept"] == "probe" and m["best_epoch"] == 0 and m["images"]["val"] == 3
    assert all(r["val_accuracy"] <= m["start_val_accuracy"] for r in m["history"])
    assert m["best_val_accuracy"] == m["start_val_accuracy"]
    assert json.loads((tmp_path / "out" / "finetune.json").read_text())["kept"] == "probe"
    assert "no trained epoch beat the starting weights'" in caplog.text and "keeping the probe" in caplog.text
    assert m["guard"].startswith("no trained epoch beat") and m["guard_p"] is None
    saved = torch.load(result.folder / "weights.pth", weights_only=True)
    parent = load_backbone(TINY).network.state_dict()
    assert all(torch.equal(v, parent[k]) for k, v in saved["state_dict"].items())
    everything = fit_probe(require_labelled(scan(folders / "train"), "train"), TINY, options, progress=False)
    weight, bias = linear_from_probe(everything, 3)  # the probe of all 12 images, not of the 9 it started from
    for part, value in (("weight", weight), ("bias", bias)):  # rows in another order: the solver's tolerance
        torch.testing.assert_close(saved["classifier"][part], value, atol=1e-3, rtol=1e-3)
    test = extract(folders / "test", TINY, ["head"], folders / "cache", "cpu", "bf16",
                   progress=False).feature_sets[(TINY, "head")]
    probe_on_test = float(np.mean(everything.predict(test.features.compute()) == test.labels))
    # the reference is the probe on every training image, on cached features; what is kept is that probe, scored so
    assert m["probe_accuracy"] == probe_on_test and m["accuracy"] == probe_on_test
    assert m["start_probe_accuracy"] is not None  # the probe it started from, on the 9 images it trained on
    monkeypatch.setenv(BACKBONES_ENV, str(tmp_path / "backbones"))
    predicted = _predicts_with("tiny_ft", folders / "train", folders / "test", tmp_path)
    assert len(predicted) == 6 and set(predicted) <= {"class0", "class1", "class2"}


def test_a_run_that_beats_its_probe_keeps_its_best_epoch(tmp_path, monkeypatch, caplog):
    data = tmp_path / "stripes"
    _stripes(data / "train", 16, 0)
    _stripes(data / "test", 8, 5000)
    options = FinetuneOptions(data / "train", data / "test", backbone=TINY, unfreeze="all", probe_C=1.0,
                              out=tmp_path / "out", name="tiny_stripes", backbones_dir=tmp_path / "backbones",
                              cache_dir=tmp_path / "cache", ensemble=False,
                              train=TrainSettings(epochs=6, batch_size=8, lr=0.1, patience=6, device="cpu"))
    with caplog.at_level("INFO", logger="pipeline"):
        result = finetune(options, progress=False)
    m = result.metrics
    assert m["kept"] == "fine-tuned" and m["best_epoch"] >= 1 and "keeping the probe" not in caplog.text
    assert m["best_val_accuracy"] > m["start_val_accuracy"]
    assert m["best_val_accuracy"] == max(r["val_accuracy"] for r in m["history"])
    assert m["best_epoch"] == m["best_trained_epoch"] and m["guard_p"] < 1 and m["guard"].endswith("): kept")
    saved = torch.load(result.folder / "weights.pth", weights_only=True)["state_dict"]
    parent = load_backbone(TINY).network.state_dict()
    assert not all(torch.equal(v, parent[k]) for k, v in saved.items())
    monkeypatch.setenv(BACKBONES_ENV, str(tmp_path / "backbones"))
    predicted = _predicts_with("tiny_stripes", data / "train", data / "test", tmp_path)
    assert len(predicted) == 16 and set(predicted) <= {"class0", "class1"}


def test_finetune_prints_a_broken_training_image_and_writes_the_skip_list(tmp_path, capsys):
    from pipeline.cli.main import main

    train = make_folder(tmp_path / "train", classes=2, per_class=3)
    broken = train / "class1" / "broken.jpg"
    broken.write_bytes(b"not an image")
    skipped = tmp_path / "ft-skipped.csv"
    assert main(["finetune", "--data", str(train), "--backbone", TINY, "--unfreeze", "last:2", "--epochs", "1",
                 "--batch-size", "4", "--device", "cpu", "--out", str(tmp_path / "out"), "--name", "tiny_ft_skips",
                 "--backbones-dir", str(tmp_path / "backbones"), "--cache", str(tmp_path / "cache"),
                 "--skipped", str(skipped), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"skipped {broken}: not an image (unknown format)" in out
    assert f"full list, with reasons: {skipped}" in out
    assert skipped.read_text().splitlines() == ["path,reason", f"{broken},not an image (unknown format)"]


def test_mcnemar_p_is_the_exact_one_sided_binomial_tail():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(5, 0) == 1 / 32  # five disagreements, all the trained model's way
    assert mcnemar_p(0, 5) == 1.0
    assert mcnemar_p(3, 3) == pytest.approx(42 / 64)  # P(X >= 3), X ~ Binomial(6, 1/2)
    assert mcnemar_p(10, 2) == pytest.approx(79 / 4096)


def _run(history: list[tuple[float, int, int]], start: float = 0.80) -> TrainResult:
    """A finished run: per epoch (held-out accuracy, images gained, images lost against the start)."""
    records = [{"val_accuracy": a, "val_gained": g, "val_lost": lost} for a, g, lost in history]
    best = max(range(len(records)), key=lambda i: (records[i]["val_accuracy"], -i)) + 1
    return TrainResult(history=records, start_val_accuracy=start, best_trained_epoch=best)


@pytest.mark.parametrize(("history", "alpha", "kept"), [
    ([(0.78, 2, 6), (0.82, 6, 2)], 0.05, 0),  # epoch 2 leads by 4 of 200, p 0.14: the start stays
    ([(0.78, 2, 6), (0.82, 6, 2)], 1.0, 2),  # level 1: any lead is kept (the guard before)
    ([(0.85, 12, 2), (0.84, 10, 2)], 0.05, 1),  # a lead of 10 with 2 lost, p 0.006: kept
    ([(0.80, 4, 4)], 1.0, 0),  # a tie never replaces the start
])
def test_the_guard_keeps_an_epoch_only_when_it_beats_the_start_by_more_than_chance(history, alpha, kept):
    result = _run(history)
    assert _guard(result, TrainSettings(guard_alpha=alpha)) == kept
    if result.history[result.best_trained_epoch - 1]["val_accuracy"] > result.start_val_accuracy:
        best = result.history[result.best_trained_epoch - 1]
        assert result.guard_p == mcnemar_p(best["val_gained"], best["val_lost"])


def test_guard_alpha_outside_zero_to_one_is_refused():
    for alpha in (0.0, 1.5):
        with pytest.raises(ConfigError, match="guard-alpha"):
            TrainSettings(guard_alpha=alpha).check()


def test_the_figure_says_why_a_better_held_out_epoch_was_not_kept(tmp_path):
    from pipeline.reporting.figures import finetune_figure

    history = [{"epoch": e, "loss": 1.0 / e, "val_accuracy": 0.80 + 0.01 * e, "val_gained": 8, "val_lost": 3}
               for e in range(1, 5)]
    metrics = {"history": history, "backbone": "tiny_ft", "kept": "probe", "best_epoch": 0, "best_trained_epoch": 4,
               "start_val_accuracy": 0.82, "guard_p": 0.113, "guard_alpha": 0.05, "probe_accuracy": 0.8,
               "accuracy": 0.81}
    path = finetune_figure(metrics, tmp_path / "finetune.png")
    with Image.open(path) as image:
        assert image.size[0] > 600 and image.size[1] > 300


@pytest.mark.parametrize("level", ["1", "0.01"])
def test_finetune_says_what_the_guard_kept_and_why(tmp_path, capsys, caplog, level):
    """The stripes run leads its probe on the held-out part by a few of its 7 images: any lead (level 1,
    the default) keeps the epoch and the CLI prints the evidence; at 0.01 the lead is not enough, and the
    probe is kept, saying so in the log (and in finetune.json)."""
    import json

    from pipeline.cli.main import main

    data = tmp_path / "stripes"
    _stripes(data / "train", 16, 0)
    _stripes(data / "test", 8, 5000)
    with caplog.at_level("INFO", logger="pipeline"):
        assert main(["finetune", "--data", str(data / "train"), "--test", str(data / "test"), "--backbone", TINY,
                     "--unfreeze", "all", "--probe-c", "1", "--epochs", "6", "--batch-size", "8", "--lr", "0.1",
                     "--guard-alpha", level, "--no-ensemble", "--device", "cpu", "--out", str(tmp_path / "out"),
                     "--name", "tiny_g", "--backbones-dir", str(tmp_path / "backbones"),
                     "--cache", str(tmp_path / "cache"), "--quiet"]) == 0
    out = capsys.readouterr().out
    m = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert m["guard_alpha"] == float(level) and 0 < m["guard_p"] < 1 and m["best_trained_epoch"] >= 1
    if level == "1":
        assert m["kept"] == "fine-tuned" and f"McNemar p = {m['guard_p']:.3f}): kept (7 held-out images)" in out
    else:
        assert m["kept"] == "probe" and "does not beat them by more than chance: keeping the probe" in caplog.text
        assert out.count("McNemar p") == 1  # said once: the log line, not again by the CLI
