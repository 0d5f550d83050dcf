"""`pipeline export`: a saved head and its backbones as one ONNX model, from uint8 images to probabilities.

The model is two graphs joined by `onnx.compose`: the backbones (`HeadNetwork.module`, exported by
torch's TorchScript-based ONNX exporter at fp32: uint8 NHWC -> float -> normalise -> network -> pooled
taps, side by side in the head's source order) and the head (`onnx_head.head_graph`: its
standardisation, PCA, selection and classifier). Inputs: one uint8 batch per input geometry (`images`,
N x crop x crop x 3, for one backbone); output: `probabilities` (N x classes). The class names, the
preprocessing each input expects and what the head was fitted on are in the model's metadata_props.

The torch exporter is the TorchScript one (`dynamo=False`): the newer torch.export-based exporter needs
onnxscript, which is not a dependency, and a fixed input size is all a traced network needs.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import compose

from pipeline.core.io import atomic_write, make_folder
from pipeline.deploy.network import HeadNetwork
from pipeline.deploy.onnx_head import INPUT, OPSET, OUTPUT, ExportError, head_graph
from pipeline.heads.bundle import HeadBundle, load_bundle

logger = logging.getLogger(__name__)

PRODUCER = "transfer-pipeline"
CHECK_IMAGES = 4  # random images the written model is checked on against the torch path


@dataclass
class ExportResult:
    path: Path
    inputs: dict[str, dict]  # input name -> what it expects (Geometry.describe)
    classes: list[str]
    bytes: int
    seconds: float
    check_max_abs_diff: float  # on CHECK_IMAGES random images, against the torch fp32 path


def metadata(bundle: HeadBundle, network: HeadNetwork) -> dict[str, str]:
    """The model's metadata_props (strings): what a program that knows nothing of this package needs."""
    import pipeline

    return {
        "classes": json.dumps(output_classes(bundle)),
        "inputs": json.dumps({name: g.describe() for name, g in network.inputs.items()}),
        "output": json.dumps({"name": OUTPUT, "shape": [None, len(output_classes(bundle))],
                              "meaning": "class probabilities, columns in the order of classes"}),
        "preprocessing": ("decode, turn upright (EXIF orientation), convert to RGB (alpha composited on white), "
                          "resize the shorter side to resize_shorter_side and centre-crop center_crop (as one "
                          "resampling of the kept square; area averaging when shrinking), uint8 NHWC; the "
                          "normalisation is inside the model"),
        "head": json.dumps({"name": bundle.head.name, "type": bundle.head.type}),
        "sources": json.dumps([s.model_dump() for s in bundle.sources]),
        "fitted_on_precision": network.precision,
        "versions": json.dumps({**bundle.versions, "transfer-pipeline": pipeline.__version__, "onnx": onnx.__version__,
                                "torch (export)": torch.__version__}),
    }


def output_classes(bundle: HeadBundle) -> list[str]:
    """The class of each probability column: the head's classes that had training images, in its order."""
    return [bundle.classes[int(i)] for i in bundle.pipeline.classes_]


def _backbone_graph(network: HeadNetwork) -> onnx.ModelProto:
    module = network.module()
    names = list(network.inputs)
    examples = tuple(torch.zeros((2, g.crop, g.crop, 3), dtype=torch.uint8) for g in network.inputs.values())
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the legacy exporter's deprecation, and the tracer's on a fixed input size
        warnings.simplefilter("ignore")
        torch.onnx.export(module, examples, buffer, dynamo=False, input_names=names, output_names=[INPUT],
                          dynamic_axes={**{n: {0: "batch"} for n in names}, INPUT: {0: "batch"}},
                          opset_version=OPSET)
    return onnx.load_from_string(buffer.getvalue())


def build_model(bundle: HeadBundle, network: HeadNetwork) -> onnx.ModelProto:
    """The joined model, with its metadata, checked by onnx's checker."""
    head = head_graph(bundle.pipeline, network.dim, bundle.head.name)
    backbone = _backbone_graph(network)
    head = compose.add_prefix(head, "head/", rename_inputs=False, rename_outputs=False)
    head.ir_version = backbone.ir_version = min(head.ir_version, backbone.ir_version)
    imports = {op.domain: op.version for model in (head, backbone) for op in model.opset_import}
    for model in (head, backbone):
        del model.opset_import[:]
        model.opset_import.extend(onnx.helper.make_opsetid(domain, version) for domain, version in imports.items())
    model = compose.merge_models(backbone, head, io_map=[(INPUT, INPUT)])
    model.producer_name, model.doc_string = PRODUCER, f"head {bundle.head.name!r}: images -> class probabilities"
    onnx.helper.set_model_props(model, metadata(bundle, network))
    onnx.checker.check_model(model)
    return model


def check_against_torch(model: bytes, network: HeadNetwork, bundle: HeadBundle, images: int = CHECK_IMAGES) -> float:
    """Largest absolute probability difference between onnxruntime on the written model and the torch fp32
    path (the same networks and head in Python) on `images` random uint8 images."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    batches = {name: rng.integers(0, 256, (images, g.crop, g.crop, 3), dtype=np.uint8)
               for name, g in network.inputs.items()}
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    (onnx_proba,) = session.run([OUTPUT], batches)
    with torch.inference_mode():
        features = network.module()(*(torch.from_numpy(b) for b in batches.values())).numpy()
    return float(np.abs(onnx_proba - bundle.pipeline.predict_proba(features)).max())


def export_onnx(model: str | os.PathLike, out: str | os.PathLike, trust_pickle: bool = False) -> ExportResult:
    """Write the saved head `model` with its backbones as one ONNX model at `out` (atomically), checked
    against the torch path on random images."""
    started = time.perf_counter()
    bundle = load_bundle(model, trust_pickle)
    network = HeadNetwork(bundle, model, device="cpu")
    if network.precision != "fp32":
        logger.warning(f"warning: {model} was fitted on {network.precision} features; the exported model computes "
                       "fp32 features, which differ in the last bits (probabilities may differ from `pipeline "
                       "predict` by more than 1e-3; a head fitted on fp32 features matches it)")
    onnx_model = build_model(bundle, network)
    data = onnx_model.SerializeToString()
    diff = check_against_torch(data, network, bundle)
    if not diff <= 1e-3:
        raise ExportError(f"the exported model of {model} disagrees with the torch path by {diff:.2g} on random "
                          "images (over 1e-3): not written")
    out = Path(out)
    make_folder(out.parent)
    with atomic_write(out, "wb") as fh:
        fh.write(data)
    return ExportResult(out, {n: g.describe() for n, g in network.inputs.items()}, output_classes(bundle), len(data),
                        time.perf_counter() - started, diff)
