"""Property-based fuzzing of the CLI (Hypothesis): numeric arguments, table, bit-map, packed-model and
policy files (random and mutated valid ones) and output paths. The only allowed outcomes are success
(exit 0) or one line on stderr with exit code 2; a traceback, another exit code, or a file the user
owned going missing fails the test. Example counts are bounded and derandomized so CI is repeatable."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from allocator.cli import main
from tests.conftest import random_text, tiny_llama, tiny_tokenizer

FUZZ = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CALIBRATION = ["--samples", "2", "--seqlen", "32"]


def _run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse
        code = int(exc.code) if isinstance(exc.code, int) else 2
    _, err = capsys.readouterr()
    return code, err


def _allowed(code: int, err: str) -> None:
    assert "Traceback" not in err, err
    assert code in (0, 2), (code, err)
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("bitalloc: error: "), err


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model, its text, a profile, a bit map, a packed model and the shipped policy, made once."""
    import os

    torch.set_num_threads(1)  # many tiny runs: threads only contend on a shared 2-core machine
    root = tmp_path_factory.mktemp("fuzz")
    previous = os.environ.get("BITALLOC_CACHE")
    os.environ["BITALLOC_CACHE"] = str(root / "cache")
    model = root / "tiny"
    tiny_llama().save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    text = root / "corpus.txt"
    text.write_text(random_text())
    table, bitmap, packed = root / "table.npz", root / "bitmap.json", root / "packed"
    base = ["--model", str(model), "--corpus", str(text), *CALIBRATION]
    assert main(["profile", *base, "--options", "xnor:group_size=32", "gptq2", "gptq3", "--out", str(table), "--no-progress"]) == 0
    assert main(["solve", "--profile", str(table), "--bpw", "2.5", "--out", str(bitmap)]) == 0
    assert main(["quantize", "--bitmap", str(bitmap), *base, "--out", str(packed), "--no-progress"]) == 0
    from policies.pretrained import resolve

    policy_zip = resolve("smollm2-135m-sac")
    shutil.copy(policy_zip, root / "policy.zip")
    shutil.copy(policy_zip.with_suffix(".json"), root / "policy.json")
    yield {"root": root, "model": model, "text": text, "table": table, "bitmap": bitmap, "packed": packed,
           "policy": root / "policy.zip", "policy_json": root / "policy.json"}
    if previous is None:
        os.environ.pop("BITALLOC_CACHE", None)
    else:
        os.environ["BITALLOC_CACHE"] = previous


# -- numbers ---------------------------------------------------------------------------------

NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.sampled_from(["0", "-0", "1e308", "-1e308", "1e-320", "inf", "-inf", "nan", "1_000", "0x10", "", " ", "2.5bpw", "٣"]),
).map(str)


@FUZZ
@given(bpw=NUMBERS, solver=st.sampled_from(["ilp", "convex", "baq", "dp", "greedy", "ilp-cvxpy"]))
def test_solve_budget_numbers(world: dict[str, Path], capsys: pytest.CaptureFixture, bpw: str, solver: str) -> None:
    _allowed(*_run(capsys, "solve", "--profile", str(world["table"]), "--bpw", bpw, "--solver", solver))


@FUZZ
@given(value=NUMBERS, flag=st.sampled_from(["--bytes", "--model-bytes"]))
def test_solve_byte_numbers(world: dict[str, Path], capsys: pytest.CaptureFixture, value: str, flag: str) -> None:
    _allowed(*_run(capsys, "solve", "--profile", str(world["table"]), flag, value))


@FUZZ
@given(start=NUMBERS, stop=NUMBERS, step=NUMBERS)
def test_pareto_range_numbers(world: dict[str, Path], capsys: pytest.CaptureFixture, start: str, stop: str, step: str) -> None:
    out = world["root"] / "sweep"
    _allowed(*_run(capsys, "pareto", "--profile", str(world["table"]), "--no-measure", "--from", start, "--to", stop, "--step", step,
                   "--solvers", "greedy", "--out", str(out)))


