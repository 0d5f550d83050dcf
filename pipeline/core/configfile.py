"""Config files: YAML read with the line and column of every key and value, duplicate keys refused,
and validated against a typed model in full before any work, every error one line that names the
file, the place and the key: `run.yaml:7:5: 'features.batch_size' must be a positive integer, got 'many'`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Self, TypeVar

import yaml
from pydantic import PrivateAttr, ValidationError, ValidationInfo

from pipeline.core.errors import ConfigError, first_line
from pipeline.core.schema import Section, explain, key_path, problem

Marks = dict[tuple, tuple[yaml.Mark | None, yaml.Mark]]  # path -> (mark of its key, mark of its value)
M = TypeVar("M", bound="ConfigFile")
logger = logging.getLogger(__name__)


def _at(mark: yaml.Mark | None) -> str:
    return f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""


class ConfigSource:
    """A config's data, the file it names in messages, and where each of its keys and values sits
    there (nowhere for a config made in code, which is then named by `path` alone)."""

    def __init__(self, path: str | os.PathLike, data: Any, marks: Marks | None = None) -> None:
        self.path = Path(path)
        self.data = data
        self.marks = marks or {}

    @classmethod
    def read(cls, path: str | os.PathLike) -> ConfigSource:
        """Parse a YAML file with the safe loader; a key given twice in one mapping is an error (YAML
        libraries silently keep the last)."""
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {getattr(exc, 'strerror', None) or exc}") from None
        try:
            loader = yaml.SafeLoader(text)  # refuses control characters at once
        except yaml.reader.ReaderError as exc:
            line_start = text.rfind("\n", 0, exc.position) + 1
            raise ConfigError(f"{path}:{text.count(chr(10), 0, exc.position) + 1}:{exc.position - line_start + 1}: "
                              f"not valid YAML: character #x{exc.character:04x} is not allowed") from None
        try:
            node = loader.get_single_node()
            marks: Marks = {}
            if node is not None:
                _index(loader, node, (), marks, path, set())
            return cls(path, loader.construct_document(node) if node is not None else None, marks)
        except yaml.MarkedYAMLError as exc:
            raise ConfigError(f"{path}{_at(exc.problem_mark)}: not valid YAML: "
                              f"{exc.problem or first_line(exc)}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {first_line(exc)}") from None
        finally:
            loader.dispose()

    def _mark(self, path: tuple, on_key: bool = False) -> yaml.Mark | None:
        """The mark of the value at `path` (of its key with `on_key`), or of the nearest enclosing value
        the file has; None for a config made in code."""
        for end in range(len(path), -1, -1):
            if path[:end] in self.marks:
                key_mark, value_mark = self.marks[path[:end]]
                return key_mark if on_key and end == len(path) and key_mark else value_mark
        return None

    def where(self, path: tuple = (), on_key: bool = False) -> str:
        """`file:line:column` of the value at `path` (see `_mark`); the file alone without marks."""
        return f"{self.path}{_at(self._mark(path, on_key))}"

    def error(self, path: tuple, message: str, on_key: bool = False) -> ConfigError:
        return ConfigError(f"{self.where(path, on_key)}: {message}")

    def validate(self, model: type[M]) -> M:
        """The data as `model`, or a ConfigError for the refused value that comes first in the file.
        Relative paths the model resolves are taken from the config file's folder."""
        try:
            moved: list[str] = []
            config = model.model_validate(self.data, context={"base": self.path.parent, "file": self.path,
                                                              "moved": moved})
        except ValidationError as exc:
            problems = [explain(model, error, self.data) for error in exc.errors()]
            first = min(problems, key=lambda p: _line_column(self._mark(p.path, p.on_key)))
            raise self.error(first.path, first.message, first.on_key) from None
        config._source = self
        for note in moved:  # only for a config that is used: an error says what to fix first
            logger.warning(note)
        return config



def _line_column(mark: yaml.Mark | None) -> tuple[int, int]:
    return (mark.line, mark.column) if mark is not None else (0, 0)

