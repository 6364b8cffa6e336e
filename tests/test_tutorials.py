"""Every tutorial runs, as a script, within its time budget.

The tutorials in ``tutorials/`` are jupytext percent-format scripts; the documentation build
executes them as notebooks, and this test executes them as plain scripts (headless matplotlib), so a
tutorial broken by a change in the library fails the test suite, not only the docs build.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("[0-9][0-9]_*.py"))
# The budget is two minutes on two cores; the margin absorbs a loaded CI machine.
TIMEOUT_S = 240


def test_tutorials_exist():
    assert len(TUTORIALS) >= 5, [path.name for path in TUTORIALS]


@pytest.mark.slow
@pytest.mark.parametrize("path", TUTORIALS, ids=[path.stem for path in TUTORIALS])
def test_tutorial_runs(path: Path, tmp_path: Path):
    env = {
        **os.environ,
        "MPLBACKEND": "Agg",
        # pytest -n 2 runs two of these at once on two cores: one thread each, because torch's
        # thread pool slows small batched kernels by an order of magnitude when oversubscribed.
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
    }
    try:
        result = subprocess.run(
            [sys.executable, str(path)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{path.name} did not finish within {TIMEOUT_S} s:\n{error.stdout or ''}")
    assert result.returncode == 0, f"{path.name} failed:\n{result.stdout}\n{result.stderr}"
