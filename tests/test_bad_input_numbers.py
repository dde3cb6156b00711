"""Numbers that used to be tracebacks, hangs or silent acceptances: one line and exit 2 before the
work (or, for a budget past the widest allocation, one warning), and nothing left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli_helpers import assert_one_line_error, run

CALIBRATION = ["--samples", "2", "--seqlen", "32"]


@pytest.fixture
def table(tiny_model_dir, text_file, tmp_path, isolated_cache, capsys) -> Path:
    out = tmp_path / "table.npz"
    code, _, _ = run(capsys, "profile", "--model", str(tiny_model_dir), "--corpus", str(text_file), *CALIBRATION,
                     "--options", "xnor:group_size=32", "gptq2", "gptq3", "--out", str(out), "--no-progress")
    assert code == 0
    return out


@pytest.mark.parametrize("solver", ["ilp", "convex", "baq", "dp", "greedy"])
@pytest.mark.parametrize("bpw", ["inf", "1e308", "nan", "1001"])
def test_solve_budget_that_is_not_a_number_of_bits(table, capsys, solver: str, bpw: str) -> None:
    code, out, err = run(capsys, "solve", "--profile", str(table), "--bpw", bpw, "--solver", solver)
    assert_one_line_error(code, err, "a bpw budget must be a number in (0, 1000]")


def test_solve_byte_budget_past_any_model(table, capsys) -> None:
    code, _, err = run(capsys, "solve", "--profile", str(table), "--bytes", str(10**35))
    assert_one_line_error(code, err, "a byte budget must be in")


def test_budget_past_the_widest_allocation_says_so(table, capsys, caplog) -> None:
    code, out, _ = run(capsys, "solve", "--profile", str(table), "--bpw", "100")
    assert code == 0 and '"modules"' in out
    warned = [r.getMessage() for r in caplog.records if "exceeds the widest allocation" in r.getMessage()]
    assert len(warned) == 1 and "bpw" in warned[0] and "bytes" in warned[0]


@pytest.mark.parametrize(("start", "stop", "step"), [("2", "3", "nan"), ("2", "inf", "0.5"), ("nan", "3", "0.5"), ("2", "3", "1e-9")])
def test_pareto_ranges_that_are_not_sweeps(table, tmp_path, capsys, start: str, stop: str, step: str) -> None:
    out = tmp_path / "sweep"
    code, _, err = run(capsys, "pareto", "--profile", str(table), "--no-measure", "--from", start, "--to", stop, "--step", step,
                       "--out", str(out))
    assert_one_line_error(code, err, "bad sweep")
    assert not out.exists()


@pytest.mark.parametrize("bpw_range", [("1", "inf"), ("nan", "3"), ("3", "2"), ("0", "2")])
def test_train_range_is_refused_before_anything_is_written(table, tmp_path, capsys, bpw_range: tuple[str, str]) -> None:
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--profile", str(table), "--bpw-range", *bpw_range, "--timesteps", "10", "--out", str(out))
    assert_one_line_error(code, err, "the bpw range must be finite")
    assert not out.exists()  # so the corrected command is not refused as "already holds a training run"


def test_generate_within_the_context(tiny_model_dir, capsys) -> None:
    code, _, err = run(capsys, "generate", "--model", str(tiny_model_dir), "--prompt", "the river", "--max-new-tokens", "100000000")
    assert_one_line_error(code, err, "--max-new-tokens 100000000 does not fit")
    code, _, err = run(capsys, "generate", "--model", str(tiny_model_dir), "--prompt", " the" * 300)
    assert_one_line_error(code, err, "the prompt is 300 tokens, more than")


@pytest.mark.parametrize("command", ["eval", "profile"])
def test_windows_longer_than_the_context(tiny_model_dir, text_file, capsys, isolated_cache, command: str) -> None:
    extra = ["--quantizer", "rtn", "--bits", "3"] if command == "eval" else []
    code, _, err = run(capsys, command, "--model", str(tiny_model_dir), "--corpus", str(text_file), "--seqlen", "300", *extra, "--no-progress")
    assert_one_line_error(code, err, "--seqlen 300 is longer than")


def test_calibration_draw_past_any_use(tiny_model_dir, text_file, capsys, isolated_cache) -> None:
    code, _, err = run(capsys, "eval", "--model", str(tiny_model_dir), "--corpus", str(text_file), "--quantizer", "gptq",
                       "--seqlen", "32", "--tokens", "64", "--samples", "1000000000", "--no-progress")
    assert_one_line_error(code, err, "calibration tokens is more than")
