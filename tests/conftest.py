"""Shared fixtures: the tiny test backbones, small generated image folders, and the real flowers12
photos where present.

Every test process (and every subprocess and Dask worker it starts) knows the tiny backbones of
tests/tinynet.py: `tiny_backbones` writes their weights once per session and names them in the
environment. Tests of plumbing use `TINY`; the real EfficientNet-Lite0 is kept where real features
matter (real photos, the reference architecture, bundled weights, the demo).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.models.registry import PLUGINS_ENV

from . import tinynet

ROOT = Path(__file__).resolve().parents[1]
# PIPELINE_FLOWERS points elsewhere (benchmarks/gpu/check.sh: a copy inside the tree on a GPU machine)
FLOWERS = Path(os.environ.get("PIPELINE_FLOWERS") or ROOT.parent / "shared" / "data" / "flowers12")

needs_flowers = pytest.mark.skipif(
    not (FLOWERS / "train").is_dir(),
    reason=f"real photos not found at {FLOWERS} (the shared flowers12 set is not part of the project)")


TINY = tinynet.NAME
TINY_WIDE = tinynet.WIDE
TINY_DIMS = {name: layer.dim for name, layer in tinynet.layers(TINY).items()}


@pytest.fixture(scope="session", autouse=True)
def tiny_backbones(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Write the tiny backbones' weights and register them here and in every process started from here
    (PIPELINE_PLUGINS; PYTHONPATH so that `tests.tinynet` imports whatever the subprocess's folder).
    Downloads are off (PIPELINE_OFFLINE=1): no test reaches the network; tests/test_download.py turns them
    on against its own server on 127.0.0.1."""
    folder = tmp_path_factory.mktemp("tinynet")
    tinynet.write_weights(folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(tinynet.WEIGHTS_ENV, str(folder))
        patch.setenv("PIPELINE_OFFLINE", "1")
        patch.setenv(PLUGINS_ENV, ",".join(filter(None, [os.environ.get(PLUGINS_ENV), tinynet.PLUGIN])))
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        yield TINY


_TINTS = [(230, 40, 40), (40, 200, 40), (40, 60, 230), (220, 200, 30), (160, 40, 200)]


def make_image(seed: int, size: int = 48, tint: int | None = None) -> Image.Image:
    """A smooth, distinct colour image: cheap to decode, different bytes for every seed; a `tint`
    (class index) gives all images of a class a common colour and stripe direction to learn."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    channels = [np.sin(x * rng.uniform(1, 6) + rng.uniform(0, 3)) * np.cos(y * rng.uniform(1, 6)) for _ in range(3)]
    pixels = (np.stack(channels, -1) + 1) * 127.5
    if tint is not None:
        stripes = (np.sin((x if tint % 2 else y) * 25) > 0)[..., None]
        pixels = 0.3 * pixels + 0.7 * np.asarray(_TINTS[tint % len(_TINTS)]) * (0.6 + 0.4 * stripes)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")


def make_folder(root: Path, classes: int = 3, per_class: int = 4, start_seed: int = 0) -> Path:
    """root/<class>/<n>.jpg, each a different image."""
    seed = start_seed
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            make_image(seed, tint=c).save(folder / f"img{i}.jpg", quality=90)
            seed += 1
    return root


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "images")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def stage_run_config(path: Path, data: Path, cache: Path, out: Path, section: str, backbone: str = TINY) -> Path:
    """A run config over `data/train` and `data/test` with one logistic-regression head, plus one
    stage section (for example `finetune: {epochs: 1}`)."""
    path.write_text(f"data: {{train: {data / 'train'}, test: {data / 'test'}}}\n"
                    f"features: {{backbones: [{backbone}], cache_dir: {cache}, device: cpu}}\n"
                    "heads:\n  - {name: logreg, type: logistic_regression, C: 1.0}\n"
                    f"output_dir: {out}\n{section}\n")
    return path


def config_error(tmp_path: Path, text: str, name: str = "run.yaml") -> str:
    """Write `text` as a run config and load it: the one-line ConfigError it must give, without the
    file's path (the message starts with it)."""
    from pipeline.app.config import RunConfig
    from pipeline.core.errors import ConfigError

    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        RunConfig.load(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}:")
    return message.removeprefix(str(path))
