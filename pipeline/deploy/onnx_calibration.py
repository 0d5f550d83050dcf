"""A calibrated head's last steps as ONNX nodes appended to its base classifier's graph.

Each function takes a model whose output `probabilities` holds what the calibration reads and rewrites it
so that `probabilities` is the calibrated output, with sklearn's and `pipeline.heads.calibration`'s
arithmetic written out:

- `temperature`: softmax(log(clip(p, 1e-12, 1)) / T) (`TemperatureScaling`);
- `one_vs_rest`: scikit-learn 1.9.1's `CalibratedClassifierCV(ensemble=False)` for sigmoid and isotonic:
  one map per class of the base's score column (decision_function, or predict_proba where it has none;
  in the two-class case one column, the second class's), sigmoid 1 / (1 + exp(a s + b)), isotonic
  `np.interp` on its thresholds with the ends clipped; then two classes: (1 - q, q), more: divided by the
  row's sum, uniform where that sum is 0. (sklearn then sets values in (1, 1 + 1e-5] to 1: both maps stay
  within [0, 1], so there is nothing to do.)

Known limit: temperature scaling of a kNN head (not its default) takes the log of vote shares near 0, so
float32 against float64 shows where a query is a training image again (cosine distance 0, e.g. the same
photo at another scale): sklearn's neighbours other than it get weight ~0, the graph's a little more,
measured up to 0.1 apart on such synthetic duplicates; queries near, not on, training rows agree to 1e-4.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.heads.calibration import EPSILON

OUTPUT = "probabilities"


def _append(model: onnx.ModelProto, kind: str, nodes: list[onnx.NodeProto], constants: dict[str, np.ndarray],
            classes: int) -> onnx.ModelProto:
    """`nodes` (reading `in`, writing `out`, constants by name) appended after `model`'s output, every name
    prefixed uniquely, and `out` becoming the model's `probabilities`."""
    graph = model.graph
    prefix = f"{kind}{len(graph.node)}/"
    scores = prefix + "in"
    for node in graph.node:  # the base's output becomes an inner tensor
        node.output[:] = [scores if name == OUTPUT else name for name in node.output]
    renamed = {"in": scores, "out": OUTPUT}
    for i, node in enumerate(nodes):
        node.input[:] = [renamed.get(name, prefix + name) for name in node.input]
        node.output[:] = [renamed.get(name, prefix + name) for name in node.output]
        node.name = f"{prefix}{i}_{node.op_type}"
    graph.node.extend(nodes)
    graph.initializer.extend(numpy_helper.from_array(np.asarray(value), prefix + name)
                             for name, value in constants.items())
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [None, classes]))
    return model


def temperature(model: onnx.ModelProto, temperature_: float, classes: int) -> onnx.ModelProto:
    """Temperature scaling of the probabilities `model` writes."""
    node = helper.make_node
    nodes = [node("Clip", ["in", "low", "high"], ["clipped"]),
             node("Log", ["clipped"], ["log"]),
             node("Div", ["log", "t"], ["logits"]),
             node("Softmax", ["logits"], ["out"], axis=-1)]
    constants = {"low": np.float32(EPSILON), "high": np.float32(1), "t": np.float32(temperature_)}
    return _append(model, "temperature", nodes, constants, classes)


def _isotonic_segments(calibrators: list) -> dict[str, np.ndarray]:
    """Per class (column) the first threshold's value and its segments (low, high, slope), padded with
    empty ones: f(s) = y0 + sum over segments of slope (clip(s, low, high) - low), which is np.interp
    with clipping at both ends for increasing thresholds."""
    count = max(len(c.X_thresholds_) - 1 for c in calibrators) or 1
    low, high, slope = (np.zeros((count, len(calibrators))) for _ in range(3))
    for column, calibrator in enumerate(calibrators):
        x, y = np.asarray(calibrator.X_thresholds_, float), np.asarray(calibrator.y_thresholds_, float)
        low[: len(x) - 1, column], high[: len(x) - 1, column] = x[:-1], x[1:]
        slope[: len(x) - 1, column] = np.diff(y) / np.diff(x)
    first = np.array([c.y_thresholds_[0] for c in calibrators], float)
    return {name: value.astype(np.float32) for name, value in
            {"low": low, "high": high, "slope": slope, "y0": first}.items()}


def one_vs_rest(model: onnx.ModelProto, method: str, calibrators: list, classes: int) -> onnx.ModelProto:
    """sklearn's sigmoid or isotonic calibration of the scores `model` writes (one column per class; with
    two classes the second column is the one calibrated; see the module's docstring)."""
    node = helper.make_node
    constants: dict[str, np.ndarray] = {"axis1": np.array([1], np.int64)}
    if classes == 2:
        constants.update(second=np.array([1], np.int64), third=np.array([2], np.int64))
        nodes = [node("Slice", ["in", "second", "third", "axis1"], ["scores"])]
    else:
        nodes = [node("Identity", ["in"], ["scores"])]
    if method == "sigmoid":
        constants.update(minus_a=np.array([-c.a_ for c in calibrators], np.float32),
                         minus_b=np.array([-c.b_ for c in calibrators], np.float32))
        nodes += [node("Mul", ["scores", "minus_a"], ["scaled"]),
                  node("Add", ["scaled", "minus_b"], ["z"]),
                  node("Sigmoid", ["z"], ["calibrated"])]
    else:  # isotonic
        constants.update(_isotonic_segments(calibrators))
        nodes += [node("Unsqueeze", ["scores", "axis1"], ["scores3"]),  # N x 1 x columns, segments x columns
                  node("Max", ["scores3", "low"], ["above"]),
                  node("Min", ["above", "high"], ["inside"]),
                  node("Sub", ["inside", "low"], ["run"]),
                  node("Mul", ["run", "slope"], ["rise"]),
                  node("ReduceSum", ["rise", "axis1"], ["rises"], keepdims=0),
                  node("Add", ["rises", "y0"], ["calibrated"])]
    if classes == 2:
        constants["one"] = np.float32(1)
        nodes += [node("Sub", ["one", "calibrated"], ["first"]),
                  node("Concat", ["first", "calibrated"], ["out"], axis=1)]
    else:
        constants.update(zero=np.float32(0), uniform=np.float32(1 / classes))
        nodes += [node("ReduceSum", ["calibrated", "axis1"], ["total"], keepdims=1),
                  node("Equal", ["total", "zero"], ["no_mass"]),
                  node("Div", ["calibrated", "total"], ["normalised"]),
                  node("Where", ["no_mass", "uniform", "normalised"], ["out"])]
    return _append(model, method, nodes, constants, classes)
