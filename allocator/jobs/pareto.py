"""Pareto sweep: solve many budgets from one sensitivity table, then measure every allocation.

Every (solver, budget) pair is solved from the same table; identical allocations (different
solvers often agree) are measured once. Beside them, each option of the table applied to every
layer ("uniform" points: GPTQ at 2/3/4 bits, the 1-bit family) is measured the same way, so the
curves compare like with like.

Measuring an allocation needs no calibration run: the weights come from the profile's kept
(layer, option) weights (:mod:`allocator.measure.option_weights`), i.e. every layer quantized alone on the
reference inputs -- the same weights the table's losses describe. Allocations are evaluated a few
at a time against the float reference on the same windows, and every result is saved at once in
the sweep's JSON file, so an interrupted sweep resumes with what is not measured yet.

The predicted loss of a point is the table's additive loss (sum over layers). How well it
predicts what is measured is summarized by the Pearson correlation (of logs) and the Spearman rank
correlation between predicted loss and measured KL over all measured points
(:func:`prediction_quality`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from allocator.errors import BitallocError
from allocator.evaluate.perplexity import evaluate
from allocator.evaluate.plotting import plot_pareto
from allocator.jobs.compare import EvalSettings, evaluation_tokens
from allocator.measure.option_weights import OptionWeights
from allocator.measure.profile import cached_table_path, model_fingerprint
from allocator.model.corpus import load_corpus
from allocator.model.loading import load_model
from allocator.model.placement import CPU
from allocator.solvers import SOLVERS, UNIFORM, Budget, Constraints, solve, warn_if_above_widest
from allocator.solvers.base import MAX_BPW
from allocator.storage import atomic_path, is_file, read_json, write_json
from allocator.table.sensitivity import SensitivityTable

SWEEP_SCHEMA_VERSION = 1
MAX_SWEEP_BUDGETS = 1000
"""More budgets than this is a typo (a step of 1e-9), not a sweep."""
SWEEP_JSON, SWEEP_MARKDOWN, SWEEP_PLOT = "pareto.json", "pareto.md", "pareto.png"
SWEEP_FILES = (SWEEP_JSON, SWEEP_MARKDOWN, SWEEP_PLOT)
"""What :func:`run_pareto` writes into its directory (each atomically)."""


@dataclass
class SweepPoint:
    """One allocation of the sweep and, once measured, its perplexity and KL."""

    solver: str
    """Solver name, or ``"uniform"`` for one option on every layer."""
    target_bpw: float | None
    """The budget (None for uniform points)."""
    option: str | None
    """The option of a uniform point."""
    bpw: float
    predicted_loss: float
    solve_seconds: float
    allocation: str
    """Hash of the module -> option assignment (equal allocations are measured once)."""
    bits_histogram: dict[str, int] = field(default_factory=dict)
    """Option label -> number of layers that took it."""
    perplexity: float | None = None
    ppl_ratio: float | None = None
    kl: float | None = None

    @property
    def name(self) -> str:
        return f"{UNIFORM}:{self.option}" if self.solver == UNIFORM else f"{self.solver}@{self.target_bpw:g}"


def allocation_hash(options: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(sorted(options.items())).encode()).hexdigest()[:16]


def budgets_between(start: float, stop: float, step: float) -> list[float]:
    """``start, start + step, ... <= stop`` (decimal-exact, so 1.5..4.0 by 0.25 has 11 points)."""
    if not all(math.isfinite(x) for x in (start, stop, step)) or step <= 0 or stop < start:
        raise BitallocError(f"bad sweep: from {start} to {stop} by {step} (need finite numbers, step > 0 and to >= from)")
    count = int(math.floor((stop - start) / step + 1e-9)) + 1
    if count > MAX_SWEEP_BUDGETS:
        raise BitallocError(f"bad sweep: from {start} to {stop} by {step} is {count} budgets; at most {MAX_SWEEP_BUDGETS}")
    return [round(start + i * step, 10) for i in range(count)]


def plan_sweep(
    table: SensitivityTable,
    budgets: Sequence[float],
    solvers: Sequence[str],
    constraints: Constraints = Constraints(),
    uniform: bool = True,
) -> tuple[list[SweepPoint], dict[str, dict[str, str]], list[str]]:
    """Solve every (solver, budget) and, if ``uniform``, add one point per option applied to every layer.

    Returns the points, the allocations by hash (module -> option label) and notes on budgets
    that could not be met (infeasible for the table's options, e.g. below its lowest option).
    """
    points: list[SweepPoint] = []
    allocations: dict[str, dict[str, str]] = {}
    notes: list[str] = []
    loss = table.loss(constraints.loss)
    for solver in solvers:
        for bpw in budgets:
            try:
                bitmap = solve(table, Budget.bpw(bpw), constraints, solver=solver)
            except BitallocError as exc:
                notes.append(f"{solver} at {bpw:g} bpw: {exc}")
                continue
            options = bitmap.options()
            key = allocation_hash(options)
            allocations[key] = options
            points.append(
                SweepPoint(solver, bpw, None, bitmap.predicted_bpw, bitmap.predicted_loss, bitmap.solver.seconds, key, _histogram(options))
            )
    for index, label in enumerate(table.labels if uniform else []):
        usable = table.available(constraints.loss)[:, index]
        if not usable.all():
            notes.append(f"uniform {label}: not available for every layer")
            continue
        options = {name: label for name in table.names}
        key = allocation_hash(options)
        allocations[key] = options
        bpw = float(table.bits[:, index].sum() / table.total_numel)
        points.append(SweepPoint(UNIFORM, None, label, bpw, float(loss[:, index].sum()), 0.0, key, {label: table.num_layers}))
    return points, allocations, notes


def _histogram(options: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for label in options.values():
        counts[label] = counts.get(label, 0) + 1
    return dict(sorted(counts.items()))


@dataclass
class Measured:
    perplexity: float
    ppl_ratio: float
    kl: float


def measure_allocations(
    model: PreTrainedModel,
    windows: torch.Tensor,
    weights: OptionWeights,
    allocations: dict[str, dict[str, str]],
    done: dict[str, Measured],
    on_chunk: Callable[[dict[str, Measured], float], None],
    chunk: int = 4,
    progress: bool = True,
    device: torch.device = CPU,
) -> None:
    """Evaluate every allocation not in ``done`` (``chunk`` at a time, each chunk sharing one
    reference pass); ``on_chunk(measured, reference_ppl)`` is called as each chunk ends."""
    todo = [key for key in allocations if key not in done]
    for start in range(0, len(todo), chunk):
        keys = todo[start : start + chunk]
        overlays = {key: weights.assemble(allocations[key]) for key in keys}
        results = evaluate(model, windows, overlays, progress, device)
        del overlays
        reference = results["reference"].perplexity
        measured = {key: Measured(results[key].perplexity, results[key].perplexity / reference, results[key].kl) for key in keys}
        done.update(measured)
        on_chunk(measured, reference)


def apply_measured(points: Sequence[SweepPoint], measured: dict[str, Measured]) -> None:
    """Copy measured numbers onto every point whose allocation was measured."""
    for point in points:
        result = measured.get(point.allocation)
        if result is not None:
            point.perplexity, point.ppl_ratio, point.kl = result.perplexity, result.ppl_ratio, result.kl


def prediction_quality(points: Sequence[SweepPoint]) -> dict[str, Any]:
    """Correlation of predicted (additive) loss with measured KL over the measured points."""
    pairs = sorted({(p.allocation, p.predicted_loss, p.kl) for p in points if p.kl is not None and p.predicted_loss > 0})
    if len(pairs) < 3:
        return {"points": len(pairs)}
    predicted = np.array([p[1] for p in pairs])
    kl = np.array([max(p[2], 1e-12) for p in pairs])
    from scipy.stats import pearsonr, spearmanr

    return {
        "points": len(pairs),
        "pearson_log": float(pearsonr(np.log(predicted), np.log(kl))[0]),
        "spearman": float(spearmanr(predicted, kl)[0]),
    }


def sweep_record(
    table: SensitivityTable, points: Sequence[SweepPoint], settings: dict[str, Any], notes: Sequence[str], reference_ppl: float | None
) -> dict[str, Any]:
    return {
        "schema_version": SWEEP_SCHEMA_VERSION,
        "model": table.key.model,
        "table_key": table.key.digest(),
        "loss_name": settings.get("loss") or table.default_loss,
        "settings": settings,
        "reference_perplexity": reference_ppl,
        "notes": list(notes),
        "points": [{**asdict(p), "name": p.name} for p in points],
        "prediction": prediction_quality(points),
    }


def load_measured(path: Path, table: SensitivityTable, settings: dict[str, Any]) -> tuple[dict[str, Measured], float | None]:
    """Measured allocations of an earlier run of the same sweep (same table and eval settings); a
    missing, unreadable or damaged record counts as none (it is only a resume point)."""
    try:
        data = read_json(path, "sweep record") if is_file(path, "sweep record") else None
    except BitallocError:
        return {}, None
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict) or not isinstance(data.get("points"), list):
        return {}, None
    if data.get("table_key") != table.key.digest() or data["settings"].get("eval") != settings.get("eval"):
        return {}, None
    done = {}
    for p in data["points"]:
        values = [p.get(k) for k in ("perplexity", "ppl_ratio", "kl")] if isinstance(p, dict) else [None]
        if isinstance(p, dict) and isinstance(p.get("allocation"), str) and all(isinstance(v, (int, float)) for v in values):
            done[p["allocation"]] = Measured(*(float(v) for v in values))
    reference = data.get("reference_perplexity")
    return done, float(reference) if isinstance(reference, (int, float)) else None


def save_sweep(path: Path, record: dict[str, Any]) -> None:
    write_json(path, record)


def sweep_markdown(points: Sequence[SweepPoint], record: Mapping[str, Any]) -> str:
    """The sweep as a Markdown table (solvers first, then the uniform points), with the prediction quality."""
    lines = ["| point | bpw | predicted loss | ppl | ppl ratio | KL | solve ms |", "|---|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (p.solver == UNIFORM, p.solver, p.bpw)):
        measured = (f"{p.perplexity:.2f} | {p.ppl_ratio:.3f} | {p.kl:.4f}" if p.perplexity is not None else "- | - | -")
        lines.append(f"| {p.name} | {p.bpw:.3f} | {p.predicted_loss:.4g} | {measured} | {p.solve_seconds * 1000:.1f} |")
    prediction = record["prediction"]
    return "\n".join(lines) + "\n\n" + (
        f"Predicted vs measured KL over {prediction['points']} distinct allocations: Pearson (log-log) "
        f"{prediction['pearson_log']:.3f}, Spearman {prediction['spearman']:.3f}\n" if "spearman" in prediction else "")


def run_pareto(
    profile: Path,
    out: Path,
    solvers: Sequence[str],
    start: float,
    stop: float,
    step: float,
    loss: str | None = None,
    tie: bool = True,
    corpus: str = "enwiki",
    seqlen: int = 512,
    tokens: int = 16384,
    chunk: int = 4,
    measure: bool = True,
    uniform: bool = True,
    model: str | None = None,
    progress: bool = True,
    say: Callable[[str], None] = print,
    device: torch.device = CPU,
    dtype: torch.dtype | None = torch.float32,
) -> str:
    """``bitalloc pareto``: solve every budget of ``start..stop`` by ``step`` with each solver (and each
    option uniformly) from the table at ``profile``, measure every distinct allocation from the kept
    option weights (resuming what ``out/pareto.json`` already holds), and write ``out/pareto.json``,
    ``pareto.md`` and ``pareto.png``. Returns the Markdown summary."""
    unknown = [s for s in solvers if s not in SOLVERS]
    if unknown or not solvers:
        raise BitallocError(f"unknown solver {unknown[0] if unknown else '(none given)'!r}; choose from {', '.join(SOLVERS)}")
    budgets = budgets_between(start, stop, step)
    if out.exists() and not out.is_dir():
        raise BitallocError(f"--out {out} exists and is not a directory")
    table = SensitivityTable.load(profile)
    table.loss(loss)  # an unknown loss name fails here, in one line
    constraints = Constraints(loss=loss, tie=tie)
    weights = None
    if measure:
        weights = OptionWeights.beside(cached_table_path(table), table.labels)
        missing = weights.missing(table.names)
        if missing:
            raise BitallocError(f"{len(missing)} layers of this profile have no kept weights in {weights.directory}; "
                                "run bitalloc profile again with the same settings (it keeps them by default)")
    if 0 < budgets[-1] <= MAX_BPW:  # budgets outside are skipped below, each with its note
        warn_if_above_widest(table, Budget.bpw(budgets[-1]))  # once for the sweep, not per solved budget
    points, allocations, notes = plan_sweep(table, budgets, solvers, constraints, uniform=uniform)
    for note in notes:
        logging.getLogger("bitalloc").warning("skipped: %s", note)
    settings = {"budgets": budgets, "solvers": list(solvers), "loss": loss, "tie": tie,
                "eval": {"corpus": corpus, "seqlen": seqlen, "tokens": tokens}}
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / SWEEP_JSON
    reference_ppl = None
    if weights is not None:
        done, reference_ppl = load_measured(json_path, table, settings)
        loaded = load_model(model or table.key.model, dtype)
        if table.metadata.get("model_fingerprint") not in (None, model_fingerprint(loaded.model)):
            raise BitallocError(f"{model or table.key.model} is not the model this profile was made from (weights differ)")
        windows = evaluation_tokens(loaded, load_corpus(corpus), EvalSettings(seqlen=seqlen, tokens=tokens))
        apply_measured(points, done)

        def record(measured: dict[str, Measured], reference: float) -> None:
            nonlocal reference_ppl
            reference_ppl = reference
            apply_measured(points, measured)
            save_sweep(json_path, sweep_record(table, points, settings, notes, reference_ppl))

        say(f"{len(allocations)} distinct allocations from {len(points)} points; {len([k for k in allocations if k in done])} measured before")
        measure_allocations(loaded.model, windows, weights, allocations, done, record, chunk, progress, device)
    final = sweep_record(table, points, settings, notes, reference_ppl)
    save_sweep(json_path, final)
    summary = sweep_markdown(points, final)
    with atomic_path(out / SWEEP_MARKDOWN) as tmp:
        tmp.write_text(summary)
    if weights is not None:
        plot_pareto(points, out / SWEEP_PLOT, f"{table.key.model}: measured ppl vs bpw ({tokens} eval tokens)", reference_ppl)
    return summary


__all__ = [
    "SweepPoint",
    "Measured",
    "budgets_between",
    "plan_sweep",
    "measure_allocations",
    "apply_measured",
    "prediction_quality",
    "sweep_record",
    "load_measured",
    "save_sweep",
    "sweep_markdown",
    "run_pareto",
]
