"""Twin networks: a backbone and its fine-tuned copy in one network, sharing every block they share.

Fine-tuning with `--unfreeze last:N` changes only the last N blocks; the blocks before them are the
parent's, bit for bit. A twin runs those shared blocks once, then each changed module twice, side by
side: its parent's version (`frozen`) and its fine-tuned one (`tuned`). The two streams travel as one
batch of twice the images (the parent's first): the first changed module doubles the batch, every
later one splits it in two, runs each half through its own version and joins them again. Layers past
the first changed module therefore see twice the images, and their pooled features are folded back
to one row per image with the two streams side by side (`fold`: the parent's features, then the
fine-tuned ones), which is what `Layer.twin` marks.

On EfficientNet-Lite0 the last 6 blocks (the default) are 7% of a forward pass (measured on 2 CPU
cores, benchmarks/RESULTS.md), so a twin costs about 1.07 times one network. This holds for networks
whose modules after the first changed one treat each image on its own (convolutions, BatchNorm in
eval mode, attention within an image, pooling): the networks this pipeline fine-tunes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class TwinModule(nn.Module):
    """One changed module, run as its parent's version on the first half of the batch and its
    fine-tuned version on the second; with `doubles`, both run on the whole (single) batch."""

    def __init__(self, frozen: nn.Module, tuned: nn.Module, doubles: bool = False) -> None:
        super().__init__()
        self.frozen, self.tuned, self.doubles = frozen, tuned, doubles

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        first, second = (x, x) if self.doubles else x.chunk(2)
        return torch.cat([self.frozen(first, *args, **kwargs), self.tuned(second, *args, **kwargs)])


def make_twin(tuned: nn.Module, frozen: nn.Module, paths: Sequence[str]) -> nn.Module:
    """`tuned` with each module at `paths` (in execution order: the first doubles the batch) replaced
    by a `TwinModule` of `frozen`'s module at the same path and its own. `tuned` is changed in place
    and returned; `frozen` lends its modules and is not used otherwise."""
    if not paths:
        raise ValueError("a twin needs at least one changed module")
    frozen_modules = dict(frozen.named_modules())
    for i, path in enumerate(paths):
        parent_path, _, name = path.rpartition(".")
        owner = tuned.get_submodule(parent_path) if parent_path else tuned
        setattr(owner, name, TwinModule(frozen_modules[path], getattr(owner, name), doubles=i == 0))
    return tuned


def fold(pooled: torch.Tensor) -> torch.Tensor:
    """A twin layer's pooled features (2N rows: the parent's, then the fine-tuned ones) as N rows of
    both side by side."""
    frozen, tuned = pooled.chunk(2)
    return torch.cat([frozen, tuned], 1)


def twin_layers(network: nn.Module, paths: Sequence[str], modules: dict[str, str],
                input_size: int) -> dict[str, bool | None]:
    """For each layer name -> tap module of `network` (before it is made a twin; one forward pass of an
    `input_size` image finds the order): True when the layer's output comes from the first changed module
    on (its features are folded), False before it, None when it lies inside a changed module (a twin
    offers no such layer: only one of the two versions would run it). The order is the one in which the
    modules finish, so a module that holds the changed ones (the whole network, for a layer tapping its
    output: timm's `pooled`) counts as after them."""
    inside = tuple(f"{p}." for p in paths)
    order: list[str] = []
    named = dict(network.named_modules())
    watched = {*modules.values(), paths[0]}
    hooks = [named[m].register_forward_hook(lambda _m, _i, _o, m=m: order.append(m)) for m in watched]
    try:
        with torch.no_grad():
            network.eval()(torch.zeros(1, 3, input_size, input_size))
    finally:
        for hook in hooks:
            hook.remove()
    start = order.index(paths[0])
    return {layer: None if module.startswith(inside) else order.index(module) >= start
            for layer, module in modules.items()}
