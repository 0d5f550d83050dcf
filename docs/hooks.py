"""MkDocs hook: the site's home page is the README itself, with its repository links made site links,
so the two can never drift apart."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
# README link target -> the same page on the site
_LINKS = [(re.compile(r"\]\(docs/"), "]("), (re.compile(r"\]\(benchmarks/RESULTS\.md"), "](benchmarks.md"),
          (re.compile(r"\]\(CHANGELOG\.md"), "](changelog.md")]


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != "index.md":
        return markdown
    text = README.read_text()
    for pattern, replacement in _LINKS:
        text = pattern.sub(replacement, text)
    return text
