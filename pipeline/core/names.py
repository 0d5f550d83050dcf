"""Names shared across the layers: the default backbone, and the rule for names that become file names."""

from __future__ import annotations

import re

DEFAULT_BACKBONE = "efficientnet_lite0"

# Head names, saved-backbone ids and the like name files and folders: no separators, no leading dot.
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
SAFE_NAME_RULE = "letters, digits, '_', '-' or '.'"


def is_safe_name(name: object) -> bool:
    return isinstance(name, str) and SAFE_NAME.fullmatch(name) is not None
