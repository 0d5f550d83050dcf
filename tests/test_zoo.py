"""The timm zoo: a tiny timm ViT whose weights this test writes, served from 127.0.0.1, downloaded,
pinned, loaded by timm and pooled three ways; the curated entries, `timm.NAME`, `pipeline backbones`,
`backbones: auto`; and the bundled Lite backbones with no network and no hub cache at all."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from pipeline.app.config import auto_candidates
from pipeline.cli.main import main
from pipeline.core.errors import BackboneError
from pipeline.features.extract import extract
from pipeline.models import registry
from pipeline.models.download import RemoteFile
from pipeline.models.registry import get_spec
from pipeline.models.taps import TappedNetwork, tapped
from pipeline.models.timm_zoo import CURATED, layout_of, model_facts, timm_spec
from pipeline.models.weights import load_backbone, save_backbone

from .conftest import ROOT
from .weights_server import checkpoints, downloads_allowed, sha256, weights_server

TINY_VIT = "tiny_timm_vit"
ARCH = "vit_tiny_patch16_224"
SHRINK = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 32, "patch_size": 8}


@pytest.fixture
def env(monkeypatch, tmp_path):
    return downloads_allowed(monkeypatch, tmp_path)


@pytest.fixture
def served_vit(env, monkeypatch):
    """A tiny timm ViT (fixed seed) saved as safetensors, served over HTTP and registered with its pin."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        network = timm.create_model(ARCH, pretrained=False, num_classes=0, **SHRINK).eval()
    save_file(network.state_dict(), env / "tiny.safetensors")
    data = (env / "tiny.safetensors").read_bytes()
    with weights_server() as server:
        remote = RemoteFile(server.serve("tiny.safetensors", data), sha256(data), len(data), "tiny-vit.safetensors")
        factory = lambda: timm_spec(TINY_VIT, ARCH, remote=remote, model_kwargs=SHRINK)  # noqa: E731
        registry.list_backbones()  # the built-ins first, so that they outlive this registration
        monkeypatch.setattr(registry, "_FACTORIES", {**registry._FACTORIES, TINY_VIT: factory})
        monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))
        yield server, network


def test_a_tiny_timm_vit_is_downloaded_once_and_pooled_three_ways(served_vit, env, tiny_folder, cache_dir):
    server, _network = served_vit
    layers = ["pooled", "final_cls", "final_mean", "block1_cls_mean"]
    report = extract(tiny_folder, TINY_VIT, layers, cache_dir, progress=False)
    assert checkpoints(env) == ["tiny-vit.safetensors"] and server.requests == ["tiny.safetensors"]
    sets = {layer: report.feature_sets[(TINY_VIT, layer)] for layer in layers}
    features = {layer: np.asarray(fs.features.compute()) for layer, fs in sets.items()}
    assert {k: v.shape[1] for k, v in features.items()} == {"pooled": 32, "final_cls": 32, "final_mean": 32,
                                                             "block1_cls_mean": 64}
    np.testing.assert_allclose(features["pooled"], features["final_cls"], rtol=1e-5, atol=1e-5)  # timm's token pool
    assert not np.allclose(features["final_cls"], features["final_mean"], atol=1e-3)
    assert len({fs.cache_key for fs in sets.values()}) == 4  # pooling is part of the cache key
    again = extract(tiny_folder, TINY_VIT, layers, cache_dir, progress=False)
    assert again.computed == 0 and server.requests == ["tiny.safetensors"]  # from the disk and the cache


