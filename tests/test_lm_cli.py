"""`pyro-mpt score`: a local checkpoint and a text file to JSONL; resumable; the same bytes from
two `accelerate launch` processes as from one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers", reason="needs the extra 'pyro_mpt[lm]'")
pytest.importorskip("tokenizers", reason="needs the extra 'pyro_mpt[lm]'")

from lm_models import (  # noqa: E402
    CORPUS,
    SENTENCES,
    gpt2_tokenizer,
    save_diffusion_checkpoint,
    tiny_bert,
    word_tokenizer,
)

from pyro_mpt.cli import main  # noqa: E402
from pyro_mpt.lm import MaskedPredictor, StratifiedBins, score_texts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Longer texts (sampled, not enumerated) and short ones (enumerated), 14 in all.
TEXTS = SENTENCES + [" ".join(CORPUS[i : i + 3]) for i in range(0, 24, 3)] + CORPUS[:2]
OPTIONS = ["--target-stderr", "0.3", "--curve", "--max-strata", "4", "--seed", "3",
           "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("score")
    tokenizer = word_tokenizer()
    model = tiny_bert(tokenizer)
    model.save_pretrained(folder / "bert")
    tokenizer.save_pretrained(folder / "bert")
    (folder / "texts.txt").write_text("\n".join(TEXTS[:7]) + "\n\n" + "\n".join(TEXTS[7:]) + "\n")
    records = [{"text": TEXTS[0]}, {"prompt": "the quick brown", "continuation": " fox jumps"},
               {"continuation": "a dog ran"}]  # fmt: skip
    (folder / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def run_score(files: Path, out: Path, *extra: str, texts: str = "texts.txt") -> int:
    return main(["score", str(files / "bert"), str(files / texts), "--out", str(out), *extra])


def environment() -> dict:
    """Subprocesses import this checkout's pyro_mpt, one thread each."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


def test_score_writes_what_score_texts_returns(files, tmp_path, capsys):
    out = tmp_path / "scores.jsonl"
    assert run_score(files, out, *OPTIONS) == 0
    assert "scored 14 texts (0 already in" in capsys.readouterr().out
    lines = out.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["index"] for r in records] == list(range(len(TEXTS)))  # blank line skipped
    predictor = MaskedPredictor.from_pretrained(files / "bert")
    expected = score_texts(predictor, TEXTS, masks=StratifiedBins(max_strata=4), curve=True,
                           target_stderr=0.3, seed=3)  # fmt: skip
    assert records == [score.to_dict() for score in expected]
    for record in records:
        assert set(record) >= {"index", "tokens", "pll", "log_prob", "stderr", "dof", "masks",
                               "forward_rows", "target_met", "curve"}  # fmt: skip
        assert record["target_met"] and record["stderr"] <= 0.3


def test_an_interrupted_run_resumes_to_the_same_file(files, tmp_path):
    reference = tmp_path / "reference.jsonl"
    assert run_score(files, reference, *OPTIONS) == 0
    lines = reference.read_text().splitlines(keepends=True)
    # Killed while writing the fourth line.
    out = tmp_path / "resumed.jsonl"
    out.write_text("".join(lines[:3]) + lines[3][:25])
    assert run_score(files, out, *OPTIONS) == 0
    assert out.read_bytes() == reference.read_bytes()
    # Lines missing in the middle are scored and put back in order.
    out.write_text("".join(lines[:2] + lines[5:9] + lines[11:]))
    assert run_score(files, out, *OPTIONS) == 0
    assert out.read_bytes() == reference.read_bytes()
    # Nothing left to do: nothing changes.
    assert run_score(files, out, *OPTIONS) == 0
    assert out.read_bytes() == reference.read_bytes()


def test_jsonl_prompts_and_continuations(files, tmp_path):
    out = tmp_path / "scores.jsonl"
    assert run_score(files, out, "--no-progress", "--no-pll", texts="texts.jsonl") == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["tokens"] for r in records] == [6, 2, 3]
    assert "prompt_tokens" not in records[0] and records[1]["prompt_tokens"] == 3
    assert all(r["pll"] is None for r in records)
    predictor = MaskedPredictor.from_pretrained(files / "bert")
    [pair] = score_texts(predictor, [("the quick brown", " fox jumps")], indices=[1], pll=False)
    assert records[1] == pair.to_dict()


def test_a_diffusion_lm_with_its_own_code_and_gpt2_tokenizer(files, tmp_path, capsys):
    tokenizer = gpt2_tokenizer(tmp_path / "gpt2")
    model = save_diffusion_checkpoint(tmp_path, tokenizer)
    checkpoint = tmp_path / "checkpoint"
    assert (checkpoint / "modeling_tiny_diffusion.py").is_file()
    mask_id = str(len(tokenizer))  # appended to the vocabulary
    out = tmp_path / "scores.jsonl"
    assert main(["score", str(checkpoint), str(files / "texts.txt"), "--out", str(out),
                 "--trust-remote-code", "--mask-token-id", mask_id, "--no-progress"]) == 0
    in_memory = MaskedPredictor(model, tokenizer, mask_token_id=len(tokenizer))
    expected = [score.to_dict() for score in score_texts(in_memory, TEXTS)]
    assert [json.loads(line) for line in out.read_text().splitlines()] == expected
    # Without the mask id: its tokenizer has no mask token, and that is said.
    code = main(["score", str(checkpoint), str(files / "texts.txt"), "--out", str(out),
                 "--trust-remote-code", "--no-progress"])  # fmt: skip
    assert code == 1
    assert "its tokenizer has no mask token: pass mask_token_id" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ('{"text": "a cat"}\n{"txt": "oops"}\n', "texts.jsonl:2: a record needs a string 'text'"),
    ('{"text": "a cat"}\nnot json\n', "texts.jsonl:2: not a JSON line"),
    ('{"text": "a cat"}\n{"text": "[SEP] [MASK]"}\n', "texts[1] has no tokens to score"),
])  # fmt: skip
def test_bad_texts_stop_before_scoring_and_name_the_record(files, tmp_path, capsys, content,
                                                           message):  # fmt: skip
    (tmp_path / "texts.jsonl").write_text(content)
    out = tmp_path / "scores.jsonl"
    code = main(["score", str(files / "bert"), str(tmp_path / "texts.jsonl"), "--out", str(out),
                 "--no-progress"])  # fmt: skip
    assert code == 1
    error = capsys.readouterr().err
    assert error.startswith("pyro-mpt score: error:") and message in error
    assert not out.exists()