@FUZZ
@given(low=NUMBERS, high=NUMBERS)
def test_train_budget_range_numbers(world: dict[str, Path], capsys: pytest.CaptureFixture, low: str, high: str) -> None:
    out = world["root"] / "train-never"
    code, err = _run(capsys, "train", "--profile", str(world["table"]), "--bpw-range", low, high, "--timesteps", "1", "--out", str(out),
                     "--no-progress")
    _allowed(code, err)
    if code == 2:
        assert not out.exists()  # a refused run leaves nothing behind (a corrected rerun must not be blocked)
    shutil.rmtree(out, ignore_errors=True)


@FUZZ
@given(flag=st.sampled_from(["--seqlen", "--tokens", "--samples"]), value=NUMBERS)
def test_eval_numbers(world: dict[str, Path], capsys: pytest.CaptureFixture, flag: str, value: str) -> None:
    args = {"--seqlen": "32", "--tokens": "64", "--samples": "2"} | {flag: value}
    _allowed(*_run(capsys, "eval", "--model", str(world["model"]), "--corpus", str(world["text"]), "--quantizer", "rtn", "--bits", "3",
                   *[x for pair in args.items() for x in pair], "--no-progress"))


# -- files -----------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**20), 10**20) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _paths(document: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a JSON document (dict keys and list indices)."""
    out = [prefix]
    if isinstance(document, dict):
        for key, value in document.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(document, list):
        for i, value in enumerate(document[:3]):
            out += _paths(value, (*prefix, i))
    return out


