"""`pyro-mpt`: bad options are usage errors naming the option; every option shows its default."""

from __future__ import annotations

import subprocess
import sys

import pytest

import pyro_mpt.cli
import pyro_mpt.demo
from pyro_mpt.cli import main


@pytest.fixture
def paths(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "demo").write_text("the demo's own folder is a file here")
    (tmp_path / "folder" / "training").write_text("so is this experiment's")
    return {"file": str(a_file), "under file": str(a_file / "sub"),
            "folder": str(tmp_path / "folder")}


BAD = [
    (["demo", "--steps", "0"], "--steps"),
    (["demo", "--steps", "-3"], "--steps"),
    (["demo", "--steps", "1.5"], "--steps"),
    (["demo", "--lr", "-1"], "--lr"),
    (["demo", "--lr", "0"], "--lr"),
    (["demo", "--lr", "nan"], "--lr"),
    (["demo", "--lr", "inf"], "--lr"),
    (["demo", "--seed", "-1"], "--seed"),
    (["demo", "--out", "{file}"], "--out"),
    (["demo", "--out", "{under file}"], "--out"),
    (["demo", "--out", "{folder}"], "--out"),  # OUT/demo is a file
    (["reproduce", "binary", "--out", "{file}"], "--out"),
    (["reproduce", "training", "--out", "{folder}"], "--out"),  # OUT/training is a file
    (["reproduce", "binary", "--seed", "-1"], "--seed"),
    (["reproduce", "E1"], "name"),
    (["reproduce", "binary", "--seed", "1.5"], "--seed"),
    (["demo", "--dtype", "float16"], "--dtype"),
]


@pytest.mark.parametrize("argv, option", BAD, ids=[" ".join(argv) for argv, _ in BAD])
def test_bad_options_are_usage_errors_naming_the_option(argv, option, paths, capsys, monkeypatch):
    # Nothing may run, and nothing will if the check regresses: the demo and the experiments'
    # modules are stand-ins that record the call.
    ran = []
    monkeypatch.setattr(pyro_mpt.demo, "run_demo", lambda *a, **k: ran.append(a))
    monkeypatch.setattr(pyro_mpt.cli.importlib, "import_module", lambda name: ran.append(name))
    with pytest.raises(SystemExit) as exit_info:
        main([arg.format(**paths) for arg in argv])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("usage: pyro-mpt") and f"argument {option}:" in error
    assert not ran


def test_the_console_command_exits_with_status_2():
    command = [sys.executable, "-m", "pyro_mpt", "demo", "--steps", "0"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 2
    assert "argument --steps: expected a positive integer, got '0'" in finished.stderr
    assert "Traceback" not in finished.stderr


def test_good_options_reach_the_demo(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(pyro_mpt.demo, "run_demo", lambda *a, **k: calls.append((a, k)) or {})
    monkeypatch.setattr(pyro_mpt.demo, "format_table", lambda results: "table")
    assert main(["demo", "--out", str(tmp_path), "--steps", "3", "--lr", "1e-3",
                 "--seed", "7", "--no-progress"]) == 0
    (out,), options = calls[0]
    assert out == tmp_path
    assert (options["steps"], options["lr"], options["seed"]) == (3, 1e-3, 7)
    assert options["progress"] is False


@pytest.mark.parametrize("command, options, example", [
    (["demo"], ["--out", "--steps", "--lr", "--seed", "--dtype", "--no-progress"],
     "--steps STEPS optimiser steps per objective (default: 1500)"),
    (["reproduce"], ["--out", "--full", "--seed"], "(default: pyro-mpt-out)"),
])
def test_every_option_has_help_with_its_default(command, options, example, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for option in options:
        assert option in text
    # ArgumentDefaultsHelpFormatter appends the default to every option that has a help string.
    assert text.count("(default: ") == len(options)
    assert example in text


def test_reproduce_help_lists_every_experiment_with_its_description(capsys):
    from pyro_mpt.experiments import EXPERIMENTS

    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", "--help"])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    listed = [line.split() for line in lines[lines.index("experiments:") + 1 :]]
    assert [words[0] for words in listed] == [*EXPERIMENTS, "all"]
    for words, (_, description) in zip(listed, EXPERIMENTS.values(), strict=False):
        assert " ".join(words[1:]) == " ".join(description.split())
    # The paper's order, E1 to E6, in the list and in the choices, then what goes beyond it.
    assert [description[:2] for _, description in EXPERIMENTS.values()][:6] == [
        f"E{i}" for i in range(1, 7)
    ]
    assert "{convergence,area,training,mlm,binary,selection,evidence,all}" in "".join(lines)


def test_version_is_the_installed_distributions():
    from importlib.metadata import version

    import pyro_mpt

    assert pyro_mpt.__version__ == version("pyro_mpt")
    result = subprocess.run([sys.executable, "-m", "pyro_mpt.cli", "--version"],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"pyro-mpt {pyro_mpt.__version__}"
