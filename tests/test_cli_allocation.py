"""profile -> solve -> quantize -> eval through the CLI on the tiny model, the packed format, and
the one-line errors of the allocation commands."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from allocator.errors import BitallocError
from allocator.evaluate.perplexity import REFERENCE, evaluate
from allocator.model.layers import quantizable_linears
from allocator.quantize.apply import quantize_model
from allocator.runtime.packed import CONFIG_FILE, TENSORS_FILE, load_quantized, save_quantized
from allocator.table.bitmap import BitMap
from allocator.table.options import quantizer_from_settings
from allocator.table.sensitivity import SensitivityTable
from tests.cli_helpers import assert_one_line_error, run
from tests.conftest import WORDS, tiny_llama

CALIBRATION = ["--samples", "4", "--seqlen", "32"]


@pytest.fixture
def profiled(tiny_model_dir, text_file, tmp_path, isolated_cache, capsys) -> Path:
    """A profile of the tiny model (xnor, gptq 2/3/4) written to tmp_path/table.npz."""
    out = tmp_path / "table.npz"
    code, stdout, _ = run(capsys, "profile", "--model", str(tiny_model_dir), "--corpus", str(text_file), *CALIBRATION,
                          "--options", "xnor:group_size=128", "gptq", "--out", str(out), "--no-progress")
    assert code == 0 and stdout.strip().endswith(str(out)) and out.is_file()
    return out


def test_profile_solve_quantize_eval_round_trip(profiled, tiny_model_dir, text_file, tmp_path, isolated_cache, capsys) -> None:
    table = SensitivityTable.load(profiled)
    assert len(list((isolated_cache / "profiles").glob("*.npz"))) == 1  # cached as well as written to --out
    # solve
    bitmap_path = tmp_path / "bitmap.json"
    code, stdout, _ = run(capsys, "solve", "--profile", str(profiled), "--bpw", "3.0", "--out", str(bitmap_path))
    assert code == 0 and stdout.strip().endswith(str(bitmap_path))
    bitmap = BitMap.load(bitmap_path)
    assert set(bitmap.modules) == set(table.names) and bitmap.predicted_bpw <= 3.0
    assert len({e.option for e in bitmap.modules.values()}) > 1  # 3.0 bpw needs a real mix here
    # quantize
    packed_dir = tmp_path / "packed"
    code, stdout, _ = run(capsys, "quantize", "--bitmap", str(bitmap_path), "--out", str(packed_dir),
                          "--corpus", str(text_file), *CALIBRATION, "--no-progress")
    assert code == 0 and (packed_dir / TENSORS_FILE).is_file() and (packed_dir / CONFIG_FILE).is_file()
    config = json.loads((packed_dir / CONFIG_FILE).read_text())
    assert config["schema_version"] == 1 and config["model"] == str(tiny_model_dir)
    assert config["total_bits"] == bitmap.total_bits and config["bpw"] == pytest.approx(bitmap.predicted_bpw)
    assert config["modules"]["model.layers.0.mlp.down_proj"]["quantizer"] == bitmap.modules["model.layers.0.mlp.down_proj"].settings
    # eval: the bit map quantized in memory and the packed model read back, side by side
    rows_path = tmp_path / "rows.json"
    code, _, _ = run(capsys, "eval", "--bitmap", str(bitmap_path), "--quantized", str(packed_dir), "--corpus", str(text_file),
                     *CALIBRATION, "--tokens", "128", "--json", str(rows_path), "--no-progress")
    assert code == 0
    reference, in_memory, reloaded = json.loads(rows_path.read_text())["rows"]
    assert reference["name"] == "reference"
    assert in_memory["name"] == "bitmap:bitmap" and reloaded["name"] == "packed:packed"
    assert in_memory["bpw"] == reloaded["bpw"] <= 3.0
    assert in_memory["perplexity"] == reloaded["perplexity"] and in_memory["kl"] == reloaded["kl"] > 0
    # the same map with the LM head stored at 8 bits: outside the bit map's bpw, inside the model size
    head_dir = tmp_path / "packed-head"
    code, _, _ = run(capsys, "quantize", "--bitmap", str(bitmap_path), "--out", str(head_dir), "--lm-head-bits", "8",
                     "--corpus", str(text_file), *CALIBRATION, "--no-progress")
    head_config = json.loads((head_dir / CONFIG_FILE).read_text())
    assert code == 0 and head_config["schema_version"] == 3 and list(head_config["head"]) == ["lm_head"]
    assert head_config["total_bits"] == config["total_bits"] and head_config["model_bytes"] != config["model_bytes"]
    assert head_config["head"]["lm_head"]["meta"]["bits"] == 8 and head_config["source"]["lm_head"]["bits"] == 8
    # generate from the packed model: the lean decoder and transformers agree token for token
    texts = {}
    for engine in ("lean", "transformers"):
        code, stdout, err = run(capsys, "generate", "--quantized", str(head_dir), "--prompt", "the river city", "--max-new-tokens", "8",
                                "--engine", engine, "--float-activations")
        expected_engine = "lean, C step" if engine == "lean" else engine
        assert code == 0 and f"({expected_engine} engine, float decode activations" in err and stdout.strip(), err
        texts[engine] = stdout
    assert texts["lean"] == texts["transformers"]
    code, stdout, err = run(capsys, "generate", "--quantized", str(head_dir), "--prompt", "the river city", "--max-new-tokens", "8")
    assert code == 0 and "(lean, C step engine, int8 decode activations" in err
    assert re.search(r"prefill [0-9.]+ tok/s, decode [0-9.]+ tok/s", err), err
    code, _, err = run(capsys, "generate", "--quantized", str(head_dir), "--prompt", "  ")
    assert_one_line_error(code, err, "--prompt is empty")
    code, _, err = run(capsys, "generate", "--quantized", str(tmp_path / "missing"), "--prompt", "the")
    assert code == 2 and "Traceback" not in err


def test_profile_measure_kl_adds_kl_losses_the_solver_takes(profiled, tiny_model_dir, text_file, tmp_path, capsys) -> None:
    code, stdout, _ = run(capsys, "profile", "--model", str(tiny_model_dir), "--corpus", str(text_file), *CALIBRATION,
                          "--options", "xnor:group_size=128", "gptq", "--measure-kl", "--kl-anchors", "gptq-w2g128", "--kl-seqlen", "16",
                          "--out", str(profiled), "--no-progress")  # (3 bits of this tiny model move some layers' KL below float noise)
    assert code == 0 and "kl, kl_est" in stdout
    table = SensitivityTable.load(profiled)
    # the --out copy holds no wall-clock time (same seed, same bytes); the cached table keeps it
    assert table.metadata["kl_measurement"] == {"windows": 1, "seqlen": 16, "anchors": ["gptq-w2g128"]}
    code, _, err = run(capsys, "solve", "--profile", str(profiled), "--bpw", "3.0", "--loss", "kl_est")
    assert code == 0 and "predicted kl_est" in err


def test_solve_renders_other_formats_and_budgets(profiled, tmp_path, capsys) -> None:
    code, stdout, err = run(capsys, "solve", "--profile", str(profiled), "--bpw", "2.5", "--format", "tensor-type")
    lines = stdout.strip().splitlines()
    assert code == 0 and len(lines) == 14 and lines[0].startswith("blk\\.0\\.attn_q\\.weight=") and "bpw" in err
    code, stdout, _ = run(capsys, "solve", "--profile", str(profiled), "--bytes", "80000", "--no-tie", "--solver", "greedy")
    data = json.loads(stdout)
    assert code == 0 and data["total_bytes"] <= 80000 and data["solver"]["name"] == "greedy"
    table = SensitivityTable.load(profiled)
    other = table.metadata["other_bytes"]
    code, stdout, _ = run(capsys, "solve", "--profile", str(profiled), "--model-bytes", str(other + 60000), "--loss", "weight_err")
    data = json.loads(stdout)
    assert code == 0 and data["total_bytes"] <= 60000 and data["loss_name"] == "weight_err"
    out = tmp_path / "dynamic.json"
    code, _, _ = run(capsys, "solve", "--profile", str(profiled), "--bpw", "4.3", "--format", "gptqmodel", "--out", str(out))
    assert code == 0 and all(v["bits"] == 4 for v in json.loads(out.read_text()).values())


def test_solve_bad_input_is_one_line_and_exit_2(profiled, tmp_path, capsys) -> None:
    table = str(profiled)
    cases = [
        (["--profile", str(tmp_path / "missing.npz"), "--bpw", "3"], "no sensitivity table"),
        (["--profile", table, "--bpw", "0.5"], "is infeasible"),
        (["--profile", table, "--bpw", "3", "--bytes", "1000"], "not allowed with argument"),
        (["--profile", table], "one of the arguments --bpw --bytes --model-bytes is required"),
        (["--profile", table, "--bpw", "3", "--solver", "magic"], "unknown solver 'magic'"),
        (["--profile", table, "--bpw", "3", "--loss", "kl"], "no loss 'kl'"),
        (["--profile", table, "--bpw", "-1"], "a bpw budget must be a number in (0, 1000]"),
        (["--profile", table, "--bpw", "1.5", "--format", "gptqmodel"], "GPTQModel cannot store"),
        (["--profile", table, "--bpw", "3", "--out", str(tmp_path / "no" / "b.json")], "does not exist"),
    ]
    for args, message in cases:
        code, _, err = run(capsys, "solve", *args)
        assert_one_line_error(code, err, message)
    (tmp_path / "junk.npz").write_bytes(b"not a table")
    code, _, err = run(capsys, "solve", "--profile", str(tmp_path / "junk.npz"), "--bpw", "3")
    assert_one_line_error(code, err, "cannot read sensitivity table")


def test_quantize_profile_and_eval_bad_input(tiny_model_dir, text_file, tmp_path, isolated_cache, capsys) -> None:
    model = ["--model", str(tiny_model_dir), "--corpus", str(text_file)]
    cases = [
        (["quantize", "--bitmap", str(tmp_path / "none.json"), "--out", str(tmp_path / "q")], "no bit map"),
        (["eval", *model, "--quantized", str(tmp_path / "none")], "no packed quantized model"),
        (["eval", *model, "--bitmap", str(tmp_path / "none.json")], "no bit map"),
        (["eval", *model, "--quantizer", "billm", "--bits", "2"], "--bits does not apply to billm"),
        (["eval", *model, "--quantizer", "dyngroup", "--group-size", "32"], "--group-size does not apply to dyngroup"),
        (["eval", *model, "--quantizer", "rtn", "--act-order"], "--act-order applies to gptq only"),
        (["eval", *model, "--bitmap", str(tmp_path / "b.json"), "--bits", "3"], "--bits sets up --quantizer"),
        (["profile", *model, "--options", "magic"], "unknown option 'magic'"),
        (["profile", *model, "--options", "gptq3:bits"], "bad option setting"),
        (["profile", *model, "--kl-anchors", "gptq3"], "--kl-anchors only applies with --measure-kl"),
        (["profile", *model, "--options", "gptq2", "--measure-kl", "--kl-anchors", "gptq-w3g128"], "'gptq-w3g128' is not one of the profiled"),
        (["profile", *model, "--measure-kl", "--scale-fold"], "a --scale-fold profile does not keep"),
    ]
    for args, message in cases:
        code, _, err = run(capsys, *args)
        assert_one_line_error(code, err, message)


def test_infeasible_budget_through_the_installed_entry_point(profiled) -> None:
    result = subprocess.run([sys.executable, "-m", "allocator.cli", "solve", "--profile", str(profiled), "--bpw", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "infeasible" in result.stderr
    assert "feasible range is 1.1667 to 4.2083 bpw" in result.stderr and result.stdout == ""


def test_packed_format_round_trips_every_quantizer(tmp_path) -> None:
    model = tiny_llama()
    linears = list(quantizable_linears(model))
    settings = [
        {"quantizer": "xnor", "group_size": 32},
        {"quantizer": "billm"},
        {"quantizer": "pbllm"},
        {"quantizer": "dyngroup", "structure": "row"},
        {"quantizer": "w1p1", "group_size": 64},
        {"quantizer": "gptq", "bits": 3, "group_size": 64},
        {"quantizer": "rtn", "bits": 4, "group_size": None, "symmetric": True},
    ]
    assignment = {name: quantizer_from_settings(settings[i % len(settings)]) for i, name in enumerate(linears)}
    samples = torch.randint(2, len(WORDS) + 2, (4, 32), generator=torch.Generator().manual_seed(0))
    quantized = quantize_model(model, assignment, samples, progress=False)
    target = tmp_path / "packed"
    save_quantized(target, "tiny", quantized, {n: q.settings() for n, q in assignment.items()}, model_bytes=123)
    packed = load_quantized(target)
    assert packed.model == "tiny" and packed.config["model_bytes"] == 123
    assert list(packed.quantized.tensors) == linears
    for name, qt in quantized.tensors.items():
        back = packed.quantized.tensors[name]
        assert back.format == qt.format and back.storage_bits == qt.storage_bits and back.meta == qt.meta
        assert torch.equal(back.dequantized, qt.dequantized), name
    windows = torch.randint(2, len(WORDS) + 2, (2, 24), generator=torch.Generator().manual_seed(1))
    results = evaluate(model, windows, {"memory": quantized.dequantized_weights(), "disk": packed.quantized.dequantized_weights()}, progress=False)
    assert results["memory"].perplexity == results["disk"].perplexity != results[REFERENCE].perplexity
    # saving again replaces the packed directory; a foreign non-empty directory is never overwritten
    save_quantized(target, "tiny", quantized, {n: q.settings() for n, q in assignment.items()})
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(BitallocError, match="not overwriting"):
        save_quantized(foreign, "tiny", quantized, {n: q.settings() for n, q in assignment.items()})
    assert (foreign / "notes.txt").read_text() == "keep me"
    (target / CONFIG_FILE).write_text(json.dumps({**packed.config, "total_bits": 1}))
    with pytest.raises(BitallocError, match="total_bits"):
        load_quantized(target)
    assert np.isfinite(packed.quantized.bits_per_weight)


def test_pareto_sweep_measures_each_allocation_once_and_resumes(profiled, tiny_model_dir, text_file, tmp_path, capsys) -> None:
    out = tmp_path / "sweep"
    args = ["pareto", "--profile", str(profiled), "--model", str(tiny_model_dir), "--corpus", str(text_file),
            "--from", "2.0", "--to", "3.5", "--step", "0.5", "--solvers", "ilp,dp,greedy", "--seqlen", "32", "--tokens", "128",
            "--out", str(out), "--no-progress"]
    code, stdout, _ = run(capsys, *args)
    assert code == 0, stdout
    record = json.loads((out / "pareto.json").read_text())
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / "pareto.md").is_file()
    table = SensitivityTable.load(profiled)
    points = record["points"]
    solved = [p for p in points if p["solver"] != "uniform"]
    assert {p["target_bpw"] for p in solved} == {2.0, 2.5, 3.0, 3.5}
    assert all(p["bpw"] <= p["target_bpw"] + 1e-12 for p in solved)
    assert {p["option"] for p in points if p["solver"] == "uniform"} == set(table.labels)
    assert all(p["perplexity"] > 0 and p["kl"] >= 0 for p in points)
    # ILP and DP are both exact here: same allocation, so the same measured numbers.
    by_name = {p["name"]: p for p in points}
    for bpw in ("2", "2.5", "3", "3.5"):
        if by_name[f"ilp@{bpw}"]["allocation"] == by_name[f"dp@{bpw}"]["allocation"]:
            assert by_name[f"ilp@{bpw}"]["kl"] == by_name[f"dp@{bpw}"]["kl"]
    assert "spearman" in record["prediction"]
    # Resume: a second run finds every allocation already measured.
    code, stdout, _ = run(capsys, *args)
    distinct = len({p["allocation"] for p in points})
    assert code == 0 and f"{distinct} distinct allocations" in stdout and f"{distinct} measured before" in stdout


def test_pareto_no_uniform_leaves_out_only_the_uniform_points(profiled, tmp_path, capsys) -> None:
    common = ["pareto", "--profile", str(profiled), "--from", "2.0", "--to", "3.0", "--step", "0.5", "--solvers", "ilp,greedy",
              "--no-measure"]
    names = {}
    for flag in ([], ["--no-uniform"]):
        out = tmp_path / ("without" if flag else "with")
        code, stdout, _ = run(capsys, *common, *flag, "--out", str(out))
        assert code == 0, stdout
        names[bool(flag)] = {p["name"] for p in json.loads((out / "pareto.json").read_text())["points"]}
    uniform = {n for n in names[False] if n.startswith("uniform:")}
    assert uniform and names[True] == names[False] - uniform


def test_pareto_bad_input_is_one_line(profiled, tmp_path, capsys) -> None:
    code, _, err = run(capsys, "pareto", "--profile", str(profiled), "--solvers", "ilp,magic", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "unknown solver 'magic'")
    code, _, err = run(capsys, "pareto", "--profile", str(profiled), "--from", "3", "--to", "2", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "bad sweep")


def test_run_is_profile_solve_quantize_eval(tiny_model_dir, text_file, tmp_path, isolated_cache, capsys) -> None:
    out = tmp_path / "job"
    code, stdout, _ = run(capsys, "run", "--model", str(tiny_model_dir), "--corpus", str(text_file), *CALIBRATION,
                          "--bpw", "3.0", "--tokens", "128", "--out", str(out), "--no-progress")
    assert code == 0, stdout
    assert all(f"[{i}/4]" in stdout for i in range(1, 5)) and "ilp@3bpw" in stdout
    stages = next(line for line in stdout.splitlines() if line.startswith("stages: "))
    assert all(f"{stage} " in stages for stage in ("load", "profile", "kl", "solve", "quantize", "eval")) and "= total" in stages
    bitmap = BitMap.load(out / "bitmap.json")
    assert bitmap.predicted_bpw <= 3.0 and bitmap.loss_name == "kl"  # every option's single-layer KL measured
    assert {e.option for e in bitmap.modules.values()} <= {"xnor-g128", "w1p1-g128", "gptq-w2g128-act-mse", "gptq-w3g128-act-mse",
                                                            "gptq-w4g128-act-mse"}
    packed = load_quantized(out / "packed")
    assert packed.quantized.bits_per_weight == pytest.approx(bitmap.predicted_bpw)
    rows = json.loads((out / "rows.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["reference", "ilp@3bpw"] and rows[1]["bpw"] == pytest.approx(bitmap.predicted_bpw)
    saved_stages = json.loads((out / "rows.json").read_text())["stage_seconds"]
    assert list(saved_stages) == ["load", "profile", "kl", "solve", "quantize", "eval"] and all(v >= 0 for v in saved_stages.values())
    # a trained policy is one more solver: the same job, the profile above reused from the cache
    code, stdout, _ = run(capsys, "run", "--model", str(tiny_model_dir), "--corpus", str(text_file), *CALIBRATION,
                          "--bpw", "3.0", "--tokens", "128", "--policy", "smollm2-135m-sac", "--no-progress")
    assert code == 0, stdout
    assert "[2/4] solve: sac-policy at" in stdout and "sac-policy@3bpw" in stdout


def test_run_policy_and_solver_exclude_each_other(capsys) -> None:
    code, _, err = run(capsys, "run", "--solver", "ilp", "--policy", "smollm2-135m-sac")
    assert_one_line_error(code, err, "not allowed with argument")


def test_run_bad_solver_is_one_line(capsys) -> None:
    code, _, err = run(capsys, "run", "--solver", "magic")
    assert_one_line_error(code, err, "unknown solver 'magic'")
