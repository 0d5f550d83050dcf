"""timm as the zoo's engine: curated modern backbones by name, and `timm.NAME` for any other timm model.

Each curated entry names a timm model and its pretrained tag; its input size, mean, std, interpolation and
crop come from that model's `pretrained_cfg` (DINOv2 alone is overridden: see `ZooEntry.img_size`), its
layers from the network itself (built on the meta device: no memory, no weights), and its weights file
from the Hugging Face hub through `pipeline.models.download` (on disk, or a checked download). Weights
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
from pipeline.models.registry import POOLS, BackboneSpec, Card, Layer, register, register_family

if TYPE_CHECKING:
    from torch import nn

FAMILY = "timm."  # `timm.NAME`: any timm model with weights on the Hugging Face hub
HUB_FILE = "model.safetensors"
SOURCE_URL = "https://huggingface.co/{repo}/resolve/{revision}/{file}"


@dataclass(frozen=True)
class ZooEntry:
    model: str  # timm name with its pretrained tag
    revision: str  # hub commit (40 hex digits) where one is known, else "main"
    size: int  # bytes of model.safetensors: from the hub's file list where found, else 4 bytes per parameter
    published: str
    citation: str
    img_size: int | None = None  # input size overriding the pretrained config's (with crop_pct below)
    crop_pct: float | None = None


_DINOV2_EVAL = ("DINOv2's own linear evaluation runs at 224 px (resize 256, centre crop 224; "
                "facebookresearch/dinov2 data/transforms.py), not the 518 px of its pretraining config")

CURATED: dict[str, ZooEntry] = {
    "dinov2_vits14_reg": ZooEntry(
        "vit_small_patch14_reg4_dinov2.lvd142m", "782d5fbd69b69b5dd761466a65e518bdbddf062c", 88_200_000,
        "80.9% ImageNet linear probe", "DINOv2 README, ViT-S/14 distilled with registers (Darcet et al., ICLR 2024)",
        img_size=224, crop_pct=0.875),
    "dinov2_vitb14_reg": ZooEntry(
        "vit_base_patch14_reg4_dinov2.lvd142m", "32195f3ad637569d156f54ce12e0629f651f669a", 346_300_000,
        "84.6% ImageNet linear probe", "DINOv2 README, ViT-B/14 distilled with registers (Darcet et al., ICLR 2024)",
        img_size=224, crop_pct=0.875),
    "clip_vitb16": ZooEntry(
        "vit_base_patch16_clip_224.openai", "main", 345_200_000,
        "80.2% ImageNet linear probe", "Radford et al., ICML 2021 (CLIP), Table 10, ViT-B/16"),
    "siglip_vitb16": ZooEntry(
        "vit_base_patch16_siglip_224.webli", "main", 371_500_000,
        "76.2% ImageNet zero-shot", "Zhai et al., ICCV 2023 (SigLIP), B/16 at 224 px"),
    "convnext_tiny_22k": ZooEntry(
        "convnext_tiny.fb_in22k_ft_in1k", "9652db768d961382dea070578e6e38d85e44ff7b", 114_000_000,
        "82.9% ImageNet top-1 (22k pretrained)", "Liu et al., CVPR 2022 (ConvNeXt), Table 1, 224 px"),
    "convnext_small_22k": ZooEntry(
        "convnext_small.fb_in22k_ft_in1k", "main", 200_900_000,
        "84.6% ImageNet top-1 (22k pretrained)", "Liu et al., CVPR 2022 (ConvNeXt), Table 1, 224 px"),
    "efficientnetv2_s_21k": ZooEntry(
        "tf_efficientnetv2_s.in21k_ft_in1k", "main", 85_800_000,
        "84.9% ImageNet top-1 (21k pretrained)", "Tan & Le, ICML 2021 (EfficientNetV2), Table 7"),
    "eva02_small": ZooEntry(
        "eva02_small_patch14_336.mim_in22k_ft_in1k", "main", 88_500_000,
        "85.7% ImageNet top-1", "timm model card of eva02_small_patch14_336.mim_in22k_ft_in1k (Fang et al., 2023)"),
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


def preprocess_of(cfg: dict, img_size: int | None = None, crop_pct: float | None = None) -> Preprocess:
    """timm's eval transform as ours: resize the shorter side to floor(crop / crop_pct), centre-crop."""
    crop = img_size or int(cfg["input_size"][-1])
    pct = crop_pct or float(cfg.get("crop_pct") or 1.0)
    if cfg.get("crop_mode", "center") != "center":
        raise BackboneError(f"timm model {cfg.get('architecture')!r} uses crop mode {cfg['crop_mode']!r}; "
                            "only centre crops are supported")
    return Preprocess(math.floor(crop / pct), crop, tuple(cfg["mean"]), tuple(cfg["std"]),
                      str(cfg.get("interpolation") or "bilinear"))


