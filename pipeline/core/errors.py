"""One small error hierarchy: the CLI catches `PipelineError` once and prints its message.

Anything that is not a `PipelineError` is a bug and is allowed to crash with a traceback.
"""


class PipelineError(Exception):
    """Base class for every error a user can cause and fix (bad input, missing files)."""


class ConfigError(PipelineError):
    """A configuration file or command-line option is wrong."""


class BackboneError(PipelineError):
    """A backbone is unknown, or its weights are missing or unusable."""


class CacheError(PipelineError):
    """The feature cache is missing, incomplete or has been tampered with."""


class DataError(PipelineError):
    """An input folder or file list cannot be used."""


class OutputError(PipelineError):
    """A result cannot be written: the disk is full, the folder is read-only or not ours to write.
    The message names the path; what was there before is left as it was."""


def first_line(exc: BaseException) -> str:
    """A foreign exception's message cut to one line, for the one-line errors users see."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
