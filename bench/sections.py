"""BENCHMARKS.md is shared by the bench scripts: each owns the text between its two markers."""

from pathlib import Path


def write_section(path: Path, text: str, start: str, end: str) -> None:
    """Replace the section of `path` between `start` and `end` (or append it)."""
    block = f"{start}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in old and end in old:
        before, rest = old.split(start, 1)
        new = before + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n\n" + block
    path.write_text(new)
