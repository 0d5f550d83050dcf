"""Typed contracts for configs: the strict pydantic base of every config section, the `option` that
gives a key its description and what it accepts, and one-line messages for what pydantic refuses.

A key's `accepts` text is the one place that says what a value must be: it ends the error message
("'features.batch_size' must be a positive integer, got 'many'") and fills the reference's type
column; its `about` text is its description in the reference and in the CLI's help.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError, PydanticUndefined

from pipeline.core.names import SAFE_NAME, SAFE_NAME_RULE

_EXPONENT = re.compile(r"[+-]?\d+e[+-]?\d+")  # 1e-3: YAML 1.1 takes it for a string, not a float

# The error type of a value that is well-typed but unusable (a folder that is not there): its message
# follows the key as it stands, instead of "must be ...".
PROBLEM = "pipeline_problem"


class Section(BaseModel):
    """A config section: unknown keys are refused and nothing is coerced (a bool is not taken for a
    number, nor "32" for an integer)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # How an unknown key of this section is reported; {key} is its dotted name, {expected} the keys there are.
    unknown_key: ClassVar[str] = "unknown key '{key}'{hint}; expected one of: {expected}"


def option(default: Any = PydanticUndefined, *, accepts: str, about: str, **kwargs: Any) -> Any:
    """A config key: `accepts` completes "must be ..." in messages and is its type in the reference;
    `about` is its description. No default (or `...`) makes the key required."""
    if default is not PydanticUndefined and default is not Ellipsis:
        kwargs["default"] = default
    return Field(description=about, json_schema_extra={"accepts": accepts}, **kwargs)


def accepts(field: FieldInfo) -> str | None:
    extra = field.json_schema_extra
    return extra.get("accepts") if isinstance(extra, dict) else None  # type: ignore[return-value]


def one_of(values: tuple[str, ...] | list[str]) -> str:
    """'a, b or c'"""
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


def dataclass_default(cls: type, name: str) -> Any:
    """The default of a dataclass field (made afresh when it has a factory): how a config section takes
    its defaults from the options dataclass of the layer that uses them."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field.default_factory() if field.default is dataclasses.MISSING else field.default  # type: ignore[misc]


def problem(message: str, **context: Any) -> PydanticCustomError:
    """An error whose message is said after the key: "'data.train': folder not found: ..."."""
    return PydanticCustomError(PROBLEM, message, context)


def key_path(path: tuple | list) -> str:
    """('heads', 0, 'C') -> heads[0].C"""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


@dataclass
class Problem:
    """One refused value: where it is in the data (for its line and column) and the message."""

    path: tuple
    on_key: bool  # the key itself is wrong (unknown), not its value
    message: str


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The models a value of this annotation may be (through Optional, unions, lists, dicts, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = get_origin(annotation)
    if origin is Literal:
        return []
    if origin is Annotated:
        return _models_in(get_args(annotation)[0])
    return [m for arg in get_args(annotation) for m in _models_in(arg)] if origin in (
        Union, types.UnionType, list, dict, tuple) else []


def _tag(model: type[BaseModel], value: Any) -> bool:
    """Whether `value` is the tag of `model` in a discriminated union (its one-value Literal field)."""
    return any(get_origin(f.annotation) is Literal and get_args(f.annotation) == (value,)
               for f in model.model_fields.values())


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def explain(model: type[BaseModel], error: ErrorDetails, data: Any) -> Problem:
    """A pydantic error as one line that names the key, what it accepts and what it got.

    The error's location is walked through the data: the keys and indices found there make the dotted
    name, the others are the tags pydantic adds for union members (a head's type). The message is the
    nearest field's, and speaks of its whole value (a list, not its third item)."""
    loc, kind = error["loc"], error["type"]
    path: list = []
    value = data
    models = [model]
    owners = models  # the models of the mapping the last key was found in
    field: FieldInfo | None = None
    field_path: list = []
    field_value: Any = data
    for item in loc:
        if isinstance(value, dict) and item in value:
            owners = models
            owner = next((m for m in models if item in m.model_fields), None)
            path.append(item)
            value = value[item]
            if owner is not None:
                field, field_path, field_value = owner.model_fields[item], list(path), value
                models = _models_in(field.annotation)
        elif isinstance(value, list) and isinstance(item, int) and 0 <= item < len(value):
            path.append(item)
            value = value[item]
        else:
            tagged = [m for m in models if _tag(m, item)]
            if tagged:
                models = tagged
            else:
                owners = models
    key = key_path(path)
    if kind == "extra_forbidden":
        owner = owners[0]
        fields = list(owner.model_fields)
        close = difflib.get_close_matches(str(path[-1]), fields, n=1)
        return Problem(tuple(path), True, owner.unknown_key.format(
            key=key, hint=f" (did you mean {close[0]}?)" if close else "", expected=", ".join(fields)))
    if kind == "missing":
        owner = next(m for m in owners if loc[-1] in m.model_fields)
        text = accepts(owner.model_fields[loc[-1]])
        return Problem(tuple(path), False,
                       f"'{key_path([*path, loc[-1]])}' is required" + (f": {text}" if text else ""))
    if kind in ("union_tag_not_found", "union_tag_invalid") and isinstance(value, dict):
        discriminator = error.get("ctx", {}).get("discriminator", "'type'").strip("'")
        tags = one_of([str(get_args(m.model_fields[discriminator].annotation)[0]) for m in models])
        if kind == "union_tag_not_found":
            return Problem(tuple(path), False, f"'{key}.{discriminator}' is required: {tags}")
        return Problem((*path, discriminator), False,
                       f"'{key}.{discriminator}': unknown {discriminator} {value.get(discriminator)!r}; "
                       f"expected {tags}")
    if kind == PROBLEM:
        return Problem(tuple(path), False, f"'{key}': {error['msg']}")
    if field is None:
        return Problem((), False, f"expected a mapping with keys {', '.join(model.model_fields)}")
    expected = accepts(field) or error["msg"]
    hint = ""
    if isinstance(field_value, str) and _EXPONENT.fullmatch(field_value) and "number" in expected:
        hint = f" (YAML reads {field_value} as text: write {field_value.replace('e', '.0e', 1)})"
    return Problem(tuple(path), False, f"'{key_path(field_path)}' must be {expected}, got {_short(field_value)}{hint}")


# Numbers a config accepts are finite: YAML reads .inf and .nan as floats, which a bare `float` takes
# (and a NaN or infinite C passes every range check, then breaks the fit or the metrics it writes).
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
PositiveFinite = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFinite = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]  # in [0, 1)
Level = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]  # in (0, 1]: a test's level

# A name that becomes a file or folder name.
SafeName = Annotated[str, Field(pattern=f"^(?:{SAFE_NAME.pattern})$", description=SAFE_NAME_RULE)]