def layers_of(network: nn.Module) -> dict[str, Layer]:
    """`pooled` (timm's pre-logits), then every stage (CNN) or block and final tokens (transformer)."""
    layers = {"pooled": Layer("", int(network.num_features))}
    prefix = getattr(network, "num_prefix_tokens", None)
    has_cls = bool(getattr(network, "cls_token", None) is not None)
    modules = dict(network.named_modules())
    token_taps = []
    for i, info in enumerate(network.feature_info, start=1):
        if prefix is None:
            layers[f"stage{i}"] = Layer(info["module"], int(info["num_chs"]))
        else:
            token_taps.append((f"block{i}", info["module"], int(info["num_chs"])))
    if prefix is not None and "norm" in modules:
        token_taps.append(("final", "norm", int(network.num_features)))
    for name, module, dim in token_taps:
        for pool in POOLS if has_cls else ("mean",):
            layers[f"{name}_{pool}"] = Layer(module, dim * (2 if pool == "cls_mean" else 1), pool, int(prefix))
    return layers


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


def _hub_remote(cfg: dict, revision: str, size: int) -> RemoteFile:
    repo = cfg.get("hf_hub_id")
    if not repo:
        raise BackboneError(f"timm model {cfg.get('architecture')!r} has no weights on the Hugging Face hub: "
                            "pass --weights PATH")
    file = cfg.get("hf_hub_filename") or HUB_FILE
    return RemoteFile(url=SOURCE_URL.format(repo=repo, revision=revision, file=file), sha256=None, size=size,
                      file_name=f"{repo.replace('/', '--')}--{file}", hub=(repo, revision, file))


def timm_spec(name: str, model: str, *, remote: RemoteFile | None = None, revision: str = "main", size: int = 0,
              published: str = "", citation: str = "", img_size: int | None = None, crop_pct: float | None = None,
              model_kwargs: dict | None = None, note: str = "") -> BackboneSpec:
    """The spec of timm model `model` registered as `name`; its weights file is `remote`, else the model's
    hub file at `revision` (`size` bytes, 0 if unknown). `model_kwargs` go to timm.create_model."""
    kwargs = {**(model_kwargs or {}), **({"img_size": img_size} if img_size else {})}
    network = _meta_network(model, **kwargs)
    cfg = dict(network.pretrained_cfg)
    remote = remote or _hub_remote(cfg, revision, size)
    where = f"hub {remote.hub[0]}@{remote.hub[1]}" if remote.hub else remote.url
    params = sum(p.numel() for p in network.parameters()) / 1e6
    return BackboneSpec(
        name=name, build=partial(_build, model, kwargs), locate_weights=partial(fetch, remote, name),
        preprocess=preprocess_of(cfg, kwargs.get("img_size"), crop_pct), layers=layers_of(network),
        default_layer="pooled",
        source=f"timm {model} ({where}){note}", remote=remote,
        card=Card(str(cfg.get("license") or "see the model card"), round(params, 1), published, citation),
        load_network=partial(_load, model, kwargs))


def curated_spec(name: str, entry: ZooEntry) -> BackboneSpec:
    return timm_spec(name, entry.model, revision=entry.revision, size=entry.size, published=entry.published,
                     citation=entry.citation, img_size=entry.img_size, crop_pct=entry.crop_pct,
                     note=f"; {_DINOV2_EVAL}" if entry.img_size else "")


def family_spec(name: str) -> BackboneSpec:
    """`timm.NAME`: the hub's current `main` file, its size unknown until the download starts."""
    model = name[len(FAMILY):]
    if not model:
        raise BackboneError(f"name a timm model after {FAMILY!r}, e.g. {FAMILY}resnet50.a1_in1k")
    return timm_spec(name, model)
