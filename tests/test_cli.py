"""The CLI end to end on a tiny model directory, and its one-line errors for bad input."""

import json
import subprocess
import sys

import pytest

from allocator.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "allocator.cli", *args], capture_output=True, text=True, timeout=300)


def test_eval_on_tiny_model_writes_json(tiny_model_dir, text_file, tmp_path, isolated_cache) -> None:
    out = tmp_path / "rows.json"
    args = ["eval", "--model", str(tiny_model_dir), "--corpus", str(text_file), "--quantizer", "gptq", "--bits", "3",
            "--group-size", "64", "--seqlen", "32", "--tokens", "128", "--samples", "4", "--json", str(out), "--no-progress"]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert data["schema_version"] == 1
    reference, quantized = data["rows"]
    assert reference["name"] == "reference" and reference["ppl_ratio"] == 1.0
    assert quantized["name"] == "gptq-w3g64" and 3.0 < quantized["bpw"] < 4.0
    assert quantized["kl"] > 0 and quantized["model_mb"] < reference["model_mb"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "no-such-model"], "unknown model"),
        (["--model", "/nonexistent/model.gguf"], "not found"),
        (["--bits", "0"], "--bits must be between 1 and 8"),
        (["--bits", "9"], "--bits must be between 1 and 8"),
        (["--group-size", "abc"], "not an integer"),
        (["--quantizer", "magic"], "invalid choice"),
        (["--tokens", "-5"], "must be at least 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, isolated_cache) -> None:
    result = run_cli("eval", *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_group_size_not_dividing_width_is_rejected(tiny_model_dir, text_file, tmp_path, isolated_cache) -> None:
    out = tmp_path / "rows.json"
    result = run_cli("eval", "--model", str(tiny_model_dir), "--corpus", str(text_file), "--group-size", "40", "--json", str(out))
    assert result.returncode == 2
    assert "group size 40 does not divide in_features 96" in result.stderr and result.stderr.count("\n") == 1
    assert not out.exists()


def test_missing_json_directory_and_corpus(tiny_model_dir, tmp_path, isolated_cache) -> None:
    result = run_cli("eval", "--model", str(tiny_model_dir), "--json", str(tmp_path / "nope" / "x.json"))
    assert result.returncode == 2 and "does not exist" in result.stderr
    result = run_cli("eval", "--model", str(tiny_model_dir), "--corpus", str(tmp_path / "missing.txt"), "--quantizer", "none")
    assert result.returncode == 2 and "unknown corpus" in result.stderr
