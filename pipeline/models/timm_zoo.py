"""timm as the zoo's engine: curated modern backbones by name, and `timm.NAME` for any other timm model.

Each curated entry names a timm model and its pretrained tag; its input size, mean, std, interpolation and
crop are those of that model's `pretrained_cfg` (DINOv2 alone is overridden: see `ZooEntry.img_size`), its
layers and parameter count those of the network itself, and its weights file is on the Hugging Face hub,
reached through `pipeline.models.download` (on disk, or a checked download). A curated entry records
those facts (`ModelFacts`; tests/test_zoo.py checks them against timm), so that listing and describing it
imports neither torch nor timm, as timm's own registry describes models without building them. A
`timm.NAME` model reads them from its network, built on the meta device (no memory, no weights). Weights
are loaded by timm from that local file (safetensors, or torch.load with weights_only=True), which also
adapts them to the chosen input size; timm never downloads anything itself here.

Layers: `pooled` (the default) is timm's own pre-logits vector: the class token for DINOv2 and CLIP, the
attention-pool head for SigLIP, the mean of the patch tokens for EVA-02, the pooled last stage for the
CNNs. A vision transformer also offers every block and its final normalised tokens, pooled three ways
(`blockN_cls`, `blockN_mean`, `blockN_cls_mean`, `final_*`; the mean leaves out the class and register
tokens); a CNN offers each stage (`stageN`, average-pooled).

Pins: the curated files are pinned by hub revision where a full commit hash is known, else by the hub's
`main`; none carries a SHA-256 of our own (no published one could be found offline), so every download is
checked against the SHA-256 the hub states for that file (`X-Linked-Etag`), and the feature cache keys on
the digest of the file actually used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.errors import BackboneError, first_line
from pipeline.images.preprocess import Preprocess
from pipeline.models.download import RemoteFile, fetch
from pipeline.models.normalise import HALF, IMAGENET_MEAN, IMAGENET_STD, OPENAI_MEAN, OPENAI_STD
from pipeline.models.registry import POOLS, BackboneSpec, Card, Layer, register, register_family

if TYPE_CHECKING:
    from torch import nn

FAMILY = "timm."  # `timm.NAME`: any timm model with weights on the Hugging Face hub
HUB_FILE = "model.safetensors"
NO_LICENCE = "see the model card"
SOURCE_URL = "https://huggingface.co/{repo}/resolve/{revision}/{file}"


@dataclass(frozen=True)
class Pretrained:
    """What the registry reads from a timm model's `pretrained_cfg`, with timm's defaults filled in."""

    architecture: str
    hf_hub_id: str | None  # None: no weights on the hub
    input_size: tuple[int, int, int]
    crop_pct: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    license: str
    crop_mode: str = "center"
    hf_hub_filename: str = HUB_FILE

    @classmethod
    def of(cls, cfg: dict) -> Pretrained:
        return cls(architecture=str(cfg.get("architecture")), hf_hub_id=cfg.get("hf_hub_id") or None,
                   input_size=tuple(int(v) for v in cfg["input_size"]), crop_pct=float(cfg.get("crop_pct") or 1.0),
                   mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                   interpolation=str(cfg.get("interpolation") or "bilinear"),
                   crop_mode=str(cfg.get("crop_mode") or "center"), license=str(cfg.get("license") or NO_LICENCE),
                   hf_hub_filename=cfg.get("hf_hub_filename") or HUB_FILE)


@dataclass(frozen=True)
class Layout:
    """What the tap points are made of: the width of timm's pre-logits vector, `feature_info`'s
    (module, channels) of each stage (CNN) or block (transformer), and for a transformer its number of
    leading class and register tokens, whether one is a class token, and whether it has a final `norm`."""

    num_features: int
    taps: tuple[tuple[str, int], ...]
    prefix: int | None = None  # None: a CNN
    has_cls: bool = False
    has_norm: bool = False

    def layers(self) -> dict[str, Layer]:
        """`pooled` (timm's pre-logits), then every stage (CNN) or block and final tokens (transformer)."""
        layers = {"pooled": Layer("", self.num_features)}
        if self.prefix is None:
            layers.update({f"stage{i}": Layer(module, dim) for i, (module, dim) in enumerate(self.taps, start=1)})
            return layers
        token_taps = [(f"block{i}", module, dim) for i, (module, dim) in enumerate(self.taps, start=1)]
        if self.has_norm:
            token_taps.append(("final", "norm", self.num_features))
        for name, module, dim in token_taps:
            for pool in POOLS if self.has_cls else ("mean",):
                layers[f"{name}_{pool}"] = Layer(module, dim * (2 if pool == "cls_mean" else 1), pool, self.prefix)
        return layers


@dataclass(frozen=True)
class ModelFacts:
    """Everything a spec takes from a timm model: its pretrained config, tap points, parameter count
    (of the feature network, the classifier left out)."""

    pretrained: Pretrained
    layout: Layout
    params: int


def _vit(dim: int, prefix: int, has_cls: bool = True, depth: int = 12) -> Layout:
    return Layout(dim, tuple((f"blocks.{i}", dim) for i in range(depth)), prefix, has_cls, has_norm=True)


def _stages(num_features: int, module: str, channels: dict[int, int]) -> Layout:
    return Layout(num_features, tuple((f"{module}.{i}", dim) for i, dim in channels.items()))


@dataclass(frozen=True)
class ZooEntry:
    model: str  # timm name with its pretrained tag
    revision: str  # hub commit (40 hex digits) where one is known, else "main"
    size: int  # bytes of model.safetensors: from the hub's file list where found, else 4 bytes per parameter
    published: str
    citation: str
    facts: ModelFacts  # recorded from timm (tests/test_zoo.py checks them against it)
    img_size: int | None = None  # input size overriding the pretrained config's (with crop_pct below)
    crop_pct: float | None = None


_DINOV2_EVAL = ("DINOv2's own linear evaluation runs at 224 px (resize 256, centre crop 224; "
                "facebookresearch/dinov2 data/transforms.py), not the 518 px of its pretraining config")


def _pretrained(model: str, size: int, crop_pct: float, mean: tuple[float, ...], std: tuple[float, ...],
                license: str = "apache-2.0") -> Pretrained:
    """A curated model's pretrained config: bicubic, centre crop, weights in timm's hub repo of that name."""
    return Pretrained(model.partition(".")[0], f"timm/{model}", (3, size, size), crop_pct, mean, std, "bicubic",
                      license)


CURATED: dict[str, ZooEntry] = {
    "dinov2_vits14_reg": ZooEntry(
        "vit_small_patch14_reg4_dinov2.lvd142m", "782d5fbd69b69b5dd761466a65e518bdbddf062c", 88_200_000,
        "80.9% ImageNet linear probe", "DINOv2 README, ViT-S/14 distilled with registers (Darcet et al., ICLR 2024)",
        ModelFacts(_pretrained("vit_small_patch14_reg4_dinov2.lvd142m", 518, 1.0, IMAGENET_MEAN, IMAGENET_STD),
                   _vit(384, prefix=5), 21_629_952), img_size=224, crop_pct=0.875),
    "dinov2_vitb14_reg": ZooEntry(
        "vit_base_patch14_reg4_dinov2.lvd142m", "32195f3ad637569d156f54ce12e0629f651f669a", 346_300_000,
        "84.6% ImageNet linear probe", "DINOv2 README, ViT-B/14 distilled with registers (Darcet et al., ICLR 2024)",
        ModelFacts(_pretrained("vit_base_patch14_reg4_dinov2.lvd142m", 518, 1.0, IMAGENET_MEAN, IMAGENET_STD),
                   _vit(768, prefix=5), 85_727_232), img_size=224, crop_pct=0.875),
    "clip_vitb16": ZooEntry(
        "vit_base_patch16_clip_224.openai", "main", 345_200_000,
        "80.2% ImageNet linear probe", "Radford et al., ICML 2021 (CLIP), Table 10, ViT-B/16",
        ModelFacts(_pretrained("vit_base_patch16_clip_224.openai", 224, 0.9, OPENAI_MEAN, OPENAI_STD),
                   _vit(768, prefix=1), 85_799_424)),
    "siglip_vitb16": ZooEntry(
        "vit_base_patch16_siglip_224.webli", "main", 371_500_000,
        "76.2% ImageNet zero-shot", "Zhai et al., ICCV 2023 (SigLIP), B/16 at 224 px",
        ModelFacts(_pretrained("vit_base_patch16_siglip_224.webli", 224, 0.9, HALF, HALF),
                   _vit(768, prefix=0, has_cls=False), 92_884_224)),
    "convnext_tiny_22k": ZooEntry(
        "convnext_tiny.fb_in22k_ft_in1k", "9652db768d961382dea070578e6e38d85e44ff7b", 114_000_000,
        "82.9% ImageNet top-1 (22k pretrained)", "Liu et al., CVPR 2022 (ConvNeXt), Table 1, 224 px",
        ModelFacts(_pretrained("convnext_tiny.fb_in22k_ft_in1k", 224, 0.875, IMAGENET_MEAN, IMAGENET_STD),
                   _stages(768, "stages", {0: 96, 1: 192, 2: 384, 3: 768}), 27_820_128)),
    "convnext_small_22k": ZooEntry(
        "convnext_small.fb_in22k_ft_in1k", "main", 200_900_000,
        "84.6% ImageNet top-1 (22k pretrained)", "Liu et al., CVPR 2022 (ConvNeXt), Table 1, 224 px",
        ModelFacts(_pretrained("convnext_small.fb_in22k_ft_in1k", 224, 0.875, IMAGENET_MEAN, IMAGENET_STD),
                   _stages(768, "stages", {0: 96, 1: 192, 2: 384, 3: 768}), 49_454_688)),
    "efficientnetv2_s_21k": ZooEntry(
        "tf_efficientnetv2_s.in21k_ft_in1k", "main", 85_800_000,
        "84.9% ImageNet top-1 (21k pretrained)", "Tan & Le, ICML 2021 (EfficientNetV2), Table 7",
        ModelFacts(_pretrained("tf_efficientnetv2_s.in21k_ft_in1k", 300, 1.0, HALF, HALF),
                   _stages(1280, "blocks", {0: 24, 1: 48, 2: 64, 4: 160, 5: 256}), 20_177_488)),
    "eva02_small": ZooEntry(
        "eva02_small_patch14_336.mim_in22k_ft_in1k", "main", 88_500_000,
        "85.7% ImageNet top-1", "timm model card of eva02_small_patch14_336.mim_in22k_ft_in1k (Fang et al., 2023)",
        ModelFacts(_pretrained("eva02_small_patch14_336.mim_in22k_ft_in1k", 336, 1.0, OPENAI_MEAN, OPENAI_STD,
                               license="mit"),
                   _vit(384, prefix=1), 21_744_000)),
}


def register_timm() -> None:
    """Record the curated names and the `timm.` family (nothing is imported or built here)."""
    for name, entry in CURATED.items():
        register(name, partial(curated_spec, name, entry))
    register_family(FAMILY, family_spec)


def _meta_network(model: str, **kwargs) -> nn.Module:
    """The network on the meta device: its config, layers and parameter count, with no memory or weights."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            return timm.create_model(model, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as exc:  # timm's "Unknown model (...)"
        raise BackboneError(f"timm has no model {model!r} ({first_line(exc)}); see timm.list_pretrained()") from None


def layout_of(network: nn.Module) -> Layout:
    """The tap points of a timm network, read from the network itself."""
    prefix = getattr(network, "num_prefix_tokens", None)
    taps = tuple((info["module"], int(info["num_chs"])) for info in network.feature_info)
    has_cls = getattr(network, "cls_token", None) is not None
    return Layout(int(network.num_features), taps, None if prefix is None else int(prefix), has_cls,
                  "norm" in dict(network.named_modules()))


def preprocess_of(cfg: Pretrained, img_size: int | None = None, crop_pct: float | None = None) -> Preprocess:
    """timm's eval transform as ours: resize the shorter side to floor(crop / crop_pct), centre-crop."""
    crop = img_size or cfg.input_size[-1]
    pct = crop_pct or cfg.crop_pct
    if cfg.crop_mode != "center":
        raise BackboneError(f"timm model {cfg.architecture!r} uses crop mode {cfg.crop_mode!r}; "
                            "only centre crops are supported")
    return Preprocess(math.floor(crop / pct), crop, cfg.mean, cfg.std, cfg.interpolation)


def _load(model: str, kwargs: dict, path: Path) -> nn.Module:
    """timm builds the network and loads `path` itself (safetensors, or torch.load with weights_only=True),
    adapting position embeddings to the input size and dropping the classifier. The file is always read
    as a state dict (`custom_load` off: the hub's files are state dicts even where timm's own URL is not)."""
    import timm

    try:
        return timm.create_model(model, pretrained=True, num_classes=0,
                                 pretrained_cfg_overlay={"file": str(path), "custom_load": False}, **kwargs)
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        raise BackboneError(f"weights {path} do not fit timm model {model!r}: {first_line(exc)}") from None


def _build(model: str, kwargs: dict) -> nn.Module:
    import timm

    return timm.create_model(model, pretrained=False, num_classes=0, **kwargs)


def _hub_remote(cfg: Pretrained, revision: str, size: int) -> RemoteFile:
    repo = cfg.hf_hub_id
    if not repo:
        raise BackboneError(f"timm model {cfg.architecture!r} has no weights on the Hugging Face hub: "
                            "pass --weights PATH")
    file = cfg.hf_hub_filename
    return RemoteFile(url=SOURCE_URL.format(repo=repo, revision=revision, file=file), sha256=None, size=size,
                      file_name=f"{repo.replace('/', '--')}--{file}", hub=(repo, revision, file))


def model_facts(model: str, **kwargs) -> ModelFacts:
    """What a spec needs of timm model `model` (built with `kwargs`), read from it on the meta device."""
    network = _meta_network(model, **kwargs)
    return ModelFacts(Pretrained.of(dict(network.pretrained_cfg)), layout_of(network),
                      sum(p.numel() for p in network.parameters()))


def timm_spec(name: str, model: str, *, remote: RemoteFile | None = None, revision: str = "main", size: int = 0,
              published: str = "", citation: str = "", img_size: int | None = None, crop_pct: float | None = None,
              model_kwargs: dict | None = None, note: str = "", facts: ModelFacts | None = None) -> BackboneSpec:
    """The spec of timm model `model` registered as `name`; its weights file is `remote`, else the model's
    hub file at `revision` (`size` bytes, 0 if unknown). `model_kwargs` go to timm.create_model. `facts`
    (recorded for the curated models) spare building the network on the meta device, and importing timm."""
    kwargs = {**(model_kwargs or {}), **({"img_size": img_size} if img_size else {})}
    facts = facts or model_facts(model, **kwargs)
    remote = remote or _hub_remote(facts.pretrained, revision, size)
    where = f"hub {remote.hub[0]}@{remote.hub[1]}" if remote.hub else remote.url
    return BackboneSpec(
        name=name, build=partial(_build, model, kwargs), locate_weights=partial(fetch, remote, name),
        preprocess=preprocess_of(facts.pretrained, kwargs.get("img_size"), crop_pct), layers=facts.layout.layers(),
        default_layer="pooled",
        source=f"timm {model} ({where}){note}", remote=remote,
        card=Card(facts.pretrained.license, round(facts.params / 1e6, 1), published, citation),
        load_network=partial(_load, model, kwargs))


def curated_spec(name: str, entry: ZooEntry) -> BackboneSpec:
    """A curated entry's spec, from its recorded facts: timm is imported only to build the network."""
    return timm_spec(name, entry.model, revision=entry.revision, size=entry.size, published=entry.published,
                     citation=entry.citation, img_size=entry.img_size, crop_pct=entry.crop_pct,
                     note=f"; {_DINOV2_EVAL}" if entry.img_size else "", facts=entry.facts)


def family_spec(name: str) -> BackboneSpec:
    """`timm.NAME`: the hub's current `main` file, its size unknown until the download starts."""
    model = name[len(FAMILY):]
    if not model:
        raise BackboneError(f"name a timm model after {FAMILY!r}, e.g. {FAMILY}resnet50.a1_in1k")
    return timm_spec(name, model)