def test_offline_refuses_the_download_with_one_line(served_vit, tiny_folder, cache_dir, capsys):
    server, _network = served_vit
    for argv in (["--offline", "extract"], ["extract", "--offline"]):
        code = main([*argv, "--data", str(tiny_folder), "--backbone", TINY_VIT, "--cache", str(cache_dir), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert err.startswith(f"error: weights for '{TINY_VIT}' are not on disk and downloads are off")
        assert "tiny-vit.safetensors" in err and server.url("tiny.safetensors") in err
    assert server.requests == []


def test_mean_pooling_leaves_out_the_class_and_register_tokens():
    network = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, depth=1,
                                embed_dim=32, num_heads=2, img_size=28).eval()
    layers = layout_of(network).layers()
    assert layers["final_mean"].prefix == 5  # one class token and four registers
    x = torch.rand(2, 3, 28, 28)
    with torch.inference_mode():
        tokens = network.forward_features(x)
        out = TappedNetwork(network, dict(layers))(x)
    torch.testing.assert_close(out["final_mean"], tokens[:, 5:].mean(1))
    torch.testing.assert_close(out["final_cls"], tokens[:, 0])
    torch.testing.assert_close(out["final_cls_mean"], torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], 1))
    torch.testing.assert_close(out["pooled"], tokens[:, 0])


def test_curated_entries_carry_their_card_preprocessing_and_pin():
    spec = get_spec("dinov2_vits14_reg")
    assert (spec.preprocess.resize, spec.preprocess.crop, spec.preprocess.interpolation) == (256, 224, "bicubic")
    assert spec.card.licence == "apache-2.0" and spec.card.published == "80.9% ImageNet linear probe"
    assert spec.remote.hub == ("timm/vit_small_patch14_reg4_dinov2.lvd142m", CURATED["dinov2_vits14_reg"].revision,
                               "model.safetensors")
    siglip = get_spec("siglip_vitb16")  # attention-pool head, no class token: only mean pooling
    assert siglip.preprocess.mean == (0.5, 0.5, 0.5) and "final_cls" not in siglip.layers
    assert "stage4" in get_spec("convnext_tiny_22k").layers
    resnet = get_spec("resnet18").remote  # torchvision's own pin: the SHA-256 prefix in the file name
    assert (resnet.file_name, resnet.sha256) == ("resnet18-f37072fd.pth", "f37072fd")


@pytest.mark.parametrize("name", CURATED)
def test_the_recorded_facts_of_a_curated_model_are_timms_own(name):
    """Listing a curated model reads its recorded pretrained config, tap points and parameter count;
    they must be what timm states and builds (here on the meta device), or cache keys would drift."""
    entry = CURATED[name]
    facts = model_facts(entry.model, **({"img_size": entry.img_size} if entry.img_size else {}))
    assert entry.facts.pretrained == facts.pretrained
    assert entry.facts.layout == facts.layout
    assert entry.facts.params == facts.params
    spec = get_spec(name)  # made from the recorded facts, as the timm.NAME family makes it from the network
    fresh = timm_spec(name, entry.model, revision=entry.revision, size=entry.size, img_size=entry.img_size,
                      crop_pct=entry.crop_pct)
    assert (spec.preprocess, spec.layers, spec.remote) == (fresh.preprocess, fresh.layers, fresh.remote)
    assert spec.card.params_m == fresh.card.params_m and spec.card.licence == fresh.card.licence


def test_any_timm_model_by_name():
    spec = get_spec("timm.resnet18.a1_in1k")
    assert spec.remote.hub == ("timm/resnet18.a1_in1k", "main", "model.safetensors") and spec.remote.sha256 is None
    assert spec.default_layer == "pooled" and spec.layers["pooled"].dim == 512
    with pytest.raises(BackboneError, match="timm has no model 'no_such_net'"):
        get_spec("timm.no_such_net")


def test_backbones_lists_disk_size_and_licence(capsys, monkeypatch, env):
    assert main(["backbones", "dinov2_vits14_reg", "efficientnet_lite0"]) == 0
    out = capsys.readouterr().out
    assert "not on disk; downloaded on first use (84.1 MB) from https://huggingface.co/timm/" in out
    assert "licence: apache-2.0; 21.6 M parameters; 80.9% ImageNet linear probe (DINOv2 README" in out
    assert "efficientnet_lite0\n" in out and "weights: on disk: " in out
    assert "block1..12_cls_mean:768" in out
    monkeypatch.setenv("PIPELINE_OFFLINE", "1")
    assert main(["backbones", "dinov2_vits14_reg"]) == 0
    assert "--offline: not downloadable now" in capsys.readouterr().out


