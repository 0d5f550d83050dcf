"""`finetune --ensemble` and twin networks: the last epoch's network averaged with the probe, saved as one
backbone whose features are the parent's and the fine-tuned network's side by side."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from pipeline.features.extract import extract
from pipeline.features.trained_on import trained_on
from pipeline.images.data import hash_files
from pipeline.models.registry import BACKBONES_ENV, Layer, get_spec
from pipeline.models.taps import TappedNetwork
from pipeline.models.twin import make_twin, twin_layers
from pipeline.models.weights import TRAINED_ON, load_backbone
from pipeline.tuning.finetune import FinetuneOptions, finetune
from pipeline.tuning.network import blocks
from pipeline.tuning.training import TrainSettings

from .conftest import TINY, make_folder, stage_run_config
from .test_finetune import _options, _predicts_with, _stripes


def _tuned_copy(seed: int = 0) -> torch.nn.Module:
    """The tiny parent network with its last two blocks' weights moved (a stand-in for training)."""
    network = copy.deepcopy(load_backbone(TINY).network)
    units = blocks(network, get_spec(TINY).layers["head"].module)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for unit in units[-2:]:
            for module in unit:
                for parameter in module.parameters():
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return network


def test_a_twin_runs_the_shared_blocks_once_and_sets_both_streams_side_by_side():
    spec = get_spec(TINY)
    parent, tuned = load_backbone(TINY).network, _tuned_copy()
    names = {id(m): n for n, m in tuned.named_modules()}
    paths = [names[id(m)] for unit in blocks(tuned, spec.layers["head"].module)[-2:] for m in unit]
    assert paths == ["_blocks.2", "_conv_head", "_bn1"]
    flags = twin_layers(parent, paths, {k: v.module for k, v in spec.layers.items()}, spec.preprocess.crop)
    assert flags == {"stage1": False, "stage2": True, "head": True}
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        expected = {name: TappedNetwork(network, spec.layers)(x)
                    for name, network in (("parent", parent), ("tuned", tuned))}
        layers = {k: Layer(v.module, v.dim * (2 if flags[k] else 1), v.pool, v.prefix, flags[k])
                  for k, v in spec.layers.items()}
        got = TappedNetwork(make_twin(copy.deepcopy(tuned), copy.deepcopy(parent), paths).eval(), layers)(x)
    torch.testing.assert_close(got["stage1"], expected["parent"]["stage1"])
    for layer in ("stage2", "head"):
        torch.testing.assert_close(got[layer], torch.cat([expected["parent"][layer], expected["tuned"][layer]], 1))


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
    """`finetune --ensemble` on the stripes (fp32), kept as a twin; its backbones folder is searched."""
    root = tmp_path_factory.mktemp("ensemble")
    data = root / "stripes"
    _stripes(data / "train", 16, 0)
    _stripes(data / "test", 8, 5000)
    options = FinetuneOptions(data / "train", data / "test", backbone=TINY, unfreeze="last:2", probe_C=1.0,
                              out=root / "out", name="tiny_ens", backbones_dir=root / "backbones",
                              cache_dir=root / "cache", ensemble=True,
                              train=TrainSettings(epochs=4, batch_size=8, lr=0.1, patience=4, device="cpu",
                                                  precision="fp32"))
    result = finetune(options, progress=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(BACKBONES_ENV, str(root / "backbones"))
        yield result, data, root


def test_ensemble_saves_a_twin_whose_classifier_is_the_runs_ensemble(ensemble_run, tmp_path):
    """A run that keeps the ensemble saves the twin: its head features are the parent's and the last
    epoch's side by side, and its classifier reproduces the run's test predictions (the mean of the
    network's and the refitted probe's log-probabilities); a user fits and predicts on it by name."""
    result, data, _root = ensemble_run
    m = result.metrics
    assert m["kept"] == "ensemble" and m["best_epoch"] == 4 and m["guard_p"] is None
    assert m["guard"].startswith("the ensemble of epoch 4 with the probe (") and m["guard"].endswith("): kept")
    assert m["ensemble_val_accuracy"] == m["best_val_accuracy"] >= m["start_val_accuracy"]
    spec = get_spec("tiny_ens")
    assert spec.layers["head"] == Layer("_head_act", 128, twin=True) and not spec.layers["stage1"].twin
    assert "a twin with it (finetune --ensemble)" in spec.source and spec.parent == TINY
    cache = tmp_path / "use-cache"
    X = {name: extract(data / "test", name, ["head"], cache, "cpu", "fp32", progress=False, runtime="torch")
         .feature_sets[(name, "head")] for name in (TINY, "tiny_ens")}
    twin = X["tiny_ens"].features.compute()
    np.testing.assert_allclose(twin[:, :64], X[TINY].features.compute(), rtol=1e-4, atol=1e-5)
    saved = torch.load(result.folder / "weights.pth", weights_only=True)
    logits = torch.from_numpy(twin) @ saved["classifier"]["weight"].T + saved["classifier"]["bias"]
    accuracy = float(np.mean(logits.argmax(1).numpy() == X["tiny_ens"].labels))
    assert accuracy == m["accuracy"]
    state = saved["state_dict"]
    assert not torch.equal(state["_conv_head.frozen.weight"], state["_conv_head.tuned.weight"])
    predicted = _predicts_with("tiny_ens", data / "train", data / "test", tmp_path)
    assert len(predicted) == 16 and set(predicted) <= {"class0", "class1"}


def test_fitting_on_the_images_that_trained_the_network_is_warned_of(ensemble_run, tmp_path, capsys):
    """The twin lists the images that trained its network (the training folder less its held-out part):
    `pipeline fit` on that folder warns that its cross-validated scores are optimistic, and on the test
    folder, which trained nothing, it does not."""
    from pipeline.cli.main import main

    result, data, _root = ensemble_run
    listed = set((result.folder / TRAINED_ON).read_text().split())
    train_ids = hash_files(sorted(path for path in (data / "train").rglob("*.png")))
    assert listed < set(train_ids) and len(listed) == result.metrics["images"]["train"]
    assert trained_on(get_spec("tiny_ens")) == listed and not trained_on(get_spec(TINY))
    for split in ("train", "test"):
        assert main(["fit", "--data", str(data / split), "--type", "logistic_regression", "--backbone", "tiny_ens",
                     "--out", str(tmp_path / f"{split}.skops"), "--cache", str(tmp_path / "cache"), "--quiet"]) == 0
        out, err = capsys.readouterr()
        assert ("(optimistic: see the warning above)" in out) == (split == "train"), out
        warned = (f"warning: {len(listed)} of the {len(train_ids)} images of --data {data / 'train'} trained "
                  "backbone 'tiny_ens' (pipeline finetune): scores on them (cross-validation, LogME) are optimistic")
        assert (warned in err) == (split == "train"), err
        assert main(["evaluate", "--model", str(tmp_path / f"{split}.skops"), "--data", str(data / split),
                     "--cache", str(tmp_path / "cache"), "--quiet"]) == 0
        err = capsys.readouterr().err
        assert ("of the evaluated folder trained backbone 'tiny_ens' (pipeline finetune): a test score on them is "
                "optimistic; test on images the network never saw" in err) == (split == "train"), err


def test_a_backbone_fine_tuned_from_a_fine_tuned_one_keeps_its_parents_images(tmp_path):
    """The second run trains only the linear layer (its network is the first run's): it lists the images
    that trained that network, which its own run did not."""
    folders = tmp_path / "data"
    make_folder(folders / "train", classes=3, per_class=4)
    make_folder(folders / "test", classes=3, per_class=2, start_seed=100)
    first = finetune(_options(folders, tmp_path, val_fraction=0.0, ensemble=False), progress=False)
    assert first.metrics["kept"] == "fine-tuned"
    listed = set((first.folder / TRAINED_ON).read_text().split())
    assert listed == set(hash_files(sorted((folders / "train").rglob("*.jpg"))))
    other = tmp_path / "other"
    make_folder(other / "train", classes=3, per_class=4, start_seed=200)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(BACKBONES_ENV, str(tmp_path / "backbones"))
        second = finetune(_options(other, tmp_path, backbone="tiny_ft", name="tiny_ft2", unfreeze="head", test=None,
                                   out=tmp_path / "out2"), progress=False)
    assert set((second.folder / TRAINED_ON).read_text().split()) == listed


def test_a_run_config_on_the_networks_training_folder_is_warned_of_too(ensemble_run, tmp_path, caplog):
    from pipeline.app.run import run

    result, data, _root = ensemble_run
    config = stage_run_config(tmp_path / "run.yaml", data, tmp_path / "cache", tmp_path / "out", "",
                              backbone="tiny_ens")
    with caplog.at_level("WARNING", logger="pipeline"):
        run(config, progress=False)
    count = len((result.folder / TRAINED_ON).read_text().split())
    assert f"{count} of the 32 images of 'data.train' trained backbone 'tiny_ens'" in caplog.text


@pytest.mark.parametrize("layer", ["head", "stage1"])
def test_openvino_extracts_the_twin_as_torch_does(ensemble_run, tmp_path, layer):
    _result, data, _root = ensemble_run
    features = {runtime: extract(data / "test", "tiny_ens", [layer], tmp_path / runtime, "cpu", "fp32",
                                 progress=False, runtime=runtime).feature_sets[("tiny_ens", layer)]
                for runtime in ("torch", "openvino")}
    assert features["openvino"].cache_key != features["torch"].cache_key
    np.testing.assert_allclose(features["openvino"].features.compute(), features["torch"].features.compute(),
                               rtol=1e-3, atol=1e-4)


def test_a_head_on_the_twin_exports_to_one_onnx_model_that_agrees_with_predict(ensemble_run, tmp_path):
    from .test_export import fitted_heads, onnx_vs_predict

    _result, data, _root = ensemble_run
    model = fitted_heads(tmp_path, {"lr": ("logistic_regression", ["tiny_ens:head"], {"C": 1.0})})["lr"]
    onnx_path = tmp_path / "lr.onnx"
    from pipeline.cli.main import main

    assert main(["export", "--head", str(model), "--out", str(onnx_path)]) == 0
    expected, got = onnx_vs_predict(model, onnx_path, data / "test", tmp_path / "cache")
    assert np.abs(expected - got).max() <= 1e-3 and (expected.argmax(1) == got.argmax(1)).all()


def test_an_ensemble_below_its_probe_on_the_held_out_part_keeps_the_probe(tmp_path, caplog):
    """lr 1000 wrecks the network: the ensemble with it is below the probe on the held-out part, so the
    saved backbone is the parent network with the refitted probe as its head, and the run says so."""
    folders = tmp_path / "data"
    make_folder(folders / "train", classes=3, per_class=4)
    make_folder(folders / "test", classes=3, per_class=2, start_seed=100)
    options = _options(folders, tmp_path, unfreeze="all", ensemble=True, train={"epochs": 2, "lr": 1e3})
    with caplog.at_level("INFO", logger="pipeline"):
        result = finetune(options, progress=False)
    m = result.metrics
    assert m["kept"] == "probe" and m["best_epoch"] == 0 and m["guard"].endswith("is below the probe")
    assert "keeping the probe" in caplog.text and m["accuracy"] == m["probe_accuracy"]
    saved = torch.load(result.folder / "weights.pth", weights_only=True)["state_dict"]
    parent = load_backbone(TINY).network.state_dict()
    assert saved.keys() == parent.keys() and all(torch.equal(v, parent[k]) for k, v in saved.items())
    assert not (result.folder / TRAINED_ON).exists()  # the parent's network: no image trained it
    assert "trained_on" not in json.loads((result.folder / "backbone.json").read_text())


@pytest.mark.parametrize(("change", "reason"), [({"init": "random"}, "--init random has none"),
                                                ({"unfreeze": "head"}, "only the linear layer trains")])
def test_where_no_ensemble_can_be_made_the_epochs_are_judged_and_the_run_says_why(tmp_path, caplog, change, reason):
    folders = tmp_path / "data"
    make_folder(folders / "train", classes=3, per_class=4)
    make_folder(folders / "test", classes=3, per_class=2, start_seed=100)
    with caplog.at_level("INFO", logger="pipeline"):
        m = finetune(_options(folders, tmp_path, **change), progress=False).metrics
    assert "no ensemble (" in caplog.text and reason in caplog.text
    assert m["kept"] in ("fine-tuned", "probe", "initial") and "ensemble_val_accuracy" not in m


def test_the_cli_says_what_the_ensemble_scored_and_draws_it(tmp_path, capsys):
    """`pipeline finetune --ensemble` prints the guard's line about the ensemble and what was kept, and
    the figure names the ensemble."""

    from pipeline.cli.main import main

    data = tmp_path / "stripes"
    _stripes(data / "train", 16, 0)
    _stripes(data / "test", 8, 5000)
    assert main(["finetune", "--data", str(data / "train"), "--test", str(data / "test"), "--backbone", TINY,
                 "--unfreeze", "last:2", "--probe-c", "1", "--epochs", "3", "--batch-size", "8", "--lr", "0.1",
                 "--ensemble", "--device", "cpu", "--out", str(tmp_path / "out"), "--name", "tiny_e",
                 "--backbones-dir", str(tmp_path / "backbones"), "--cache", str(tmp_path / "cache"), "--quiet"]) == 0
    out = capsys.readouterr().out
    m = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert m["kept"] == "ensemble" and m["options"]["ensemble"] is True
    assert f"{m['guard']} (7 held-out images)" in out
    assert f"the ensemble of epoch 3 with the probe: test accuracy {m['accuracy']:.1%}" in out
    assert (tmp_path / "out" / "finetune.png").stat().st_size > 10_000
