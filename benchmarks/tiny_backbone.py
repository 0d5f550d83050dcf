"""`scale_tiny`, the benchmark backbone of benchmarks/scale.py: the network of tests/tinynet.py (`tiny_test`,
same fixed-seed weights file), registered so that torch is imported only when the network is built. A
batch run that computes nothing then never imports torch, which shows that it ran no forward pass.

    PIPELINE_PLUGINS=benchmarks.tiny_backbone:register PIPELINE_TINY_WEIGHTS=<folder of write_weights>
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.core.errors import BackboneError
from pipeline.images.preprocess import Preprocess
from pipeline.models.registry import BackboneSpec, Layer
from pipeline.models.registry import register as register_backbone

NAME = "scale_tiny"
PREPROCESS = Preprocess(40, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear")  # tests/tinynet.py's


def _build():  # a torch module: torch is imported here only
    from tests.tinynet import NAME as TINY
    from tests.tinynet import VARIANTS, TinyNet

    width, head, _seed = VARIANTS[TINY]
    return TinyNet(width, head)


def _weights() -> Path:
    folder = os.environ.get("PIPELINE_TINY_WEIGHTS")
    if not folder:
        raise BackboneError(f"{NAME}: set PIPELINE_TINY_WEIGHTS to a folder written by tests/tinynet.py write_weights")
    return Path(folder) / "tiny_test.pth"


def register() -> None:
    register_backbone(NAME, lambda: BackboneSpec(
        name=NAME, build=_build, locate_weights=_weights, preprocess=PREPROCESS,
        layers={"head": Layer("_head_act", 64)}, default_layer="head",
        source="benchmarks/tiny_backbone.py: tests/tinynet.py's fixed-seed random weights, for benchmarks only"))