def test_auto_adds_the_zoo_only_when_downloads_are_allowed(monkeypatch, env, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline"):
        online = auto_candidates(None)
    assert set(CURATED) <= set(online) and "efficientnet_lite0" in online
    assert f"backbones: auto will download {len(CURATED)} backbones not on disk" in caplog.text
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = auto_candidates(None)
    assert not set(CURATED) & set(offline) and "efficientnet_lite0" in offline


def test_lite_works_with_no_network_and_no_hub_cache(tiny_folder, tmp_path):
    """A separate process with both offline switches, empty caches and a dead proxy: any attempt to
    reach the network would fail, yet extraction with the bundled weights succeeds."""
    env = {**os.environ, "PIPELINE_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "t"),
           "HF_HOME": str(tmp_path / "h"), "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    env.pop("PIPELINE_WEIGHTS", None)
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "extract", "--data", str(tiny_folder), "--backbone",
                           "efficientnet_lite0", "--cache", str(tmp_path / "cache"), "--quiet"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "efficientnet_lite0 [head]: 12 x 1280 features" in done.stdout
    assert not (tmp_path / "t").exists() and not (tmp_path / "h").exists()


def test_a_saved_child_of_a_timm_backbone_keeps_its_pooling(served_vit, monkeypatch, tmp_path):
    _server, network = served_vit
    parent = get_spec(TINY_VIT)
    save_backbone(tmp_path / "saved", "tuned_vit", parent, network.state_dict(), {})
    monkeypatch.setenv("PIPELINE_BACKBONES", str(tmp_path / "saved"))
    child = get_spec("tuned_vit")
    assert child.layers == parent.layers and child.parent == TINY_VIT
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        out = tapped(load_backbone("tuned_vit"), ["final_mean"])(x)
        torch.testing.assert_close(out["final_mean"], network.forward_features(x)[:, 1:].mean(1))


def test_finetune_keeps_a_twin_of_a_timm_vit_whose_features_are_the_parents_and_the_tuned_side_by_side(
        served_vit, monkeypatch, tmp_path):
    """`finetune --ensemble` on a timm ViT (fixed input size, attention blocks, a default layer that taps
    the whole network's output): the twin's default features are the parent's and the fine-tuned
    network's side by side, and a user fits and predicts on it."""
    from pipeline.tuning.finetune import FinetuneOptions, finetune
    from pipeline.tuning.training import TrainSettings

    from .test_finetune import _predicts_with, _stripes

    data = tmp_path / "stripes"
    _stripes(data / "train", 16, 0)
    _stripes(data / "test", 8, 5000)
    options = FinetuneOptions(data / "train", data / "test", backbone=TINY_VIT, unfreeze="last:1", probe_C=1.0,
                              out=tmp_path / "out", name="vit_ens", backbones_dir=tmp_path / "backbones",
                              cache_dir=tmp_path / "cache", ensemble=True, val_fraction=0.0,
                              train=TrainSettings(epochs=2, batch_size=8, lr=0.01, device="cpu", precision="fp32"))
    result = finetune(options, progress=False)
    assert result.metrics["kept"] == "ensemble"  # no held-out part to judge it
    monkeypatch.setenv("PIPELINE_BACKBONES", str(tmp_path / "backbones"))
    spec, parent = get_spec("vit_ens"), get_spec(TINY_VIT)
    layer = parent.default_layer
    features = {name: extract(data / "test", name, [layer], tmp_path / "use", "cpu", "fp32", progress=False,
                              runtime="torch").feature_sets[(name, layer)].features.compute()
                for name in (TINY_VIT, "vit_ens")}
    width = features[TINY_VIT].shape[1]
    assert spec.layers[layer].twin and features["vit_ens"].shape == (16, 2 * width)
    np.testing.assert_allclose(features["vit_ens"][:, :width], features[TINY_VIT], rtol=1e-4, atol=1e-5)
    assert not np.allclose(features["vit_ens"][:, width:], features[TINY_VIT], atol=1e-4)  # the tuned half
    predicted = _predicts_with("vit_ens", data / "train", data / "test", tmp_path)
    assert len(predicted) == 16
