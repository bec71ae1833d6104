"""The documentation's Python examples run as written: every ```python block of docs/*.md
that is a whole program (it calls ``trio.run``) runs in a fresh interpreter, on loopback or
on the fake network, and must exit cleanly printing what its comments say it prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
# "print(x)  # expected": the expected output, one line per print.
TEST_BLOCK = re.compile(r"```python test\n(.*?)```", re.S)
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


def docs_test_files() -> list[tuple[str, str]]:
    """```python test blocks: whole pytest files a user would write."""
    found = []
    for page in sorted(DOCS.glob("*.md")):
        for number, code in enumerate(TEST_BLOCK.findall(page.read_text()), 1):
            found.append((f"{page.name}#test{number}", code))
    return found


@pytest.mark.parametrize(
    ("where", "code"), docs_test_files(), ids=[w for w, _ in docs_test_files()]
)
def test_docs_test_example_passes_with_the_plugin(
    where: str, code: str, pytester: pytest.Pytester
) -> None:
    # Only what the docs say: the installed plugin, pytest-trio in trio mode, the file.
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(test_user=code)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=len(re.findall(r"^async def test_", code, re.M)))


def test_docs_have_user_test_examples() -> None:
    assert len(docs_test_files()) >= 2
