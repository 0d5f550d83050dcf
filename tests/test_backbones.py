import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.errors import BackboneError
from pipeline.features.extract import forward
from pipeline.images.preprocess import Preprocess
from pipeline.models import registry
from pipeline.models.openclip import CURATED as CLIP_CURATED
from pipeline.models.openclip import clip_backbones
from pipeline.models.registry import BACKBONES_ENV, PLUGINS_ENV, get_spec, list_backbones, register
from pipeline.models.taps import TappedNetwork, tapped
from pipeline.models.timm_zoo import CURATED
from pipeline.models.weights import file_sha256, load_backbone
from pipeline.models.zoo import TORCHVISION

from .conftest import FLOWERS, TINY, TINY_WIDE, needs_flowers
from .tinynet import PLUGIN as TINY_PLUGIN

BUILTIN = sorted(["clip_vit_b16_laion2b", "clip_vit_b32_laion2b", "convnext_tiny", "efficientnet_b0",
                  "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
                  "mobilenet_v3_large", "resnet18", "resnet50", "vgg16", "clip_vitb16", "convnext_small_22k",
                  "convnext_tiny_22k", "dinov2_vitb14_reg", "dinov2_vits14_reg", "efficientnetv2_s_21k",
                  "eva02_small", "siglip_vitb16"])


def test_registry_lists_bundled_and_torchvision_backbones():
    names = list_backbones()
    for name in [*BUILTIN, TINY, TINY_WIDE]:  # the tiny ones come from the plugin conftest names
        assert name in names
    with pytest.raises(BackboneError, match="unknown backbone 'nope'"):
        get_spec("nope")


def test_importing_and_listing_the_registry_imports_no_torch_and_builds_nothing(tmp_path):
    code = ("import sys\nimport pipeline.models.registry as r, pipeline.models.zoo\n"
            "print(*r.list_backbones(), 'torch' in sys.modules, 'torchvision' in sys.modules)")
    env = {**{k: v for k, v in os.environ.items() if k != PLUGINS_ENV}, BACKBONES_ENV: str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [*BUILTIN, "False", "False"]


_HEAVY = ("torch", "torchvision", "timm", "open_clip")


def test_the_backbones_listing_and_auto_import_no_torch_timm_or_open_clip(tmp_path):
    """`pipeline backbones` and `backbones: auto` describe every built-in from recorded facts: a fresh
    process that runs both (and every spec) has imported none of the libraries that build networks."""
    code = ("import sys\nfrom pipeline.cli.main import main\nfrom pipeline.app.config import auto_candidates\n"
            "from pipeline.models.registry import get_spec, list_backbones\n"
            "assert main(['backbones']) == 0\nauto_candidates(None)\n[get_spec(n).layers for n in list_backbones()]\n"
            f"print('imported:', *[m for m in {_HEAVY!r} if m in sys.modules])")
    env = {**{k: v for k, v in os.environ.items() if k != PLUGINS_ENV}, BACKBONES_ENV: str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "efficientnet_lite0\n" in out and "dinov2_vits14_reg\n" in out and "block1..12_cls_mean:768" in out
    assert out.splitlines()[-1] == "imported:"


@pytest.mark.parametrize("name", TORCHVISION)
def test_the_recorded_torchvision_facts_are_torchvisions_own(name):
    """The listing reads a torchvision backbone's weights, file, card and preprocessing from the record;
    they must be what torchvision states for the model's DEFAULT weights (the preprocessing goes into the
    cache key; the file name carries the SHA-256 prefix the download is checked against)."""
    from torchvision import models

    entry, spec = TORCHVISION[name], get_spec(name)
    weights = models.get_model_weights(name).DEFAULT
    transform = weights.transforms()
    assert entry.weights == str(weights) and spec.source == f"torchvision {weights}"
    assert (entry.url, entry.file_mb) == (weights.url, weights.meta["_file_size"])
    assert spec.remote.url == weights.url and spec.remote.size == int(weights.meta["_file_size"] * 1e6)
    meta = weights.meta
    assert (entry.num_params, entry.top1) == (meta["num_params"], meta["_metrics"]["ImageNet-1K"]["acc@1"])
    assert spec.preprocess == Preprocess(transform.resize_size[0], transform.crop_size[0], tuple(transform.mean),
                                         tuple(transform.std), transform.interpolation.value)
    assert spec.categories == tuple(weights.meta["categories"])


def test_clip_configs_are_read_as_open_clip_reads_them_without_importing_it(monkeypatch):
    import open_clip

    monkeypatch.delitem(sys.modules, "open_clip")  # as in a fresh process: the packaged JSON files are read
    for model in CLIP_CURATED.values():
        assert model.config() == open_clip.get_model_config(model.architecture)
    assert "open_clip" not in sys.modules
    with pytest.raises(BackboneError, match="has no model config 'ViT-Nope'"):
        replace(CLIP_CURATED["clip_vit_b16_laion2b"], architecture="ViT-Nope").config()


def test_a_registered_factory_runs_on_first_use_only_and_can_be_replaced(monkeypatch):
    list_backbones()  # the built-ins are in before the registry is copied
    monkeypatch.setattr(registry, "_FACTORIES", dict(registry._FACTORIES))  # leave no test entries behind
    monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))
    calls = []

    def factory():
        calls.append("built")
        return replace(get_spec(TINY), name="lazy_probe")
    register("lazy_probe", factory)
    assert "lazy_probe" in list_backbones() and calls == []
    spec = get_spec("lazy_probe")
    assert get_spec("lazy_probe") is spec and calls == ["built"] and spec.layers == get_spec(TINY).layers
    loaded = load_backbone("lazy_probe")  # the spec's own network and weights file, like any backbone
    assert loaded.weights_sha256 == file_sha256(get_spec(TINY).locate_weights())
    register("lazy_probe", lambda: replace(get_spec(TINY_WIDE), name="lazy_probe"))
    assert get_spec("lazy_probe").layers == get_spec(TINY_WIDE).layers and calls == ["built"]
    register("misnamed", lambda: get_spec(TINY))
    with pytest.raises(BackboneError, match="registered as 'misnamed' built a backbone named 'tiny_test'"):
        get_spec("misnamed")


