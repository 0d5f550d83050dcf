"""File names as text: the one escaping used wherever a path is written as text.

A file name on Linux is bytes, and not every name is valid UTF-8 (`printf 'bad\\xe9.jpg'`, names copied
from an old Latin-1 system). Python carries such a name as `str` with each undecodable byte turned into
a lone surrogate (`surrogateescape`, PEP 383), so `open()` and `os.stat()` find the file, but writing the
name to a UTF-8 file, a terminal or a JSON log raises `UnicodeEncodeError`. The pipeline carries paths
as these `str` end to end, and turns them into text at the edge with `path_text`:

    the name's UTF-8 text as it is; each byte that is not valid UTF-8 written as `\\xNN` (two lowercase
    hex digits): `bad\\xe9.jpg`

which is `os.fsencode(path).decode("utf-8", "backslashreplace")`. Every name that is valid UTF-8 (all
but a few) is written unchanged, so CSV files, logs, reports and printed lines stay plain UTF-8 that
every reader accepts. `text_path` undoes the escaping, for a person or tool mapping a written name back
to its file; a name that really contains a backslash followed by `x` and two hex digits reads back as
the byte (the one ambiguity of the rule). Records that the pipeline itself maps back to files (batch's
`skipped.json`) keep the exact name instead: JSON's own `\\udcNN` escapes, which `json.loads` returns as
the same surrogates.
"""

from __future__ import annotations

import codecs
import os
import re
from typing import IO

# The escaping as a codec error handler: `text.encode("utf-8", ESCAPE_ERRORS)` writes each byte that
# Python carried as a surrogate as \xNN, and the CLI sets it on stdout and stderr so that no printed
# line, error message included, can fail on a file name.
ESCAPE_ERRORS = "pipeline-path"
_BYTE = re.compile(rb"\\x([0-9a-f]{2})")


def _escape(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    out = []
    for char in exc.object[exc.start:exc.end]:
        code = ord(char)
        # U+DC80..U+DCFF: the byte 0x80..0xFF of a name (surrogateescape); anything else the stream's
        # encoding lacks (a non-UTF-8 terminal) as Python's own \uNNNN escape
        out.append(f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF
                   else char.encode("ascii", "backslashreplace").decode("ascii"))
    return "".join(out), exc.end


codecs.register_error(ESCAPE_ERRORS, _escape)


def path_text(value: str | bytes | os.PathLike) -> str:
    """A path (or any text that may carry file-name bytes, such as a message naming a path) as valid
    UTF-8 text: unchanged when it is valid UTF-8, each undecodable byte written as `\\xNN`."""
    raw = value if isinstance(value, str | bytes) else os.fspath(value)
    if isinstance(raw, bytes):
        return raw.decode("utf-8", "backslashreplace")
    return raw.encode("utf-8", ESCAPE_ERRORS).decode("utf-8")


def text_path(text: str) -> str:
    """The path that `path_text` wrote as `text`, as Python carries it (`surrogateescape`)."""
    return os.fsdecode(_BYTE.sub(lambda m: bytes([int(m[1], 16)]), text.encode("utf-8", "surrogateescape")))


def escape_stream(stream: IO[str]) -> str | None:
    """Make a text stream write file-name bytes as `\\xNN` instead of failing; returns its previous
    error handler to restore (None: not a stream that can be reconfigured)."""
    reconfigure = getattr(stream, "reconfigure", None)
    previous = getattr(stream, "errors", None)
    if reconfigure is None or previous is None:
        return None
    try:
        reconfigure(errors=ESCAPE_ERRORS)
    except (ValueError, OSError):  # closed
        return None
    return previous
