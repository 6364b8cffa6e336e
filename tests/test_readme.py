"""Every Python block of the README runs as shown (the blocks that need a local checkpoint say so
and are skipped)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
NEEDS_CHECKPOINT = ("/path/to/", "./my-checkpoint")


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 4


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index: int, tmp_path: Path):
    block = BLOCKS[index]
    if any(marker in block for marker in NEEDS_CHECKPOINT):
        pytest.skip("the block loads a local checkpoint the reader supplies")
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"README block {index} failed:\n{block}\n{result.stderr}"
