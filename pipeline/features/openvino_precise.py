"""Modules of a converted network kept in f32 while OpenVINO runs the rest in bf16.

bf16 loses most in a network's first, high-resolution layers: for EfficientNet-Lite, keeping block 0 in
f32 takes the worst photo's cosine to the fp32 features from 0.979-0.995 to 0.995-0.999
(benchmarks/openvino_bf16_layers.py) for 7.6% of the network's throughput on 2 idle cores
(benchmarks/openvino_budget.py). A backbone names its modules in `BackboneSpec.openvino_f32`.

OpenVINO's CPU plugin runs a node in its original precision when the node carries the `precise` runtime
attribute, which Python cannot set (only the IR reader makes it): so the model is saved as IR in a
temporary folder, the attribute is written into the chosen layers' XML, and the model is read back. A
node belongs to the module named by the nearest node at or after it that names one: the converter
renames the convolutions it fuses, and the batch norm after them keeps the module's name.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

_MODULE = re.compile(r"__module\.([^/]+)/")  # the torch module path in a converted node's name
_ENDPOINTS = ("Parameter", "Constant", "Result")
_LAYER = re.compile(r'<layer id="\d+" name="([^"]*)" type="[^"]*" version="[^"]*">')
_PRECISE = '\n<rt_info><attribute name="precise" version="0" /></rt_info>'


def module_paths(model: Any, root: str) -> list[tuple[Any, str]]:
    """Each operation of the OpenVINO `model` with the path of the module it belongs to, relative to
    `root` (the network's path in the converted module, e.g. "network.network."); "" for the operations
    after the last named one. A name of `root` itself (an operation of the network's own forward) names
    no module: such an operation belongs with what follows it."""
    found, module = [], ""
    for node in reversed(list(model.get_ordered_ops())):
        match = _MODULE.search(node.get_friendly_name())
        if match and match.group(1).startswith(root):
            module = match.group(1)[len(root):]
        found.append((node, module))
    return found[::-1]


def within(path: str, modules: tuple[str, ...]) -> bool:
    """Whether the module at `path` is one of `modules` or inside one."""
    return any(path == module or path.startswith(f"{module}.") for module in modules)


def _marked(xml: str, names: set[str]) -> str:
    """The IR with the layers named `names` marked; raises where some are not found (a converter that
    names them otherwise must not leave features under a key that says f32)."""
    def mark(layer: re.Match) -> str:
        return layer.group(0) + _PRECISE if html.unescape(layer.group(1)) in names else layer.group(0)

    marked = _LAYER.sub(mark, xml)
    found = marked.count(_PRECISE)
    if not names or found != len(names):
        raise RuntimeError(f"kept {found} of {len(names)} operations in f32 (the IR names them otherwise)")
    return marked


@contextmanager
def kept_in_f32(model: Any, names: set[str]) -> Iterator[Any]:
    """`model` with the operations named `names` marked to run in f32, valid inside the block (its
    weights are read from a temporary folder: compile it there)."""
    import openvino as ov

    with TemporaryDirectory(prefix="pipeline-openvino-") as folder:
        xml = Path(folder) / "model.xml"
        ov.save_model(model, xml, compress_to_fp16=False)
        xml.write_text(_marked(xml.read_text(), names))
        yield ov.Core().read_model(xml, Path(folder) / "model.bin")


def names_in(model: Any, root: str, modules: tuple[str, ...]) -> set[str]:
    """The names of `model`'s operations (not its inputs, constants or outputs) in `modules`."""
    return {node.get_friendly_name() for node, path in module_paths(model, root)
            if node.get_type_name() not in _ENDPOINTS and within(path, modules)}
