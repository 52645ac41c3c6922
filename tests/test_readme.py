"""Every ```python block of the README runs as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    import torch

    torch._dynamo.reset()
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {"__name__": "readme"})


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "scripts/test" in text and "scripts/bench" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "scripts/test" in ci, ".ci/run must call the README's test command"
