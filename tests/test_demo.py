import json

import pytest
import torch
from sklearn.decomposition import PCA

from pyro_mpt.cli import main
from pyro_mpt.datasets import load_digits


@pytest.mark.slow
def test_demo_reaches_the_closed_form_optimum(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--no-progress"]) == 0
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert (tmp_path / "demo" / "curves.png").stat().st_size > 10_000

    x = load_digits(torch.float64).numpy()
    optimum = PCA(10).fit(x).score(x)
    assert results["closed_form_optimum_per_datum"] == pytest.approx(optimum, rel=1e-9)
    final = {row["objective"]: row["final_exact_lml_per_datum"] for row in results["objectives"]}
    # Exact-LML and cumulative-MPT training both reach within 1% of the optimum (never above it).
    for name in ("exact LML", "cumulative MPT"):
        assert optimum - 0.01 * abs(optimum) < final[name] <= optimum + 1e-3
    # Fixed-rate training is reported whatever its gap; it cannot beat the optimum either.
    assert final["fixed-rate MPT (15%)"] <= optimum + 1e-3
    printed = capsys.readouterr().out
    assert "fixed-rate MPT (15%)" in printed and "closed-form optimum" in printed


def test_demo_rejects_bad_arguments(tmp_path):
    # Usage errors (exit status 2) naming the option: more cases in tests/test_cli.py.
    for argv in (["--dtype", "float16"], ["--out", str(tmp_path), "--steps", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["demo", *argv, "--no-progress"])
        assert exit_info.value.code == 2
