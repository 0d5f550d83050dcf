"""`finetune --ensemble`: the last epoch's network and the linear probe, averaged, as one backbone.

The network LP-FT trains and the probe it started from (a logistic regression on the frozen parent's
features) err on different images; the mean of their log-probabilities is right more often than either
alone (cross-validation inside the training folders of three photo sets, benchmarks/RESULTS.md). The
probe guard judges the ensemble instead of the epochs: on the held-out part, the last epoch's network
averaged with the probe LP-FT started from must not be below that probe alone, else the probe is kept.

What is saved is a twin backbone (`pipeline.models.twin`): the parent's blocks shared, the trained ones
doubled (the parent's and the fine-tuned versions), its layer features the two side by side. Its
classifier averages the two members' logits: the probe refitted on every training image (on the
parent's half) and the trained linear layer (on the fine-tuned half), which is the mean of their
log-probabilities up to a constant per image. Stage-2 heads fit on the twin's features like on any
backbone's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.features.extract import FeatureSet, extract
from pipeline.images.data import Dataset
from pipeline.images.preprocess import Preprocess
from pipeline.models.registry import BackboneSpec, Layer, get_spec
from pipeline.models.twin import twin_layers
from pipeline.models.weights import load_backbone
from pipeline.tuning.training import Images, predict_logits


@dataclass
class Verdict:
    """The guard's judgement of the ensemble on the held-out part."""

    kept: bool
    accuracy: float  # the ensemble's held-out accuracy
    probe_accuracy: float  # the starting probe's
    gained: int  # held-out images the ensemble gets right and the probe not
    lost: int  # and the other way round
    epoch: int  # the epoch in the ensemble (the last one trained)

    def line(self) -> str:
        """Why the run kept what it kept, in a line."""
        what = (f"the ensemble of epoch {self.epoch} with the probe ({self.accuracy:.1%} on the held-out part, "
                f"{self.gained} image{'' if self.gained == 1 else 's'} gained and {self.lost} lost against the "
                f"starting probe's {self.probe_accuracy:.1%})")
        return f"{what}: kept" if self.kept else f"{what} is below the probe"


def not_applicable(init: str, unfreeze: str) -> str | None:
    """Why the ensemble cannot be made for these options (None: it can): it averages the network with
    the probe LP-FT starts from, and needs trained blocks to differ from the parent."""
    if init != "probe":
        return "the ensemble averages the network with its linear probe, and --init random has none"
    if unfreeze == "head":
        return ("with --unfreeze head only the linear layer trains, and its average with the probe is one linear "
                "layer on the parent's features")
    return None


def log_probabilities(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


def cached_features(dataset: Dataset, backbone: str, options, progress: bool = False) -> FeatureSet:
    """`backbone`'s default-layer features of `dataset`, from the feature cache (computed where missing),
    on the run's device and precision: what the probe is fitted on and scored with."""
    layer = get_spec(backbone).default_layer
    return extract(dataset, backbone, [layer], options.cache_dir, options.train.device, options.train.precision,
                   progress=progress).feature_sets[(backbone, layer)]


def probe_log_probabilities(probe, images: Images, classes: list[str], options) -> np.ndarray:
    """The stage-2 probe's log-probabilities for `images`, on the parent's cached features (in their order)."""
    fs = cached_features(Dataset(images.paths, images.labels, classes, []), options.backbone, options)
    if [str(p) for p in fs.paths] != [str(p) for p in images.paths]:  # the same decoder read them: never expected
        raise RuntimeError("the cached features and the decoded images list different files")
    return probe.predict_log_proba(fs.features.compute())


def judge(model: nn.Module, probe, val: Images, classes: list[str], pre: Preprocess, options,
          epoch: int) -> Verdict:
    """The last epoch's network (`model` as it is) averaged with the starting probe, against that probe,
    on the held-out part: kept unless below it."""
    network = log_probabilities(predict_logits(model, val, pre, options.train))
    probe_lp = probe_log_probabilities(probe, val, classes, options)
    ensemble_right = (network + probe_lp).argmax(1) == val.labels
    probe_right = probe_lp.argmax(1) == val.labels
    return Verdict(bool(ensemble_right.sum() >= probe_right.sum()), float(ensemble_right.mean()),
                   float(probe_right.mean()), int((ensemble_right & ~probe_right).sum()),
                   int((probe_right & ~ensemble_right).sum()), epoch)


def predict(model: nn.Module, probe, test: Images, classes: list[str], pre: Preprocess, options) -> np.ndarray:
    """The ensemble's predicted classes for `test`: the network's and the probe's log-probabilities averaged."""
    network = log_probabilities(predict_logits(model, test, pre, options.train))
    return (network + probe_log_probabilities(probe, test, classes, options)).argmax(1)


@dataclass
class Twin:
    """What `save_backbone` needs for a twin: its state dict, its changed modules, its layers."""

    state: dict
    paths: list[str]
    layers: dict[str, Layer]


def twin_state(parent: BackboneSpec, tuned: nn.Module, trained: list[list[nn.Module]], probe_weight: torch.Tensor,
               probe_bias: torch.Tensor, classifier: nn.Linear) -> Twin:
    """The twin of the parent network and `tuned` (its `trained` units changed), with the classifier that
    averages the probe's logits (on the parent's half) and `classifier`'s (on the fine-tuned half)."""
    names = {id(m): n for n, m in tuned.named_modules()}
    paths = [names[id(m)] for unit in trained for m in unit]
    loaded = load_backbone(parent.name)
    frozen = loaded.network.state_dict()
    state = {}
    for key, value in tuned.state_dict().items():
        owner = next((p for p in paths if key.startswith(f"{p}.")), None)
        if owner is None:
            state[key] = value.cpu()
        else:
            state[f"{owner}.frozen{key[len(owner):]}"] = frozen[key]
            state[f"{owner}.tuned{key[len(owner):]}"] = value.cpu()
    flags = twin_layers(loaded.network, paths, {k: v.module for k, v in parent.layers.items()}, parent.preprocess.crop)
    layers = {k: Layer(v.module, 2 * v.dim if flags[k] else v.dim, v.pool, v.prefix, bool(flags[k]))
              for k, v in parent.layers.items() if flags[k] is not None}
    weight = torch.cat([probe_weight.cpu(), classifier.weight.detach().float().cpu()], 1) / 2
    bias = (probe_bias.cpu() + classifier.bias.detach().float().cpu()) / 2
    return Twin({"state_dict": state, "classifier": {"weight": weight, "bias": bias}}, paths, layers)
