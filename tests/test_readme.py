"""Every Python block of the README runs as written; its two first commands are the ones CI runs."""

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(code, tmp_path):
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_readme_opens_with_main_and_test_commands():
    text = README.read_text()
    assert text.index("<!-- main-command -->") < text.index("<!-- test-command -->") < text.index("## ")
    assert "pytest" in text.split("<!-- test-command -->")[1].split("```")[1]
