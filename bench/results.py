"""bench/RESULTS.md: one section per benchmark, delimited by HTML comments, each replaced by
its own benchmark and left alone by the others."""

from __future__ import annotations

import os
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def replace_section(start: str, end: str, text: str, path: Path = RESULTS) -> None:
    """Put `text` (which begins with `start` and ends with `end`) in place of the old section,
    or append it when there is none."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    text = text.rstrip("\n")
    if start in old and end in old:
        head, rest = old.split(start, 1)
        new = head + text + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
