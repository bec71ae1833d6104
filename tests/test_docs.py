"""The documentation's Python examples run as written: every ```python block of docs/*.md
that is a whole program (it calls ``trio.run``) runs in a fresh interpreter, on loopback or
on the fake network, and must exit cleanly printing what its comments say it prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
# "print(x)  # expected": the expected output, one line per print.
EXPECTED = re.compile(r"^\s*print\(.*\)\s+# (.+)$", re.M)


def programs() -> list[tuple[str, str]]:
    found = []
    for page in sorted(DOCS.glob("*.md")):
        for number, code in enumerate(BLOCK.findall(page.read_text()), 1):
            if "trio.run(" in code:
                found.append((f"{page.name}#{number}", code))
    return found


@pytest.mark.parametrize(("where", "code"), programs(), ids=[w for w, _ in programs()])
def test_docs_example_runs(where: str, code: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, f"{where} failed:\n{result.stderr}"
    assert result.stdout.splitlines() == EXPECTED.findall(code), where


def test_docs_have_runnable_examples() -> None:
    assert len(programs()) >= 3
