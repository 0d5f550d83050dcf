"""The network fine-tuning trains: the trunk cut at its default feature layer with a new linear layer,
its blocks, which of them train, and the linear probe folded into that layer (LP-FT).

Blocks are the network's parameterised units in execution order (a BatchNorm joins the block before
it); `last:N` unfreezes the N blocks nearest the head, each earlier one at `lr_decay` times the lr of
the one after it. BatchNorm layers stay in eval mode with frozen affine parameters unless
`train_bn`: batch statistics of a few dozen images would only add noise to ImageNet's.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

from pipeline.core.errors import ConfigError
from pipeline.models.registry import BackboneSpec

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class _Tapped(Exception):  # noqa: N818 - control flow, not an error: the trunk ends at the tap
    def __init__(self, output: torch.Tensor) -> None:
        self.output = output


class FineTuneNet(nn.Module):
    """Trunk up to the tap module, global average pooling, a new linear layer.

    The trunk stops at the tap (its hook raises), so the original classifier never runs."""

    def __init__(self, network: nn.Module, tap: str, dim: int, classes: int, train_bn: bool = False) -> None:
        super().__init__()
        self.network = network
        self.classifier = nn.Linear(dim, classes)
        self.train_bn = train_bn
        self.frozen_blocks: list[nn.Module] = []
        self.trained_units: list[list[nn.Module]] = []  # the blocks that train, in execution order
        dict(network.named_modules())[tap].register_forward_hook(self._stop)

    @staticmethod
    def _stop(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        raise _Tapped(output)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        try:
            self.network(x)
        except _Tapped as tapped:
            out = tapped.output
        else:
            raise RuntimeError("the tap module did not run")
        return out.float().mean((2, 3)) if out.ndim == 4 else out.float().flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def train(self, mode: bool = True) -> FineTuneNet:
        """Frozen blocks (dropout, stochastic depth) and, unless `train_bn`, every BatchNorm stay in eval."""
        super().train(mode)
        for block in self.frozen_blocks:
            block.eval()
        if not self.train_bn:
            for module in self.modules():
                if isinstance(module, _BN):
                    module.eval()
        return self


def blocks(network: nn.Module, tap: str, input_size: int = 64) -> list[list[nn.Module]]:
    """The trunk's units in execution order, up to the tap: each child of a top-level Sequential or
    ModuleList (else the top-level module) that has parameters; a BatchNorm joins the unit before it."""
    candidates = []
    for child in network.children():
        inner = list(child.children()) if isinstance(child, nn.Sequential | nn.ModuleList) else [child]
        candidates += [m for m in inner if any(True for _ in m.parameters())]
    order: list[nn.Module] = []
    hooks = [m.register_forward_pre_hook(lambda m, _i: order.append(m)) for m in candidates]
    hooks.append(dict(network.named_modules())[tap].register_forward_hook(FineTuneNet._stop))
    try:
        with torch.no_grad():
            network(torch.zeros(1, 3, input_size, input_size))
    except _Tapped:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    units: list[list[nn.Module]] = []
    for module in dict.fromkeys(order):
        if isinstance(module, _BN) and units:
            units[-1].append(module)
        else:
            units.append([module])
    return units


def unfrozen_count(unfreeze: str, total: int) -> int:
    """How many trunk blocks (counted from the head) `head`, `last:N` or `all` trains."""
    if unfreeze == "head":
        return 0
    if unfreeze == "all":
        return total
    match = re.fullmatch(r"last:(\d+)", unfreeze)
    if not match or not 1 <= int(match.group(1)) <= total:
        raise ConfigError(f"unfreeze must be head, all or last:N with 1 <= N <= {total} (blocks of this backbone), "
                          f"not {unfreeze!r}")
    return int(match.group(1))


def freeze(model: FineTuneNet, units: list[list[nn.Module]], count: int, lr: float, decay: float) -> list[dict]:
    """Freeze all but the last `count` blocks; return AdamW groups with discriminative learning rates."""
    model.network.requires_grad_(False)
    groups = [{"params": list(model.classifier.parameters()), "lr": lr}]
    trained = units[len(units) - count:] if count else []
    model.frozen_blocks = [m for unit in units[:len(units) - count] for m in unit]
    model.trained_units = trained
    for depth, unit in enumerate(reversed(trained), start=1):
        params = []
        for module in unit:
            module.requires_grad_(True)
            for sub in module.modules():
                if isinstance(sub, _BN) and not model.train_bn:
                    sub.requires_grad_(False)
            params += [p for p in module.parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": lr * decay ** depth})
    return groups


def linear_from_probe(pipeline, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) of a linear layer giving the probe's logits on raw features: the probe standardises
    first, so W' = W / scale and b' = b - W' @ mean. A binary probe's single row z becomes (0, z)."""
    scaler, clf = pipeline.named_steps["scale"], pipeline.named_steps["clf"]
    if list(clf.classes_) != list(range(classes)):
        raise ConfigError("the probe did not see every class; every class needs training images")
    coef, intercept = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    weight = coef / scaler.scale_
    bias = intercept - weight @ scaler.mean_
    return torch.as_tensor(weight, dtype=torch.float32), torch.as_tensor(bias, dtype=torch.float32)



def build_model(network: nn.Module, spec: BackboneSpec, classes: int, probe, unfreeze: str, lr: float,
                lr_decay: float, train_bn: bool = False) -> tuple[FineTuneNet, list[dict], int]:
    """The network cut at its default layer with a new linear layer (the probe's, folded, when given),
    all but the chosen blocks frozen; returns it with its AdamW groups and its number of blocks."""
    tap = spec.layers[spec.default_layer]
    model = FineTuneNet(network, tap.module, tap.dim, classes, train_bn)
    if probe is not None:
        weight, bias = linear_from_probe(probe, classes)
        with torch.no_grad():
            model.classifier.weight.copy_(weight)
            model.classifier.bias.copy_(bias)
    units = blocks(network, tap.module, spec.preprocess.crop)
    return model, freeze(model, units, unfrozen_count(unfreeze, len(units)), lr, lr_decay), len(units)

