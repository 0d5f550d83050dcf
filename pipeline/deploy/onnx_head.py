"""A fitted head (a scikit-learn Pipeline) as an ONNX graph from its feature row to class probabilities.

skl2onnx converts every head type (standardisation, logistic regression, the calibrated SVM, PCA fusion
with its column transformer, variance threshold and k-best selection, the out-of-core SGD head) except one:
its k-nearest-neighbours converter finds the right neighbours but weights them uniformly when the
classifier weights them by distance, as our kNN head does (measured with skl2onnx 1.20.0: probabilities
off by up to 0.78). That classifier gets its own graph here, sklearn's arithmetic written out: cosine
distances to the training rows, the k nearest, weights 1/d (or, where a distance is exactly 0, 1 for those
neighbours and 0 for the others), summed per class and normalised.

Both graphs take `features` (float32, N x dim) and return `probabilities` (float32, N x classes, in the
order of `pipeline.classes_`).
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline

from pipeline.core.errors import PipelineError, first_line

OPSET = 18  # the default domain's opset, for the backbone's graph and the head's alike
ML_OPSET = 3  # ai.onnx.ml, which skl2onnx's converters use
INPUT, OUTPUT = "features", "probabilities"


class ExportError(PipelineError):
    """A saved head cannot be written as an ONNX model."""


def head_graph(pipeline: Pipeline, dim: int, name: str) -> onnx.ModelProto:
    """`pipeline` (fitted, reading `dim` features) as an ONNX model `features -> probabilities`; a head whose
    steps cannot be converted is refused with the step named (`name`: the head, for the message)."""
    final = pipeline.steps[-1][1]
    if isinstance(final, KNeighborsClassifier) and final.weights == "distance":
        if len(pipeline.steps) != 1 or final.metric != "cosine":
            steps = " -> ".join(type(step).__name__ for _, step in pipeline.steps)
            raise ExportError(f"head {name!r}: only a kNN head made by this pipeline (cosine distance, no steps "
                              f"before it) can be exported, not {steps} with metric {final.metric!r}")
        return _knn_graph(final, dim)
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    try:
        with warnings.catch_warnings():  # sklearn's FutureWarnings on attributes skl2onnx reads (SVC's probA_)
            warnings.simplefilter("ignore", FutureWarning)
            model = to_onnx(pipeline, initial_types=[(INPUT, FloatTensorType([None, dim]))],
                            options={id(final): {"zipmap": False}},
                            target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET})
    except Exception as exc:  # skl2onnx's verdict: no converter or shape calculator for one of the steps
        steps = ", ".join(type(s).__name__ for _, s in pipeline.steps)
        raise ExportError(f"head {name!r} ({steps}) cannot be exported to ONNX: {type(exc).__name__}: "
                          f"{first_line(exc)}") from None
    return _only_output(model, OUTPUT)


def _only_output(model: onnx.ModelProto, keep: str) -> onnx.ModelProto:
    """The model with its other outputs (skl2onnx's `label`) dropped; nodes left unused are harmless."""
    kept = [o for o in model.graph.output if o.name == keep]
    if not kept:
        raise ExportError(f"the converted head has no output {keep!r} "
                          f"(it has {', '.join(o.name for o in model.graph.output)})")
    del model.graph.output[:]
    model.graph.output.extend(kept)
    return model


def _knn_graph(knn: KNeighborsClassifier, dim: int) -> onnx.ModelProto:
    """A distance-weighted cosine kNN classifier; see the module's docstring."""
    train = np.asarray(knn._fit_X, dtype=np.float32)
    norms = np.linalg.norm(train, axis=1, keepdims=True)
    train_unit = train / np.where(norms == 0, 1, norms)  # sklearn's normalize leaves a zero row at zero
    classes = len(knn.classes_)
    onehot = np.eye(classes, dtype=np.float32)[np.asarray(knn._y)]
    k = min(int(knn.n_neighbors), len(train))
    constants = {"train_t": train_unit.T.copy(), "onehot": onehot, "k": np.array([k], np.int64),
                 "one": np.array(1, np.float32), "zero": np.array(0, np.float32), "two": np.array(2, np.float32),
                 "tiny": np.array(np.finfo(np.float32).tiny, np.float32), "axis1": np.array([1], np.int64),
                 "axis2": np.array([2], np.int64)}
    node = helper.make_node
    nodes = [
        node("Mul", [INPUT, INPUT], ["squares"]),
        node("ReduceSum", ["squares", "axis1"], ["sum_squares"], keepdims=1),
        node("Sqrt", ["sum_squares"], ["norm"]),
        node("Equal", ["norm", "zero"], ["zero_norm"]),
        node("Where", ["zero_norm", "one", "norm"], ["safe_norm"]),
        node("Div", [INPUT, "safe_norm"], ["unit"]),
        node("MatMul", ["unit", "train_t"], ["similarity"]),
        node("Sub", ["one", "similarity"], ["raw_distance"]),
        node("Clip", ["raw_distance", "zero", "two"], ["distance"]),
        node("TopK", ["distance", "k"], ["near", "index"], largest=0, sorted=1),
        # weights: 1/d, or where a row has a zero distance, 1 for those neighbours and 0 for the rest
        node("Equal", ["near", "zero"], ["is_zero"]),
        node("Cast", ["is_zero"], ["zero_weight"], to=TensorProto.FLOAT),
        node("ReduceMax", ["zero_weight", "axis1"], ["row_has_zero_f"], keepdims=1),
        node("Cast", ["row_has_zero_f"], ["row_has_zero"], to=TensorProto.BOOL),
        node("Max", ["near", "tiny"], ["near_safe"]),
        node("Reciprocal", ["near_safe"], ["inverse"]),
        node("Where", ["row_has_zero", "zero_weight", "inverse"], ["weight"]),
        node("Gather", ["onehot", "index"], ["votes"], axis=0),
        node("Unsqueeze", ["weight", "axis2"], ["weight3"]),
        node("Mul", ["votes", "weight3"], ["weighted"]),
        node("ReduceSum", ["weighted", "axis1"], ["scores"], keepdims=0),
        node("ReduceSum", ["scores", "axis1"], ["total"], keepdims=1),
        node("Div", ["scores", "total"], [OUTPUT]),
    ]
    graph = helper.make_graph(
        nodes, "knn_cosine_distance",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [None, dim])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [None, classes])],
        initializer=[numpy_helper.from_array(value, name) for name, value in constants.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
