"""The config reference, generated from the models' JSON Schema so that it cannot disagree with them:
`pipeline schema` writes docs/reference/config.md (every key of the run and batch configs: what it
accepts, its default, its description) and the raw schemas beside it; a test keeps the committed
copies current."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.core.io import make_folder, write_text_atomic


def schemas() -> dict[str, dict]:
    from pipeline.app.batch import BatchConfig
    from pipeline.app.config import RunConfig

    return {"run-config": RunConfig.model_json_schema(), "batch-config": BatchConfig.model_json_schema()}


def _refs(schema: Any) -> list[str]:
    """The $defs names a property's schema points to, in order."""
    if isinstance(schema, dict):
        found = [schema["$ref"].rsplit("/", 1)[-1]] if "$ref" in schema else []
        return found + [r for key, value in schema.items() if key != "$ref" for r in _refs(value)]
    if isinstance(schema, list):
        return [r for item in schema for r in _refs(item)]
    return []


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _value(value: Any) -> str:
    return f"`{value if isinstance(value, str) else json.dumps(value)}`"


def _table(model: dict, defs: dict) -> list[str]:
    rows = ["| key | accepts | default | description |", "| --- | --- | --- | --- |"]
    for key, prop in model["properties"].items():
        if "const" in prop:
            accepts, default = _value(prop["const"]), "required"
        else:
            accepts = prop.get("accepts", prop.get("type", ""))
            default = ("required" if key in model.get("required", []) else _value(prop["default"]) if "default" in prop
                       else "see below" if _refs(prop) else "none")
        rows.append(f"| `{key}` | {_cell(accepts)} | {default} | {_cell(prop.get('description', ''))} |")
    return rows


def _sections(model: dict, defs: dict, prefix: str) -> list[str]:
    """A table for each key whose value is a mapping with keys of its own (for `heads:`, one per type)."""
    lines: list[str] = []
    for key, prop in model["properties"].items():
        refs = list(dict.fromkeys(_refs(prop)))
        for ref in refs:
            sub = defs[ref]
            tag = next((p["const"] for p in sub["properties"].values() if "const" in p), None)
            title = f"{prefix}{key}" + ("[]" if prop.get("anyOf", [{}])[0].get("type") == "array" else "")
            title += f" (type: {tag})" if tag else ""
            lines += ["", f"### `{title}`", "", sub.get("description", ""), "", *_table(sub, defs)]
            lines += _sections(sub, defs, f"{prefix}{key}.")
    return lines


def reference_markdown(generated: dict[str, dict]) -> str:
    lines = ["# Config reference", "",
             "Generated from the config models (`pipeline/app/config.py`, `pipeline/app/batch.py` and the "
             "settings they build on) by `pipeline schema`; do not edit by hand. Unknown keys are refused, "
             "and nothing is coerced: `32` is an integer, `\"32\"` is not, `true` is no number. The raw "
             "JSON Schemas are beside this file."]
    for name, schema in generated.items():
        defs = schema.get("$defs", {})
        lines += ["", f"## {name} (`{name}.schema.json`)", "", schema.get("description", ""), "",
                  *_table(schema, defs), *_sections(schema, defs, "")]
    return "\n".join(lines) + "\n"


def reference_files() -> dict[str, str]:
    """File name -> content of everything `pipeline schema` writes."""
    generated = schemas()
    files = {f"{name}.schema.json": json.dumps(schema, indent=2) + "\n" for name, schema in generated.items()}
    return {"config.md": reference_markdown(generated), **files}


def write_reference(folder: Path) -> list[Path]:
    make_folder(folder)
    written = []
    for name, text in reference_files().items():
        write_text_atomic(folder / name, text)
        written.append(folder / name)
    return written
