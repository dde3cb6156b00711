"""Shared by the benchmark scripts: provenance (commit, machine) of every result file."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


_COMMIT_AT_START = git_commit()  # the code that ran, even if HEAD moves while a benchmark runs


def chosen_models(text: str, known) -> list[str]:
    """The comma-separated ``--models`` of a benchmark, every one checked against ``known`` before any work starts."""
    models = [m.strip() for m in text.split(",") if m.strip()]
    for model in models:
        if model not in known:
            raise SystemExit(f"unknown model {model!r}; choose from {', '.join(known)}")
    return models


def provenance() -> str:
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    today = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"- command: `{command}`\n- date: {today}\n- commit: {_COMMIT_AT_START}\n- machine: {machine()}\n"


def resumed_lines(record: dict, lists_first_run: bool = True) -> list[str]:
    """``- resumed: <commit> (<date>)`` for every run after a record's first (its ``resumed`` provenance blocks; a
    record whose ``resumed`` starts with the first run's own block skips it, ``lists_first_run=False`` for records
    that keep only the later runs there); a block without a date gives its commit alone."""
    def field(block: str, name: str) -> str:
        return block.split(f"- {name}: ")[1].splitlines()[0] if f"- {name}: " in block else ""

    runs = record.get("resumed", [])[1 if lists_first_run else 0:]
    return [f"- resumed: {field(run, 'commit')}" + (f" ({field(run, 'date')})" if field(run, "date") else "")
            for run in runs if field(run, "commit")]


def evaluation_protocol(settings, reference: str = "", calibration: str = "calibration") -> str:
    """The sentence every results file starts with: evaluation windows and calibration samples."""
    return (
        f"Evaluation: enwiki evaluation split, {settings.tokens // settings.seqlen} non-overlapping windows of "
        f"{settings.seqlen} tokens (BOS first where the model wants it){reference}; {calibration}: {settings.samples} "
        f"windows of {settings.seqlen} tokens from the calibration split, seed {settings.seed}.\n\n"
    )


def model_section(model: str, data: dict, table: str) -> str:
    """One model's part of a results file: provenance, wall time, its table."""
    return f"## {model}\n\n{data['provenance']}- wall time: {data['wall_seconds'] / 60:.1f} min\n\n{table}\n"


def merged_batches(batches: dict, names) -> list[dict]:
    """The rows of the named batches in order; every batch starts with the reference row, kept once."""
    rows: list[dict] = []
    for name in names:
        rows += batches[name] if not rows else batches[name][1:]
    return rows


def table_differences(a, b) -> dict[str, float]:
    """Largest relative difference of each array two sensitivity tables hold (bits, features, every loss both have)
    that is not identical, by name; inf where the shapes differ. Empty: identical."""
    found: dict[str, float] = {}
    pairs = {"bits": (a.bits, b.bits), "features": (a.features, b.features)}
    pairs |= {f"loss {name}": (a.losses[name], b.losses[name]) for name in b.losses if name in a.losses}
    for name, (x, y) in pairs.items():
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        if x.shape != y.shape:
            found[name] = float("inf")
        elif not np.array_equal(x, y, equal_nan=True):
            found[name] = float(np.nanmax(np.abs(x - y) / np.maximum(np.abs(x), 1e-30)))
    return found