def test_an_output_of_another_input_is_refused(files, tmp_path, capsys):
    out = tmp_path / "scores.jsonl"
    out.write_text('{"index": 99, "tokens": 3}\n')
    assert run_score(files, out, "--no-progress") == 1
    assert "has index 99 but the input has 14 texts" in capsys.readouterr().err


@pytest.fixture
def bad_paths(files, tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "a-file").write_text("x")
    return {"model": str(files / "bert"), "texts": str(files / "texts.txt"),
            "folder": str(tmp_path / "folder"), "file": str(tmp_path / "a-file")}  # fmt: skip


BAD = [
    (["{folder}", "{texts}", "--out", "o.jsonl"], "model"),
    (["{model}", "{folder}", "--out", "o.jsonl"], "texts"),
    (["{model}", "{texts}", "--out", "{folder}"], "--out"),
    (["{model}", "{texts}", "--out", "{file}/o.jsonl"], "--out"),
    (["{model}", "{texts}", "--out", "o.jsonl", "--num-masks", "0"], "--num-masks"),
    (["{model}", "{texts}", "--out", "o.jsonl", "--target-stderr", "-1"], "--target-stderr"),
    (["{model}", "{texts}", "--out", "o.jsonl", "--target-stderr", "nan"], "--target-stderr"),
    (["{model}", "{texts}", "--out", "o.jsonl", "--target-stderr", "0.1", "--num-masks", "1"],
     "--num-masks"),
    (["{model}", "{texts}", "--out", "o.jsonl", "--token-budget", "0"], "--token-budget"),
    (["{model}", "{texts}", "--out", "o.jsonl", "--max-masks", "x"], "--max-masks"),
    (["{model}", "{texts}", "--out", "o.jsonl", "--mask-token-id", "-4"], "--mask-token-id"),
    (["{model}", "{texts}", "--out", "o.jsonl", "--masks", "uniform"], "--masks"),
    (["{model}", "{texts}", "--out", "o.jsonl", "--curve", "--masks", "cumulative"], "--curve"),
    (["{model}", "{texts}", "--out", "o.jsonl", "--seed", "-1"], "--seed"),
    (["{model}", "{texts}", "--out", "o.jsonl", "--exhaustive-up-to", "-1"],
     "--exhaustive-up-to"),
    (["{model}", "{texts}"], "--out"),
    (["{model}", "{texts}", "--out", "o.jsonl", "--device", "gpu0"], "--device"),
]  # fmt: skip


@pytest.mark.parametrize("argv, option", BAD, ids=[" ".join(a[2:]) or a[0] for a, _ in BAD])
def test_bad_options_are_usage_errors_naming_the_option(argv, option, bad_paths, capsys,
                                                        monkeypatch):  # fmt: skip
    ran = []
    monkeypatch.setattr(MaskedPredictor, "from_pretrained", lambda *a, **k: ran.append(a))
    with pytest.raises(SystemExit) as exit_info:
        main(["score", *[arg.format(**bad_paths) for arg in argv]])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("usage: pyro-mpt score")
    assert f"argument {option}" in error or f"arguments are required: {option}" in error
    assert not ran


def test_every_option_has_help_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--target-stderr", "--token-budget", "--max-masks", "--curve", "--seed",
                   "--trust-remote-code", "--mask-token-id", "--chunk-size"):  # fmt: skip
        assert option in text
    assert "--token-budget TOKEN_BUDGET most tokens (rows x length) per forward pass (default: " \
           "8192)" in text  # fmt: skip
    # No "(default: None)": --out is required, and the other None defaults say what they mean.
    assert "(default: None)" not in text
    assert "--out OUT JSONL output file (appended to, resumed) --format" in text


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_accelerate_processes_write_the_bytes_of_one(files, tmp_path):
    """``accelerate launch --cpu --num_processes 2`` starts one process (accelerate's multi-CPU
    launch needs an MPI hostfile); ``--multi_gpu`` starts two torchrun-style processes, which
    pyro_mpt runs on the CPU (gloo) on a machine without CUDA. The report names the count."""
    pytest.importorskip("accelerate", reason="needs the extra 'pyro_mpt[lm]'")
    arguments = ["score", str(files / "bert"), str(files / "texts.txt"), *OPTIONS,
                 "--chunk-size", "2"]  # fmt: skip
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    single = subprocess.run([sys.executable, "-m", "pyro_mpt.cli", *arguments, "--out", str(one)],
                            env=environment(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
              "-m", "pyro_mpt.cli"]  # fmt: skip
    double = subprocess.run([*launch, *arguments, "--out", str(two)],
                            env={**environment(), "ACCELERATE_USE_CPU": "true"},
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert double.returncode == 0, double.stderr
    assert double.stdout.count("scored 14 texts on 2 processes") == 1  # the main one reports
    assert two.read_bytes() == one.read_bytes()
    assert len(one.read_text().splitlines()) == len(TEXTS)
