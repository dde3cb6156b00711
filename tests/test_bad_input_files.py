"""Bad files and paths get one line on stderr and exit code 2 before any work starts: unreadable tables,
bit maps and packed models, outputs bitalloc could not write, names too long for the file system, damaged
models. Nothing is written, nothing the user owns is deleted, and same-seed artifacts are the same bytes.

Every case runs the CLI in this process with the expensive steps (loading a model, solving, training,
sweeping) replaced by a tripwire where the refusal must come first, on the tiny llama of ``conftest``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from allocator.errors import BitallocError
from allocator.runtime.packed import CONFIG_FILE, TENSORS_FILE
from allocator.storage import atomic_path, check_output_dir, check_output_file
from allocator.table.bitmap import BitMap
from allocator.table.sensitivity import SensitivityTable
from tests.cli_helpers import assert_one_line_error, run

CALIBRATION = ["--samples", "4", "--seqlen", "32", "--no-progress"]
LONG_NAME = "a" * 5000
RUNNING_AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# -- fixtures: one profile, bit map and packed model for the whole module ------------------------


@pytest.fixture(scope="module")
def made(tiny_model_dir: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """table.npz, bitmap.json and packed/ of the tiny model, in a directory of their own (own cache)."""
    from tests.cli_helpers import main

    root = tmp_path_factory.mktemp("made")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BITALLOC_CACHE", str(root / "cache"))
        corpus = ["--corpus", str(text_file)]
        assert main(["profile", "--model", str(tiny_model_dir), *corpus, *CALIBRATION, "--options", "xnor:group_size=128", "gptq",
                     "--out", str(root / "table.npz")]) == 0
        assert main(["solve", "--profile", str(root / "table.npz"), "--bpw", "3.0", "--out", str(root / "bitmap.json")]) == 0
        assert main(["quantize", "--bitmap", str(root / "bitmap.json"), *corpus, *CALIBRATION, "--out", str(root / "packed")]) == 0
        yield {"table": root / "table.npz", "bitmap": root / "bitmap.json", "packed": root / "packed", "model": tiny_model_dir,
               "corpus": text_file}


@pytest.fixture
def tripwire(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model, profiling, solving, training or sweeping fails the test: bad input must be refused first."""

    def work(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("work started before the bad input was refused")

    import allocator.cli.commands.solve
    import allocator.cli.commands.train
    import allocator.jobs.pareto
    import allocator.model.loading
    import allocator.solvers
    import policies.sac

    for module, name in ((allocator.model.loading, "load_model"), (allocator.cli.commands.solve, "profile_for"),
                         (allocator.cli.commands.train, "profile_for"), (allocator.solvers, "solve"), (policies.sac, "train"),
                         (allocator.jobs.pareto, "run_pareto")):
        monkeypatch.setattr(module, name, work)


def tree(directory: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``directory`` (the empty cache directories bitalloc
    creates on start are not files)."""
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if not path.is_dir()}


def refused(capsys: pytest.CaptureFixture, watched: Path, message: str, *args: Any) -> None:
    """Run the CLI: exit 2, one line with ``message``, and nothing under ``watched`` written or deleted."""
    before = tree(watched)
    code, _, err = run(capsys, *(str(a) for a in args))
    assert_one_line_error(code, err, message)
    assert tree(watched) == before, f"{args}: files changed"


def edited_bitmap(made: dict[str, Path], directory: Path, edit: Callable[[dict[str, Any]], Any]) -> Path:
    data = json.loads(made["bitmap"].read_text())
    edit(data)
    path = directory / "edited.json"
    path.write_text(json.dumps(data))
    return path


def gptq_everywhere(data: dict[str, Any]) -> None:
    """Every module at GPTQ 4-bit g128 (so that bits and group_size edits apply to all of them)."""
    for entry in data["modules"].values():
        entry["settings"] = {"quantizer": "gptq", "bits": 4, "group_size": 128, "symmetric": False, "act_order": False}
        entry["option"] = "gptq-w4g128"


# -- 1. tables that are not tables -------------------------------------------------------------


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]


def test_empty_npz_is_one_line_in_solve_train_and_pareto(tmp_path, capsys) -> None:
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    for command in (["solve", "--profile", empty, "--bpw", "3"], ["train", "--profile", empty, "--out", tmp_path / "run"],
                    ["pareto", "--profile", empty, "--no-measure", "--out", tmp_path / "sweep"]):
        refused(capsys, tmp_path, "not an .npz archive (the file is empty)", *command)


def test_tables_that_are_not_tables_are_refused_in_one_line(made, tmp_path, capsys) -> None:
    with np.load(made["table"]) as data:
        arrays = {name: data[name] for name in data.files}
    header_list = tmp_path / "header-list.npz"
    _write_npz(header_list, **{**arrays, "header": np.frombuffer(b"[1, 2]", dtype=np.uint8)})
    random_bytes = tmp_path / "random.npz"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(4096))
    not_npz = tmp_path / "zip.npz"
    with zipfile.ZipFile(not_npz, "w") as archive:
        archive.writestr("notes.txt", "a zip, not an npz")
    missing = tmp_path / "missing.npz"
    _write_npz(missing, **{k: v for k, v in arrays.items() if k != "bits"})
    strings = tmp_path / "strings.npz"
    _write_npz(strings, **{**arrays, "numel": np.array(["a"] * len(arrays["numel"]))})
    nested = tmp_path / "nested.npz"
    _write_npz(nested, **{**arrays, "header": np.frombuffer(b"[" * 100000, dtype=np.uint8)})
    cases = [(header_list, "header is a JSON list, not an object"), (random_bytes, "not an .npz archive"),
             (not_npz, "not a bitalloc sensitivity table (no header)"), (missing, "no array 'bits'"),
             (strings, "array 'numel' holds <U1"), (nested, "header is not valid JSON")]
    for path, message in cases:
        refused(capsys, tmp_path, message, "solve", "--profile", path, "--bpw", "3")
        with pytest.raises(BitallocError, match="sensitivity table|header|array"):
            SensitivityTable.load(path)


# -- 2. outputs bitalloc could not write -----------------------------------------------------


def _output_commands(made: dict[str, Path], target: Path) -> dict[str, list[Any]]:
    """Each command with ``target`` as its --out/--json."""
    model = ["--model", made["model"], "--corpus", made["corpus"], *CALIBRATION]
    return {
        "eval": ["eval", *model, "--quantizer", "rtn", "--bits", "4", "--json", target],
        "profile": ["profile", *model, "--options", "gptq3", "--out", target],
        "solve": ["solve", "--profile", made["table"], "--bpw", "3", "--out", target],
        "train": ["train", "--profile", made["table"], "--timesteps", "10", "--out", target],
        "quantize": ["quantize", "--bitmap", made["bitmap"], *CALIBRATION, "--out", target],
        "pareto": ["pareto", "--profile", made["table"], "--no-measure", "--out", target],
        "run": ["run", *model, "--options", "gptq3", "--no-kl", "--out", target],
        "export": ["export", "--bitmap", made["bitmap"], "--out", target.with_name(target.name + ".gguf")],
    }


FILE_OUTPUTS = ("eval", "profile", "solve", "export")
DIR_OUTPUTS = ("train", "quantize", "pareto", "run")


@pytest.mark.parametrize("place", ["/proc", "/sys"])
def test_outputs_where_nothing_can_be_written(made, place, tripwire, capsys) -> None:
    if not Path(place).is_dir():
        pytest.skip(f"no {place} here")
    for name, command in _output_commands(made, Path(place) / "bitalloc-out").items():
        code, _, err = run(capsys, *(str(a) for a in command))
        assert_one_line_error(code, err, "cannot write in")
        assert not (Path(place) / "bitalloc-out").exists(), name


@pytest.mark.skipif(RUNNING_AS_ROOT, reason="root writes into read-only directories")
def test_outputs_into_a_read_only_directory(made, tmp_path, tripwire, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for command in _output_commands(made, locked / "out").values():
            refused(capsys, tmp_path, "Permission denied", *command)
    finally:
        locked.chmod(0o755)


def test_file_outputs_onto_a_directory_and_directory_outputs_onto_a_file(made, tmp_path, tripwire, capsys) -> None:
    directory = tmp_path / "taken"
    directory.mkdir()
    (directory / "mine.txt").write_text("keep")
    Path(str(directory) + ".gguf").mkdir()
    commands = _output_commands(made, directory)
    for name in FILE_OUTPUTS:
        refused(capsys, tmp_path, "is a directory; give a file name", *commands[name])
    plain = tmp_path / "plain"
    plain.write_text("a file, not a directory")
    commands = _output_commands(made, plain)
    for name in DIR_OUTPUTS:
        refused(capsys, tmp_path, "exists and is not a directory", *commands[name])


def test_eval_json_and_quantize_out_fail_before_the_work(made, tmp_path, tripwire, capsys) -> None:
    model = ["--model", made["model"], "--corpus", made["corpus"], *CALIBRATION]
    refused(capsys, tmp_path, "does not exist", "eval", *model, "--quantizer", "rtn", "--json", tmp_path / "missing" / "rows.json")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    refused(capsys, tmp_path, "not a bitalloc packed model; not overwriting it", "quantize", "--bitmap", made["bitmap"], "--out", foreign)
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "packed").mkdir()
    (tmp_path / "job" / "packed" / "notes.txt").write_text("keep me")
    refused(capsys, tmp_path, "not a bitalloc packed model", "run", *model, "--out", tmp_path / "job")


def test_train_loss_a_bare_profile_lacks_fails_before_profiling(made, tmp_path, tripwire, capsys) -> None:
    for loss in ("kl", "nope"):
        refused(capsys, tmp_path, f"--loss '{loss}' is not in a profile made for --models", "train", "--models", made["model"], "--corpus",
                made["corpus"], "--loss", loss, "--out", tmp_path / "run")


def test_profile_out_onto_a_directory_fails_before_profiling(made, tmp_path, tripwire, capsys) -> None:
    (tmp_path / "table.npz").mkdir()
    refused(capsys, tmp_path, "is a directory; give a file name", "profile", "--model", made["model"], "--out", tmp_path / "table.npz")


def test_the_shared_output_checks() -> None:
    with pytest.raises(BitallocError, match="does not exist"):
        check_output_file(Path("/nonexistent-bitalloc-dir/x.json"), "--out")
    with pytest.raises(BitallocError, match="File name too long .a name of 300 bytes, the file system allows 255"):
        check_output_file(Path("/tmp") / LONG_NAME[:300], "--out")
    with pytest.raises(BitallocError, match="the path is .* bytes, the file system allows"):
        check_output_dir(Path("/tmp").joinpath(*["d" * 200] * 30), "--out")


# -- 3. names too long for the file system -----------------------------------------------------


def test_5000_character_paths_are_one_line(made, tmp_path, tripwire, capsys) -> None:
    long = tmp_path / LONG_NAME
    model = ["--model", made["model"], "--corpus", made["corpus"], *CALIBRATION]
    inputs = [
        ["solve", "--profile", long, "--bpw", "3"],
        ["train", "--profile", long, "--out", tmp_path / "run"],
        ["quantize", "--bitmap", long, "--out", tmp_path / "q"],
        ["eval", *model, "--bitmap", long],
        ["eval", *model, "--quantized", long],
        ["generate", "--quantized", long, "--prompt", "the"],
        ["solve", "--policy", long, "--profile", made["table"], "--bpw", "3"],
    ]
    for command in inputs:
        refused(capsys, tmp_path, "File name too long", *command)
    for command in _output_commands(made, long).values():
        refused(capsys, tmp_path, "File name too long", *command)
    # the line shows the path shortened
    code, _, err = run(capsys, "solve", "--profile", str(long), "--bpw", "3")
    assert len(err) < 400 and "(5" in err


def test_5000_character_model_and_corpus(made, tmp_path, capsys, monkeypatch) -> None:
    long = tmp_path / LONG_NAME
    refused(capsys, tmp_path, "File name too long", "eval", "--model", long, "--quantizer", "none")
    import allocator.model.loading

    monkeypatch.setattr(allocator.model.loading, "load_model", lambda *a, **k: pytest.fail("the model loaded before --corpus was checked"))
    for command in (["eval", "--model", made["model"], "--quantizer", "none"], ["profile", "--model", made["model"]],
                    ["quantize", "--bitmap", made["bitmap"], "--out", tmp_path / "q"], ["run", "--model", made["model"]],
                    ["solve", "--model", made["model"], "--bpw", "3"]):
        refused(capsys, tmp_path, "File name too long", *command, "--corpus", long)
        refused(capsys, tmp_path, "unknown corpus", *command, "--corpus", tmp_path / "missing.txt")


# -- 4. damaged models -------------------------------------------------------------------------


def _small_gguf(path: Path) -> None:
    """A GGUF with a large metadata array and one tensor (enough bytes for a truncation to cut into)."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_token_list([f"token{i}" for i in range(20000)])
    writer.add_tensor("token_embd.weight", np.zeros((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_truncated_gguf_and_empty_config_are_one_line(tmp_path, isolated_cache, capsys) -> None:
    whole = tmp_path / "whole.gguf"
    _small_gguf(whole)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 3])
    refused(capsys, tmp_path, "truncated or damaged", "eval", "--model", truncated, "--quantizer", "none")
    assert not (isolated_cache / "models").exists() or not any((isolated_cache / "models").iterdir())
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04 something else")
    refused(capsys, tmp_path, "is not a GGUF file", "eval", "--model", tmp_path / "not.gguf", "--quantizer", "none")
    empty_config = tmp_path / "model"
    empty_config.mkdir()
    (empty_config / "config.json").write_text("{}")
    refused(capsys, tmp_path, "model_type", "eval", "--model", empty_config, "--quantizer", "none")


def test_truncated_gguf_in_export(tmp_path, isolated_cache, capsys) -> None:
    pytest.importorskip("llama_cpp")
    whole = tmp_path / "whole.gguf"
    _small_gguf(whole)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 3])
    refused(capsys, tmp_path, "truncated or damaged", "export", "--preset", "Q4_K_M", "--model", truncated, "--out", tmp_path / "q.gguf")


# -- 5. bit maps and packed models with bad settings ----------------------------------------------


@pytest.mark.parametrize("bits", [0, 99, -1, 3.5, "4"])
def test_bitmap_bits_outside_1_to_8_integers(made, tmp_path, bits, tripwire, capsys) -> None:
    def edit(data: dict[str, Any]) -> None:
        gptq_everywhere(data)
        next(iter(data["modules"].values()))["settings"]["bits"] = bits

    path = edited_bitmap(made, tmp_path, edit)
    refused(capsys, tmp_path, "bits must be an integer from 1 to 8", "quantize", "--bitmap", path, "--out", tmp_path / "q")
    refused(capsys, tmp_path, "bits must be an integer from 1 to 8", "eval", "--model", made["model"], "--bitmap", path)


@pytest.mark.parametrize("setting,value,message", [("block_size", 0, "block_size must be an integer of at least 1"),
                                                   ("act_order", "false", "act_order must be true or false"),
                                                   ("damp_ratio", float("nan"), "damp_ratio must be a finite number"),
                                                   ("symmetric", 1, "symmetric must be true or false")])
def test_bitmap_settings_no_quantizer_takes(made, tmp_path, setting, value, message, tripwire, capsys) -> None:
    def edit(data: dict[str, Any]) -> None:
        gptq_everywhere(data)
        list(data["modules"].values())[1]["settings"][setting] = value

    path = edited_bitmap(made, tmp_path, edit)
    refused(capsys, tmp_path, message, "quantize", "--bitmap", path, "--out", tmp_path / "q")


@pytest.mark.parametrize("group,message", [(7, "group size 7 does not divide in_features"), (1e12, "group_size must be a positive"),
                                           (0, "group_size must be a positive"), (10**12, "does not divide in_features")])
def test_bitmap_group_sizes_are_checked_against_the_model_before_quantizing(made, tmp_path, group, message, monkeypatch, capsys) -> None:
    import allocator.jobs.compare

    def quantize(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("quantized before the group size was checked")

    monkeypatch.setattr(allocator.jobs.compare, "quantize_assignment", quantize)

    def edit(data: dict[str, Any]) -> None:
        gptq_everywhere(data)
        list(data["modules"].values())[-1]["settings"]["group_size"] = group

    path = edited_bitmap(made, tmp_path, edit)
    common = ["--corpus", made["corpus"], *CALIBRATION]
    refused(capsys, tmp_path, message, "quantize", "--bitmap", path, *common, "--out", tmp_path / "q")
    refused(capsys, tmp_path, message, "eval", "--model", made["model"], "--bitmap", path, *common)


def _other_model(data: dict[str, Any]) -> None:
    first = next(iter(data["modules"]))
    data["modules"]["model.layers.9.mlp.up_proj"] = data["modules"].pop(first)


def _other_sizes(data: dict[str, Any]) -> None:
    next(iter(data["modules"].values()))["numel"] += 96
    del data["predicted_bpw"]


BITMAP_CASES = [
    (lambda d: d.__setitem__("budget", 3.0), "'budget' must be an object"),
    (lambda d: d["budget"].__setitem__("bits", 1000), "more than the bit map's own budget of 1000 bits"),
    (lambda d: d.__setitem__("budget", {"kind": "bpw", "value": 1.0}), "more than the bit map's own budget"),
    (lambda d: d.__setitem__("predicted_loss", float("nan")), "predicted_loss must be a finite number"),
    (lambda d: d.__setitem__("model", {"name": "x"}), "model must be a string"),
]


@pytest.mark.parametrize("edit,message", BITMAP_CASES)
def test_bitmaps_that_contradict_themselves(made, tmp_path, edit, message, tripwire, capsys) -> None:
    path = edited_bitmap(made, tmp_path, edit)
    refused(capsys, tmp_path, message, "quantize", "--bitmap", path, "--out", tmp_path / "q")


@pytest.mark.parametrize("edit,message", [(_other_model, "not a quantizable linear of this model"), (_other_sizes, "weights in the bit map")])
def test_bitmaps_for_another_model_are_refused_before_quantizing(made, tmp_path, edit, message, monkeypatch, capsys) -> None:
    import allocator.jobs.compare

    monkeypatch.setattr(allocator.jobs.compare, "quantize_assignment", lambda *a, **k: pytest.fail("quantized"))
    path = edited_bitmap(made, tmp_path, edit)
    common = ["--corpus", made["corpus"], *CALIBRATION]
    refused(capsys, tmp_path, message, "quantize", "--bitmap", path, *common, "--out", tmp_path / "q")
    refused(capsys, tmp_path, message, "eval", "--model", made["model"], "--bitmap", path, *common)


def test_deeply_nested_bitmap(tmp_path, tripwire, capsys) -> None:
    path = tmp_path / "nested.json"
    path.write_text("[" * 100000)
    refused(capsys, tmp_path, "nested too deeply", "quantize", "--bitmap", path, "--out", tmp_path / "q")


@pytest.mark.parametrize("where", ["meta", "quantizer"])
def test_packed_model_with_group_size_zero(made, tmp_path, where, capsys) -> None:
    packed = tmp_path / "packed"
    shutil.copytree(made["packed"], packed)
    config = json.loads((packed / CONFIG_FILE).read_text())
    for entry in config["modules"].values():
        entry[where]["group_size"] = 0
    (packed / CONFIG_FILE).write_text(json.dumps(config))
    refused(capsys, tmp_path, "group_size must be a positive", "eval", "--model", made["model"], "--quantized", packed)
    refused(capsys, tmp_path, "group_size must be a positive", "generate", "--quantized", packed, "--prompt", "the")


# -- 6. never lose or clobber the user's files ----------------------------------------------------


def test_quantize_into_a_packed_directory_keeps_the_users_other_files(made, tmp_path, capsys) -> None:
    packed = tmp_path / "packed"
    shutil.copytree(made["packed"], packed)
    (packed / "notes.txt").write_text("keep me")
    code, _, err = run(capsys, "quantize", "--bitmap", str(made["bitmap"]), "--corpus", str(made["corpus"]), *CALIBRATION, "--out", str(packed))
    assert code == 0, err
    assert (packed / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in packed.iterdir()) == sorted(["notes.txt", CONFIG_FILE, TENSORS_FILE])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_atomic_path_never_deletes_what_it_did_not_write(tmp_path) -> None:
    target = tmp_path / "dir"
    target.mkdir()
    (target / "theirs.txt").write_text("keep")
    (target / "ours.txt").write_text("old")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "ours.txt").write_text("new")
    assert (target / "theirs.txt").read_text() == "keep" and (target / "ours.txt").read_text() == "new"
    with pytest.raises(BitallocError, match="is a directory; not replacing it"), atomic_path(target) as tmp:
        tmp.write_text("a file where a directory is")
    assert (target / "theirs.txt").read_text() == "keep"
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "half.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]  # no half-written file, no temporary
    # a name near the file system's limit still gets a temporary sibling that fits
    with atomic_path(tmp_path / ("n" * 250)) as tmp:
        tmp.write_text("ok")
    assert (tmp_path / ("n" * 250)).read_text() == "ok"


def test_export_of_a_bitmap_for_another_model_writes_nothing(tmp_path, isolated_cache, capsys) -> None:
    pytest.importorskip("llama_cpp")
    from tests.test_gguf_export import _bitmap, _tiny_hf, _write_gguf

    gguf_path = tmp_path / "tiny.gguf"
    _write_gguf(_tiny_hf(), gguf_path)
    bitmap = _bitmap(gguf_path)
    data = bitmap.to_json()
    data["modules"]["model.layers.7.mlp.up_proj"] = data["modules"].pop("model.layers.1.mlp.up_proj")
    path = tmp_path / "other.json"
    path.write_text(json.dumps(data))
    refused(capsys, tmp_path, "has no tensor blk.7.ffn_up.weight", "export", "--bitmap", path, "--imatrix", "off", "--out", tmp_path / "o.gguf")
    assert not list(isolated_cache.rglob("*.gguf"))  # the F32 reference was not written
    data = bitmap.to_json()
    data["modules"]["model.layers.0.self_attn.q_proj"]["numel"] += 256
    del data["predicted_bpw"]
    path.write_text(json.dumps(data))
    refused(capsys, tmp_path, "weights, this GGUF's blk.0.attn_q.weight has", "export", "--bitmap", path, "--out", tmp_path / "o.gguf")
    assert not list(isolated_cache.rglob("*.gguf"))


# -- 7. same seed, same bytes --------------------------------------------------------------------


def test_solve_writes_the_same_bytes_twice_and_no_timings(made, tmp_path, capsys) -> None:
    outputs = []
    for name in ("a.json", "b.json"):
        code, stdout, _ = run(capsys, "solve", "--profile", str(made["table"]), "--bpw", "3", "--out", str(tmp_path / name))
        assert code == 0 and " ms" in stdout  # the time is printed ...
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1]
    assert "seconds" not in json.loads(outputs[0])["solver"]  # ... not saved
    # bit maps written before keep loading, their time read and ignored in the bytes written again
    old = json.loads(outputs[0])
    old["solver"]["seconds"] = 0.012
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = BitMap.load(tmp_path / "old.json")
    assert loaded.solver.seconds == 0.012 and loaded.to_json() == json.loads(outputs[0])


def test_profile_out_holds_no_wall_clock_times(made, tmp_path, capsys) -> None:
    table = SensitivityTable.load(made["table"])
    flat = json.dumps(table.metadata)
    assert "seconds" not in flat
    code, _, _ = run(capsys, "profile", "--model", str(made["model"]), "--corpus", str(made["corpus"]), *CALIBRATION,
                     "--options", "xnor:group_size=128", "gptq", "--out", str(tmp_path / "again.npz"))
    assert code == 0 and (tmp_path / "again.npz").read_bytes() == made["table"].read_bytes()