def _replace(document: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    copy = dict(document) if isinstance(document, dict) else list(document)
    copy[head] = _replace(document[head], rest, value)
    return copy


def _mutated_json(data: st.DataObject, original: Any) -> str:
    """``original`` with one value somewhere replaced by a random JSON value (or the text cut short)."""
    if data.draw(st.booleans(), label="truncate"):
        text = json.dumps(original)
        return text[: data.draw(st.integers(0, len(text)), label="cut")]
    path = data.draw(st.sampled_from(_paths(original)), label="path")
    value = data.draw(JSON_VALUES, label="value")
    return json.dumps(_replace(original, path, value), allow_nan=True)


def _mutated_bytes(data: st.DataObject, original: bytes) -> bytes:
    kind = data.draw(st.sampled_from(["truncate", "flip", "random"]), label="kind")
    if kind == "random":
        return data.draw(st.binary(max_size=256), label="bytes")
    if kind == "truncate":
        return original[: data.draw(st.integers(0, len(original)), label="cut")]
    blob = bytearray(original)
    for _ in range(data.draw(st.integers(1, 8), label="flips")):
        at = data.draw(st.integers(0, len(blob) - 1), label="at")
        blob[at] ^= data.draw(st.integers(1, 255), label="mask")
    return bytes(blob)


@FUZZ
@given(data=st.data())
def test_table_files(world: dict[str, Path], capsys: pytest.CaptureFixture, data: st.DataObject) -> None:
    path = world["root"] / "fuzzed.npz"
    if data.draw(st.booleans(), label="header"):
        import numpy as np

        with np.load(world["table"]) as arrays:
            members = {name: arrays[name] for name in arrays.files}
        header = json.loads(bytes(members["header"]).decode())
        members["header"] = np.frombuffer(_mutated_json(data, header).encode(), dtype=np.uint8)
        with open(path, "wb") as handle:
            np.savez(handle, **members)
    else:
        path.write_bytes(_mutated_bytes(data, world["table"].read_bytes()))
    command = data.draw(st.sampled_from(["solve", "pareto"]), label="command")
    if command == "solve":
        _allowed(*_run(capsys, "solve", "--profile", str(path), "--bpw", "2.5"))
    else:
        _allowed(*_run(capsys, "pareto", "--profile", str(path), "--no-measure", "--solvers", "greedy", "--out", str(world["root"] / "p")))


@FUZZ
@given(data=st.data())
def test_bitmap_files(world: dict[str, Path], capsys: pytest.CaptureFixture, data: st.DataObject) -> None:
    path = world["root"] / "fuzzed.json"
    path.write_text(_mutated_json(data, json.loads(world["bitmap"].read_text())))
    out = world["root"] / "fuzzed-packed"
    _allowed(*_run(capsys, "quantize", "--bitmap", str(path), "--model", str(world["model"]), "--corpus", str(world["text"]),
                   *CALIBRATION, "--out", str(out), "--no-progress"))
    shutil.rmtree(out, ignore_errors=True)


@FUZZ
@given(data=st.data())
def test_packed_models(world: dict[str, Path], capsys: pytest.CaptureFixture, data: st.DataObject) -> None:
    directory = world["root"] / "fuzzed-packed-in"
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(world["packed"], directory)
    config = directory / "quantization_config.json"
    if data.draw(st.booleans(), label="config"):
        config.write_text(_mutated_json(data, json.loads(config.read_text())))
    else:
        tensors = next(p for p in directory.iterdir() if p.suffix == ".safetensors")
        tensors.write_bytes(_mutated_bytes(data, tensors.read_bytes()))
    _allowed(*_run(capsys, "eval", "--quantized", str(directory), "--model", str(world["model"]), "--corpus", str(world["text"]),
                   "--seqlen", "32", "--tokens", "64", "--no-progress"))


@FUZZ
@given(data=st.data())
def test_policy_files(world: dict[str, Path], capsys: pytest.CaptureFixture, data: st.DataObject) -> None:
    directory = world["root"] / "fuzzed-policy"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    zip_path, sidecar = directory / "policy.zip", directory / "policy.json"
    shutil.copy(world["policy"], zip_path)
    if data.draw(st.booleans(), label="sidecar"):
        sidecar.write_text(_mutated_json(data, json.loads(world["policy_json"].read_text())))
    else:
        shutil.copy(world["policy_json"], sidecar)
        zip_path.write_bytes(_mutated_bytes(data, world["policy"].read_bytes()))
        if zipfile.is_zipfile(zip_path):  # keep the hash in step, as a tamperer would
            import hashlib

            card = json.loads(sidecar.read_text())
            card["zip_sha256"] = hashlib.sha256(zip_path.read_bytes()).hexdigest()
            sidecar.write_text(json.dumps(card))
    _allowed(*_run(capsys, "solve", "--policy", str(zip_path), "--profile", str(world["table"]), "--bpw", "2.5"))


# -- paths -----------------------------------------------------------------------------------

PATH_TEXT = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=40),
    st.sampled_from(["/proc/bitalloc.json", "/", ".", "..", "/nonexistent/dir/out.json", "a" * 5000, "x/" * 300 + "f.json"]),
)


@FUZZ
@given(name=PATH_TEXT, existing=st.booleans())
def test_output_paths(world: dict[str, Path], capsys: pytest.CaptureFixture, name: str, existing: bool) -> None:
    sandbox = world["root"] / "outputs"
    shutil.rmtree(sandbox, ignore_errors=True)
    sandbox.mkdir()
    owned = sandbox / "notes.txt"
    owned.write_text("the user's")
    target = Path(name) if name.startswith("/") else sandbox / name
    planted = None
    if existing and not name.startswith("/") and len(name) < 200:
        try:  # the user's directory (with a file of theirs) where the bit map would go
            target.mkdir(parents=True, exist_ok=True)
            planted = target / "notes.txt"
            planted.write_text("the user's")
        except OSError:
            planted = None
    _allowed(*_run(capsys, "solve", "--profile", str(world["table"]), "--bpw", "2.5", "--out", str(target)))
    assert owned.read_text() == "the user's"
    if planted is not None:
        assert planted.read_text() == "the user's"