def _index(loader: yaml.SafeLoader, node: yaml.Node, path: tuple, marks: Marks, file: Path, open_: set) -> None:
    """Record the marks of every key and value under `node`; refuse duplicate keys."""
    if id(node) in open_:  # an alias of a node that contains it
        return
    open_ = open_ | {id(node)}
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, yaml.Mark] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = loader.construct_object(key_node)
            if key in seen:
                raise ConfigError(f"{file}{_at(key_node.start_mark)}: duplicate key '{key_path((*path, key))}' "
                                  f"(first at line {seen[key].line + 1}); YAML would keep only the last")
            seen[key] = key_node.start_mark
            marks[(*path, key)] = (key_node.start_mark, value_node.start_mark)
            _index(loader, value_node, (*path, key), marks, file, open_)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            marks[(*path, i)] = (None, item.start_mark)
            _index(loader, item, (*path, i), marks, file, open_)
    if not path:
        marks[()] = (None, node.start_mark)


class ConfigFile(Section):
    """The root of a config file: it knows its source, so later checks (that need the registry or the
    disk) name the file, line and key too."""

    _source: ConfigSource = PrivateAttr(default_factory=lambda: ConfigSource("config", {}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Self:
        return ConfigSource.read(path).validate(cls)

    @classmethod
    def parse(cls, data: Any, path: str | os.PathLike) -> Self:
        """A config made in code; `path` names it in messages and anchors its relative paths."""
        return ConfigSource(path, data).validate(cls)

    @property
    def path(self) -> Path:
        return self._source.path

    @property
    def raw(self) -> Any:
        """The data as the file gave it (before validation resolved and normalised it)."""
        return self._source.data

    def error(self, path: tuple, message: str) -> ConfigError:
        """A ConfigError for the value at `path`: `file:line:column: message`."""
        return self._source.error(path, message)

    def where(self, path: tuple = ()) -> str:
        return self._source.where(path)


def near_config(value: Path, info: ValidationInfo) -> Path:
    """A relative path taken from the config file's folder, so a config works from any folder."""
    base = (info.context or {}).get("base")
    return value if value.is_absolute() or base is None else base / value


def _exists(path: Path, test: str = "exists") -> bool:
    """`path.exists()` (or `is_dir`, `is_file`), False where the name cannot be looked up at all (too
    long, a folder on the way not readable): a config's name must not crash its validation."""
    try:
        return getattr(path, test)()
    except (OSError, ValueError):
        return False


_MOVED: set[tuple[str, str]] = set()  # (earlier place, place now) pairs already warned about in this process


def from_config_folder(key: str):
    """An after-validator for a path the pipeline writes or keeps (the cache, the output folder, the
    log): a relative one is taken from the config file's folder, as data paths are, so a job started from
    another folder (cron) finds the same places. Earlier versions took these from the folder you run in;
    where that gives another place and something is there, a warning names both, once a process (a
    migration note, for one release). A `str` stays a `str`; a config made without a file (no base)
    keeps its paths as given."""
    def resolve(value: Any, info: ValidationInfo) -> Any:
        context = info.context or {}
        base = context.get("base")
        if value is None or base is None or Path(value).is_absolute():
            return value
        now, before = base / value, Path(os.path.abspath(value))
        if Path(os.path.abspath(now)) != before and _exists(before) and (str(before), str(now)) not in _MOVED:
            _MOVED.add((str(before), str(now)))
            context.get("moved", []).append(
                f"{context.get('file', base)}: '{key}' ({value}) is now taken from the config file's folder ({now}), "
                f"no longer from the folder you run in, where {before} exists: move it, or write its absolute path "
                "in the config to keep using it")
        return str(now) if isinstance(value, str) else now
    return resolve


def existing(what: str, test: str = "exists"):
    """An after-validator refusing a path that is not there: `'data.train': folder not found: PATH`."""
    def check(value: Path) -> Path:
        if not _exists(value, test):
            raise problem(f"{what} not found: {{path}}", path=str(value))
        return value
    return check
