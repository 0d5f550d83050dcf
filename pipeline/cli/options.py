"""Command-line options taken from the typed settings: their defaults and descriptions are written once,
on the models (`pipeline.features.settings`, `pipeline.app.config`), and only shown here."""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import BaseModel


def default(model: type[BaseModel], name: str) -> Any:
    return model.model_fields[name].get_default(call_default_factory=True)


def described(model: type[BaseModel], name: str) -> str:
    """The key's description, and its default where that is a value (a None or False default is
    explained by the description, or means the option is off)."""
    value = default(model, name)
    text = (model.model_fields[name].description or "").replace("%", "%%")  # argparse formats help with %
    if value is None or isinstance(value, bool):
        return text
    return f"{text} (default: {joined(value) if isinstance(value, list) else value})"


def joined(values: list) -> str:
    """A list default as the comma-separated option value that means it."""
    return ",".join(map(str, values))


def add_setting(parser: argparse.ArgumentParser, model: type[BaseModel], name: str, *flags: str,
                override: bool = False, **kwargs: Any) -> None:
    """`--NAME` for the model's key `name`, defaulting to the model's default; with `override` the
    option's default is None, so that only a value given on the command line replaces a config's."""
    flags = flags or (f"--{name.replace('_', '-')}",)
    parser.add_argument(*flags, default=None if override else default(model, name), help=described(model, name),
                        **kwargs)
