"""docs/benchmarks.md has one section per benchmark script; each script rewrites only its own."""

from __future__ import annotations

import re
from pathlib import Path


def replace_section(path: Path, name: str, markdown: str) -> None:
    """Put `markdown` between this section's markers (appending the section the first time)."""
    start, end = f"<!-- section:{name} -->", f"<!-- /section:{name} -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def marked_sections(path: Path) -> list[str]:
    """Every marked section of the file, markers included, so a script rewriting the rest of it keeps them."""
    if not path.exists():
        return []
    pattern = re.compile(r"<!-- section:([\w-]+) -->.*?<!-- /section:\1 -->", re.DOTALL)
    return [match.group(0) for match in pattern.finditer(path.read_text())]
