"""Tap points: run a network once and return the globally pooled outputs of chosen modules."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import nn

from pipeline.models.registry import Layer
from pipeline.models.weights import LoadedBackbone


class TappedNetwork(nn.Module):
    """Runs the network once and returns the globally pooled output of each requested tap point.

    Hook outputs go to a per-thread dict: one loaded network serves every task of a process, and a
    multi-threaded Dask worker may run several forward passes at once.
    """

    def __init__(self, network: nn.Module, taps: dict[str, Layer | str]) -> None:
        """`taps`: layer name -> its `Layer`, or just a module path (a feature map, average-pooled)."""
        super().__init__()
        self.network = network
        self.taps = {name: Layer(t, 0) if isinstance(t, str) else t for name, t in taps.items()}
        self._local = threading.local()
        modules = dict(network.named_modules())
        for name, layer in self.taps.items():
            modules[layer.module].register_forward_hook(self._hook(name))

    def _hook(self, layer: str) -> Callable:
        def store(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            self._local.outputs[layer] = output
        return store

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._local.outputs = {}
        try:
            self.network(x)
            outputs = self._local.outputs
        finally:
            self._local.outputs = {}
        return {name: pooled(out.float(), self.taps[name]) for name, out in outputs.items()}


def pooled(out: torch.Tensor, layer: Layer) -> torch.Tensor:
    """One vector per image: a feature map averaged over space; a token sequence (batch, tokens, dim)
    as its class token, the mean of its patch tokens (after `layer.prefix` class/register tokens), or both.
    A twin layer's two streams are pooled each, then set side by side (`pipeline.models.twin.fold`)."""
    if layer.twin:
        from pipeline.models.twin import fold

        return fold(_pooled(out, layer))
    return _pooled(out, layer)


def _pooled(out: torch.Tensor, layer: Layer) -> torch.Tensor:
    if out.ndim == 4:
        return out.mean((2, 3))
    if out.ndim == 3 and layer.pool:
        cls, mean = out[:, 0], out[:, layer.prefix:].mean(1)
        return {"cls": cls, "mean": mean, "cls_mean": torch.cat([cls, mean], 1)}[layer.pool]
    return out.flatten(1)


def tapped(backbone: LoadedBackbone, layers: list[str]) -> TappedNetwork:
    return TappedNetwork(backbone.network, {name: backbone.spec.layers[name] for name in layers})
