"""Every Python block marked ``<!-- runnable ... -->`` in README.md and docs/*.md runs as written.

A marked block runs from the repository root on the embedded default model (blocks keep their lengths
small). Blocks that need a server, a cluster or a released checkpoint stay unmarked.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!-- runnable\b.*-->\s*$")


def runnable_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number, code) of each python block right after a runnable marker (blank lines between allowed)."""
    lines = path.read_text().splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if not MARKER.match(line):
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j >= len(lines) or lines[j].strip() != "```python":
            raise AssertionError(f"{path.name}:{i + 1}: a runnable marker must precede a ```python block")
        end = lines.index("```", j + 1)
        blocks.append((j + 1, "\n".join(lines[j + 1 : end])))
    return blocks


BLOCKS = [(path, line, code) for path in DOCS for line, code in runnable_blocks(path)]


def test_readme_marks_its_python_api_examples():
    assert sum(1 for path, _, _ in BLOCKS if path.name == "README.md") >= 2


@pytest.mark.parametrize("path, line, code", BLOCKS, ids=[f"{p.name}:{n}" for p, n, _ in BLOCKS])
def test_runnable_block(path, line, code, monkeypatch):
    monkeypatch.chdir(ROOT)  # blocks open files such as examples/needle_1k.txt
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f"{path.name}:{line}", "exec"), {"__name__": "__docs__"})
    if "# 61 204" in code:  # the README's first result, as its comment states
        assert printed.getvalue().splitlines()[0] == "61 204"
