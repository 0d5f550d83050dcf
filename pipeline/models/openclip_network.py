"""The networks of a CLIP backbone (`pipeline.models.openclip`): the image tower as a backbone, the text
tower to embed class prompts. Both are built from the architecture's config with open_clip_torch and
filled from the one checkpoint file, read with `weights_only=True`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.core.errors import BackboneError, first_line


class L2Normalise(nn.Module):
    """Each row scaled to unit length: CLIP compares images and texts by cosine similarity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=-1)


def build_clip(config: dict, quick_gelu: bool) -> nn.Module:
    """A whole (randomly initialised) OpenCLIP CLIP model of this architecture."""
    import open_clip

    return open_clip.CLIP(**config, quick_gelu=quick_gelu)


class ClipImageTower(nn.Module):
    """CLIP's image tower (`visual`, as named in a CLIP checkpoint) followed by the module `embedding`, whose
    output, the projected and normalised image embedding, is the backbone's layer."""

    def __init__(self, config: dict, quick_gelu: bool) -> None:
        super().__init__()
        # OpenCLIP's "custom" attention blocks hold the same weights under the same names as its default ones
        # (nn.MultiheadAttention) and compute the same numbers through fused attention: 12.7x faster in bf16
        # on a CPU without AMX (benchmarks/RESULTS.md, CLIP backbones)
        config = {**config, "vision_cfg": {"block_type": "custom", **config["vision_cfg"]}}
        self.visual = build_clip(config, quick_gelu).visual  # the text tower is dropped at once
        self.embedding = L2Normalise()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.visual(x))

    def load_state_dict(self, state_dict: Mapping, strict: bool = True, assign: bool = False):
        """A whole CLIP checkpoint is accepted: only its image tower's entries (`visual.*`) are loaded."""
        return super().load_state_dict({k: v for k, v in state_dict.items() if k.startswith("visual.")},
                                       strict=strict, assign=assign)


def text_embeddings(config: dict, quick_gelu: bool, weights: Path, prompts: list[list[str]],
                    batch: int = 256) -> tuple[np.ndarray, float]:
    """One unit-length embedding per class, the mean of its prompts' normalised embeddings renormalised
    (CLIP's prompt ensembling), and the model's learned logit scale (exp of its `logit_scale`)."""
    import open_clip

    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors all mean "not a usable state dict"
        raise BackboneError(f"cannot read CLIP weights {weights}: {first_line(exc)}") from exc
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    model = build_clip(config, quick_gelu)
    model.visual = None  # only the text tower is used
    try:
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("visual.")})
    except (RuntimeError, AttributeError, TypeError) as exc:
        raise BackboneError(f"weights {weights} do not fit this CLIP text tower: {first_line(exc)}") from exc
    model.eval().requires_grad_(False)
    tokenizer = open_clip.SimpleTokenizer(context_length=config["text_cfg"].get("context_length", 77))
    flat = [text for texts in prompts for text in texts]
    with torch.inference_mode():
        encoded = torch.cat([model.encode_text(tokenizer(flat[i:i + batch]), normalize=True)
                             for i in range(0, len(flat), batch)])
        classes, start = [], 0
        for texts in prompts:
            classes.append(nn.functional.normalize(encoded[start:start + len(texts)].mean(0), dim=-1))
            start += len(texts)
        scale = float(model.logit_scale.exp())
    return torch.stack(classes).float().numpy(), scale
