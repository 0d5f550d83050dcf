"""Tap points: run a network once and return the globally pooled outputs of chosen modules."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import nn

from pipeline.models.weights import LoadedBackbone


class TappedNetwork(nn.Module):
    """Runs the network once and returns the globally pooled output of each requested tap point.

    Hook outputs go to a per-thread dict: one loaded network serves every task of a process, and a
    multi-threaded Dask worker may run several forward passes at once.
    """

    def __init__(self, network: nn.Module, taps: dict[str, str]) -> None:
        super().__init__()
        self.network = network
        self.taps = taps
        self._local = threading.local()
        modules = dict(network.named_modules())
        for layer, module in taps.items():
            modules[module].register_forward_hook(self._hook(layer))

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
        return {layer: out.float().mean((2, 3)) if out.ndim == 4 else out.float().flatten(1)
                for layer, out in outputs.items()}


def tapped(backbone: LoadedBackbone, layers: list[str]) -> TappedNetwork:
    return TappedNetwork(backbone.network, {name: backbone.spec.layers[name].module for name in layers})
