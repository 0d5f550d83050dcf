"""OpenCLIP backbones: CLIP image towers, whose layer `embedding` is the projected, L2-normalised image
embedding, and the same checkpoint's text tower for zero-shot heads (`pipeline.heads.zero_shot`).

A CLIP backbone is an OpenCLIP architecture (a model config of open_clip_torch, "ViT-B-16", or a config
dict of its own) and one checkpoint file holding both towers, found or downloaded through the one weights
path (`pipeline.models.download.fetch`). The curated entries below are registered with the built-ins;
`register_openclip` registers any other (from a plugin, see `pipeline.models.registry`).

Only CLIP models with OpenCLIP's own text transformer and its bundled BPE tokenizer are supported (no
Hugging Face text towers or tokenizers, which would need downloads of their own). Importing this module,
or making a spec, imports neither torch nor open_clip: the networks are in `pipeline.models.openclip_network`,
and an architecture's config is read from the JSON file open_clip ships for it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.errors import BackboneError
from pipeline.images.preprocess import Preprocess
from pipeline.models.download import RemoteFile, fetch
from pipeline.models.normalise import OPENAI_MEAN, OPENAI_STD
from pipeline.models.registry import BackboneSpec, Card, Layer, get_spec, register

if TYPE_CHECKING:
    import numpy as np

_LOCATIONS = ("hf-hub:", "local-dir:")  # names open_clip looks up elsewhere than its own configs
EMBEDDING = "embedding"  # the layer: projected, L2-normalised image embedding


@dataclass(frozen=True)
class ClipModel:
    """A CLIP model: its architecture, where its checkpoint comes from, and what it was published with."""

    architecture: str | dict  # an open_clip model config name, or such a config itself
    remote: RemoteFile | None  # None: only through --weights PATH (or a plugin's own locate)
    source: str = ""
    card: Card | None = None  # licence, image tower's parameters, published figure
    quick_gelu: bool = False  # OpenAI's checkpoints were trained with QuickGELU
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    locate: Callable[[], Path] | None = field(default=None, compare=False)  # finds the file instead of `remote`

    def config(self) -> dict:
        """The architecture as an open_clip config dict (embed_dim, vision_cfg, text_cfg)."""
        if isinstance(self.architecture, dict):
            config = self.architecture
        else:
            config = _open_clip_config(self.architecture)
            if config is None:
                raise BackboneError(f"open_clip_torch has no model config {self.architecture!r}")
        text = config.get("text_cfg", {})
        if "hf_model_name" in text or "hf_tokenizer_name" in text or config.get("custom_text"):
            raise BackboneError(f"CLIP architecture {self.architecture!r} uses a Hugging Face text tower or "
                                "tokenizer, which this pipeline does not support")
        return config


def _open_clip_config(name: str) -> dict | None:
    """`open_clip.get_model_config(name)`, without importing open_clip (seconds, with torch) while nothing
    has imported it yet: until then its registry holds exactly the JSON files it ships in `model_configs/`
    that have embed_dim, vision_cfg and text_cfg, each under its file's stem (open_clip's `factory.py`)."""
    package = None if "open_clip" in sys.modules or name.startswith(_LOCATIONS) else find_spec("open_clip")
    if package is None or not package.submodule_search_locations:
        import open_clip

        return open_clip.get_model_config(name)
    if Path(name).name != name:  # a path is no name of open_clip's registry
        return None
    path = Path(package.submodule_search_locations[0]) / "model_configs" / f"{name}.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text(encoding="utf-8"))
    return config if all(key in config for key in ("embed_dim", "vision_cfg", "text_cfg")) else None


def _hub(repo: str, revision: str, sha256: str, size_mb: int, file_name: str) -> RemoteFile:
    """An OpenCLIP checkpoint on the Hugging Face hub (open_clip_pytorch_model.bin: a plain state dict)."""
    filename = "open_clip_pytorch_model.bin"
    return RemoteFile(url=f"https://huggingface.co/{repo}/resolve/{revision}/{filename}", sha256=sha256,
                      size=size_mb * 1_000_000, file_name=file_name, hub=(repo, revision, filename))


# The SHA-256 pins are those the hub shows for these files (its "Git LFS Details"); the sizes are the hub's
# rounded megabytes (shown to the user only). Published figures: zero-shot ImageNet-1k top-1 from the
# models' cards (OpenCLIP's results table).
CURATED: dict[str, ClipModel] = {
    "clip_vit_b16_laion2b": ClipModel(
        "ViT-B-16",
        _hub("laion/CLIP-ViT-B-16-laion2B-s34B-b88K", "7288da5a0d6f0b51c4a2b27c624837a9236d0112",
             "1f16b1274ca25493b1f36225efe81d05f66a3f33c487acd1a07c5ba87920de6f", 599,
             "CLIP-ViT-B-16-laion2B-s34B-b88K.bin"),
        source="OpenCLIP ViT-B/16 trained on LAION-2B (laion2b_s34b_b88k), image and text towers",
        card=Card("MIT", 86.2, "70.2% ImageNet zero-shot top-1",
                  "model card of laion/CLIP-ViT-B-16-laion2B-s34B-b88K (OpenCLIP)")),
    "clip_vit_b32_laion2b": ClipModel(
        "ViT-B-32",
        _hub("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "main",
             "1bd3c7172de5b207ceac554f5ab5266166f3b9baccc9af5989bc801016d080ad", 605,
             "CLIP-ViT-B-32-laion2B-s34B-b79K.bin"),
        source="OpenCLIP ViT-B/32 trained on LAION-2B (laion2b_s34b_b79k), image and text towers",
        card=Card("MIT", 87.8, "66.6% ImageNet zero-shot top-1",
                  "model card of laion/CLIP-ViT-B-32-laion2B-s34B-b79K (OpenCLIP)")),
}

_CLIP: dict[str, ClipModel] = {}


def register_openclip(name: str, model: ClipModel) -> None:
    """Register CLIP backbone `name` (its spec is made on first use, like every backbone's)."""
    _CLIP[name] = model
    register(name, lambda: clip_spec(name, model))


def register_curated() -> None:
    for name, model in CURATED.items():
        register_openclip(name, model)


def clip_model(backbone: str) -> ClipModel | None:
    """The CLIP model behind `backbone` (or behind the backbone a saved one was fine-tuned from); None
    when it is not a CLIP backbone."""
    if backbone in _CLIP:
        return _CLIP[backbone]
    parent = get_spec(backbone).parent
    return _CLIP.get(parent) if parent else None


def clip_backbones() -> list[str]:
    """The registered CLIP backbones' names."""
    return sorted(_CLIP)


def clip_spec(name: str, model: ClipModel) -> BackboneSpec:
    config = model.config()
    size = config["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else size[0]

    def locate() -> Path:
        if model.locate is not None:
            return model.locate()
        if model.remote is None:
            raise BackboneError(f"CLIP backbone {name!r} has no download: pass --weights PATH")
        return fetch(model.remote, name)

    def build():
        from pipeline.models.openclip_network import ClipImageTower

        return ClipImageTower(config, model.quick_gelu)

    return BackboneSpec(
        name=name, build=build, locate_weights=locate,
        # open_clip's "shortest" resize mode: the shorter side to the input size, then a centre crop
        preprocess=Preprocess(size, size, model.mean, model.std, model.interpolation),
        layers={EMBEDDING: Layer(EMBEDDING, int(config["embed_dim"]))}, default_layer=EMBEDDING,
        source=model.source or f"OpenCLIP {model.architecture if isinstance(model.architecture, str) else name}",
        remote=model.remote if model.locate is None else None, card=model.card)


def text_embeddings(backbone: str, prompts: list[list[str]],
                    weights: str | os.PathLike | None = None) -> tuple[np.ndarray, float]:
    """Embed each class's prompts with the text tower of CLIP backbone `backbone`: (one unit-length row per
    class, the model's logit scale). The text tower comes from the same checkpoint as the image tower
    (`weights`, else the backbone's own file); a fine-tuned CLIP backbone's from its parent's."""
    model = clip_model(backbone)
    if model is None:
        raise BackboneError(f"backbone {backbone!r} is not a CLIP backbone (those registered: "
                            f"{', '.join(clip_backbones())}): it has no text tower")
    from pipeline.models.openclip_network import text_embeddings as embed
    from pipeline.models.weights import resolve_weights

    spec = get_spec(backbone)
    path = resolve_weights(get_spec(spec.parent), None) if spec.parent else resolve_weights(spec, weights)
    return embed(model.config(), model.quick_gelu, path, prompts)