@pytest.mark.parametrize(("entry", "why"), [("tests.no_such_module", "ModuleNotFoundError"),
                                            ("tests.tinynet:no_such_function", "AttributeError")])
def test_a_plugin_that_cannot_load_is_a_one_line_error(monkeypatch, capsys, entry, why):
    from pipeline.cli.main import main

    monkeypatch.setenv(PLUGINS_ENV, f"{entry}, {TINY_PLUGIN}")
    with pytest.raises(BackboneError, match=f"cannot load backbone plugin '{entry}' named in {PLUGINS_ENV}: {why}"):
        list_backbones()
    assert main(["backbones"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot load backbone plugin") and len(err.strip().splitlines()) == 1


# The large timm networks take seconds each to build at random: one transformer and one CNN stay fast.
_SLOW_TO_BUILD = set(CURATED) - {"dinov2_vits14_reg", "convnext_tiny_22k"} | {"clip_vit_b16_laion2b"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_TO_BUILD else n
                                  for n in dict.fromkeys([*list_backbones(), TINY, TINY_WIDE])])
def test_every_layer_has_the_declared_dimension(name):
    spec = get_spec(name)
    network = spec.build().eval()
    tapped = TappedNetwork(network, dict(spec.layers))
    # timm's and OpenCLIP's transformers take one input size
    size = spec.preprocess.crop if spec.load_network or name in clip_backbones() else 64
    with torch.inference_mode():
        out = tapped(torch.rand(1, 3, size, size))
    assert {k: v.shape[1] for k, v in out.items()} == {k: v.dim for k, v in spec.layers.items()}
    assert spec.default_layer in spec.layers


def test_unknown_layer_names_the_choices():
    with pytest.raises(BackboneError, match="no layer 'layer9'.*stage1"):
        get_spec("efficientnet_lite0").layer("layer9")


def test_bundled_weights_load_with_checksum():
    loaded = load_backbone("efficientnet_lite0")
    assert loaded.weights_path.is_file() and len(loaded.weights_sha256) == 64
    assert not any(p.requires_grad for p in loaded.network.parameters())


def test_missing_torchvision_weights_say_where_to_put_them(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # and downloads are off for every test (conftest)
    with pytest.raises(BackboneError, match=r"resnet18-f37072fd\.pth.*--weights PATH"):
        load_backbone("resnet18")


def test_weights_option_loads_a_local_state_dict_and_refuses_a_wrong_one(tmp_path):
    state = get_spec("resnet18").build().state_dict()
    torch.save(state, tmp_path / "r18.pth")
    loaded = load_backbone("resnet18", tmp_path / "r18.pth")
    assert torch.equal(loaded.network.fc.weight, state["fc.weight"])
    with pytest.raises(BackboneError, match="do not fit backbone 'resnet18'"):
        load_backbone("resnet18", get_spec("efficientnet_lite0").locate_weights())
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="cannot read weights"):
        load_backbone("resnet18", tmp_path / "junk.pth")


def _flower_batch(split: str, cls: str, pre: Preprocess, limit: int = 20) -> np.ndarray:
    from pipeline.images.decode import decode

    return np.stack([decode(p, pre) for p in sorted((FLOWERS / split / cls).glob("*"))[:limit]])


@needs_flowers
def test_bundled_lite0_recognises_real_daisies():
    loaded = load_backbone("efficientnet_lite0")
    images = _flower_batch("test", "daisy", loaded.spec.preprocess)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    pre = loaded.spec.preprocess
    x = (x - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        predicted = [loaded.spec.categories[i] for i in loaded.network(x).argmax(1)]
    assert sum(p == "daisy" for p in predicted) >= 0.8 * len(predicted), predicted


@needs_flowers
@pytest.mark.slow
def test_bf16_features_stay_close_to_fp32_on_real_photos():
    loaded = load_backbone("efficientnet_lite0")
    network = tapped(loaded, ["head", "stage5"])
    images = np.concatenate([_flower_batch("test", c, loaded.spec.preprocess, 6)
                             for c in ["daisy", "iris", "sunflower", "bluebell"]])
    fp32 = forward(network, loaded.spec.preprocess, images, "cpu", "fp32")
    bf16 = forward(network, loaded.spec.preprocess, images, "cpu", "bf16")
    for layer in fp32:
        a, b = fp32[layer], bf16[layer]
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cosine.min() >= 0.995, (layer, cosine.min())


def test_lite_architecture_matches_reference_shapes():
    spec = get_spec("efficientnet_lite2")
    assert spec.preprocess.crop == 260 and spec.layers["stage7"].dim == 352
    assert Path(spec.locate_weights()).name.startswith("efficientnet-lite2")


def test_one_network_serves_concurrent_threads():
    from concurrent.futures import ThreadPoolExecutor

    spec = get_spec("resnet18")
    network = TappedNetwork(spec.build().eval(), {"layer4": "layer4"})
    inputs = [torch.rand(2, 3, 64, 64) for _ in range(8)]
    with torch.inference_mode():
        alone = [network(x)["layer4"] for x in inputs]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda x: network(x)["layer4"], inputs))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(alone, together, strict=True))
