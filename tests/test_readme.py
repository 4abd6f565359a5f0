"""The README's Python examples run as written, and its backend table names every backend."""

import re
from pathlib import Path

import pytest

from invcoss import ops

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)


def test_readme_backend_table_lists_every_backend():
    table = TEXT.split("| backend  | runs on |", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| `(\w+)` +\|", table, flags=re.M)
    assert tuple(rows) == ops.BACKEND_NAMES


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code):
    exec(compile(code, str(README), "exec"), {})
