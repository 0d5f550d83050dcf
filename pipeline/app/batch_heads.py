"""The heads of a batch run, each loaded only when it has images to predict.

Loading a head imports scikit-learn, skops and torch (seconds on an idle machine, more under load) and
checks its features against this installation; an unchanged rerun predicts nothing and needs none of
that. A head file is known by its SHA-256 (read as bytes, no import); `OUTPUT/.heads.json` remembers,
per head file, the SHA-256 of the last version that loaded and passed every check. A head whose file
still has that SHA-256 is loaded later, and only if it has something to predict; any other one (new,
changed, a pickle, no record or an unreadable one) is loaded before the run starts, as before. The
record is a JSON mapping of path to SHA-256, written atomically: it never stands in for the head, it
only says that loading it can wait. Deleting it costs one early load of every head.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.errors import ConfigError, OutputError, PipelineError
from pipeline.core.hashing import file_sha256
from pipeline.core.io import write_json_atomic
from pipeline.core.paths import path_text

if TYPE_CHECKING:
    from pipeline.app.batch import BatchConfig
    from pipeline.heads.bundle import HeadBundle

logger = logging.getLogger(__name__)

CHECKED_HEADS = ".heads.json"


class HeadUnusable(ConfigError):
    """A head file that cannot be loaded or whose features this installation cannot make."""


@dataclass
class Head:
    name: str
    path: Path
    sha256: str  # the head's identity: a refitted or replaced file predicts every image again
    bundle: HeadBundle | None = None  # None until `load_head`
    options: dict = field(default_factory=dict)  # extract() options that remake its training features


def _checked(output_dir: Path) -> dict[str, str]:
    """The record of heads that loaded and passed their checks: absolute path -> SHA-256. Anything but
    a JSON mapping of strings counts as empty (every head is loaded before the run)."""
    try:
        record = json.loads((output_dir / CHECKED_HEADS).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict):
        return {}
    return {path: sha for path, sha in record.items() if isinstance(sha, str)}


def open_heads(config: BatchConfig, trust_pickle: bool = False) -> list[Head]:
    """Every head of `config` with its SHA-256; those the record does not vouch for are loaded now (a
    `HeadUnusable` before anything runs), and the record is updated. Called under the lock, so a run
    that waited for another one applies the head files as they are when it starts."""
    record = _checked(config.output_dir)
    heads = []
    for name, path in config.heads.items():
        try:
            sha = file_sha256(path)
        except OSError as exc:
            raise config.error(("heads",), f"'heads.{name}': cannot read {path}: {exc.strerror or exc}") from None
        head = Head(name, path, sha)
        if record.get(os.path.abspath(path)) != sha:
            load_head(head, config, trust_pickle)
        heads.append(head)
    # A pickle (format 1) is never vouched for: it needs trust_pickle on every run that uses it.
    checked = record | {os.path.abspath(h.path): h.sha256 for h in heads if zipfile.is_zipfile(h.path)}
    if checked != record:
        try:
            write_json_atomic(config.output_dir / CHECKED_HEADS, checked, ensure_ascii=True)
        except OutputError as exc:  # a record that is not written only means loading the heads next time
            logger.warning(f"warning: {path_text(str(exc))}")
    return heads


def load_head(head: Head, config: BatchConfig, trust_pickle: bool = False) -> None:
    """Load `head`'s bundle and the options that remake its features, checked against this installation.
    A format-1 head (a pickle) loads only with `trust_pickle` or the config's `trust_pickle: true`."""
    # Imported here, not above: scikit-learn, skops and torch, which an unchanged rerun never needs.
    from pipeline.heads.bundle import PickleRefused, load_bundle
    from pipeline.heads.predict import feature_options

    where = ("heads", head.name if isinstance(config.raw["heads"], dict) else list(config.heads).index(head.name))
    try:
        head.bundle = load_bundle(head.path, trust_pickle or config.trust_pickle)
        head.options = feature_options(head.bundle, head.path)
    except PickleRefused as exc:
        raise HeadUnusable(str(config.error(where, f"'heads.{head.name}': {exc} (in this config: "
                                                   "trust_pickle: true)"))) from None
    except PipelineError as exc:  # altered, unsafe, or its backbone or weights are not here any more
        raise HeadUnusable(str(exc)) from None
