"""The main job (``bitalloc run``): profile -> single-layer KL -> solve -> quantize -> eval for one
budget, and what it saves. The CLI and the benchmarks call :func:`run_job`."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from allocator.evaluate.accounting import model_size_bytes
from allocator.evaluate.report import print_rows, rows_to_json
from allocator.evaluate.rows import VariantRow
from allocator.jobs.compare import EvalSettings, compare_quantized, evaluation_tokens, quantize_assignment
from allocator.measure.distributed import RaySettings
from allocator.measure.features_pass import FEATURE_PASS_SAMPLES, FEATURE_PASS_SEQLEN, FISHER_TWIN_SEQLEN, features_table
from allocator.measure.layer_kl import add_kl_losses
from allocator.measure.profile import cached_table_path, profile_model
from allocator.model.corpus import Corpus
from allocator.model.loading import LoadedModel
from allocator.model.placement import CPU
from allocator.quantize.apply import QuantizedModel
from allocator.runtime.packed import bitmap_source, save_quantized
from allocator.solvers import Budget, Solver, solve, warn_if_above_widest
from allocator.table.bitmap import BitMap
from allocator.table.sensitivity import Option, SensitivityTable

BITMAP_FILE = "bitmap.json"
PACKED_DIR = "packed"
ROWS_FILE = "rows.json"
"""What :func:`save_run` writes into the job's directory."""

RUN_OPTIONS = ["main"]
"""``bitalloc run``'s candidate options (:data:`allocator.table.options.MAIN_JOB_OPTION_SPECS`)."""
RUN_KL_SEQLEN = 128
"""Tokens of the one calibration window ``bitalloc run`` measures every (layer, option)'s single-layer KL on: on
SmolLM2 at 2.5 bpw the ILP on it lands within 4.5% ppl of 256 tokens at half the KL measurement's cost, while one
anchor's KL (kl_est) or the Fisher loss miss by 9% and 44% (results/sensitivity.md)."""


@dataclass
class RunResult:
    """Everything the main job made, in data-path order."""

    table: SensitivityTable
    bitmap: BitMap
    quantized: QuantizedModel
    rows: list[VariantRow]
    windows: torch.Tensor
    """The evaluation windows the rows were measured on."""
    seconds: float
    stage_seconds: dict[str, float]
    """Wall seconds of each stage, in order (profile, kl, solve, quantize, eval; kl absent when not measured)."""


def run_job(
    loaded: LoadedModel,
    corpus: Corpus,
    options: Sequence[Option],
    budget: Budget,
    solver: str | Solver,
    settings: EvalSettings,
    kl_anchors: list[str] | None,
    measure_kl: bool = True,
    progress: bool = True,
    kl_seqlen: int | None = None,
    say: Callable[[str], None] = print,
    device: torch.device = CPU,
    ray: RaySettings | None = None,
    features_only: bool = False,
    fisher_windows: int = 0,
    fisher_seqlen: int = FISHER_TWIN_SEQLEN,
    price: Callable[[SensitivityTable], SensitivityTable] | None = None,
    activation_statistics: bool = True,
) -> RunResult:
    """Profile ``loaded`` under ``options`` (cached, resumable), add the single-layer KL of
    ``kl_anchors`` (None: every option; on one window of ``kl_seqlen`` calibration tokens, default 256) unless
    ``measure_kl`` is off, allocate ``budget`` with
    ``solver``, quantize by the bit map (GPTQ-family layers in order on the quantized prefix) and
    evaluate against the reference. ``say`` reports each stage. The blocks of the profile, the quantization and the
    evaluation run on ``device`` (:mod:`allocator.model.placement`); with ``ray`` the profile's options are quantized, and
    the single-layer KLs measured, on that Ray cluster (:mod:`allocator.measure.distributed`,
    :mod:`allocator.measure.distributed_kl`). With ``features_only`` the features pass (its Fisher input on
    ``fisher_windows`` x ``fisher_seqlen`` tokens when ``fisher_windows`` > 0; without its calibration forward unless
    ``activation_statistics``) replaces the profile and the KL, and ``price`` (e.g. a loss model's prediction, added as
    the table's default loss) turns its table into the one solved."""
    start = time.perf_counter()
    stages: dict[str, float] = {}
    windows = evaluation_tokens(loaded, corpus, settings)  # bad settings fail before any work
    if features_only:  # a features-only policy reads the features pass alone: no profile, no KL
        samples, seqlen = min(FEATURE_PASS_SAMPLES, settings.samples), min(FEATURE_PASS_SEQLEN, settings.seqlen)
        fisher = f"the Fisher input on {fisher_windows} x {fisher_seqlen} calibration tokens" if fisher_windows else ""
        if activation_statistics:
            say(f"[1/4] features pass: {len(options)} options per layer priced by calibration-free twins on {samples} x {seqlen} calibration "
                f"tokens{', ' + fisher if fisher else ''} (cached)")
        else:
            say(f"[1/4] features pass (weights{' and ' + fisher if fisher else ' only'}): {len(options)} options per layer priced by "
                "calibration-free twins (cached)")
        tick = time.perf_counter()
        table = features_table(loaded, corpus, list(options), samples=samples, seqlen=seqlen, seed=settings.seed, progress=progress,
                               device=device, fisher_windows=fisher_windows, fisher_seqlen=fisher_seqlen,
                               activation_statistics=activation_statistics)
        if price is not None:
            table = price(table)
        stages["features"] = time.perf_counter() - tick
        return _finish_job(loaded, corpus, table, budget, solver, settings, progress, say, device, windows, stages, start)
    say(f"[1/4] profile: {len(options)} options per layer on {settings.samples} x {settings.seqlen} calibration tokens (cached, resumable)")
    tick = time.perf_counter()
    table = profile_model(loaded, corpus, list(options), samples=settings.samples, seqlen=settings.seqlen, seed=settings.seed, progress=progress,
                          device=device, ray=ray)
    stages["profile"] = time.perf_counter() - tick
    if measure_kl:
        say(f"      single-layer KL of {', '.join(kl_anchors) if kl_anchors else 'every option'} (cached)")
        tick = time.perf_counter()
        table = add_kl_losses(loaded, table, cached_table_path(table), corpus.calibration, kl_anchors, seqlen=kl_seqlen, progress=progress,
                              device=device, ray=ray)
        stages["kl"] = time.perf_counter() - tick
    return _finish_job(loaded, corpus, table, budget, solver, settings, progress, say, device, windows, stages, start)


def _finish_job(loaded: LoadedModel, corpus: Corpus, table: SensitivityTable, budget: Budget, solver: str | Solver, settings: EvalSettings,
                progress: bool, say: Callable[[str], None], device: torch.device, windows: torch.Tensor, stages: dict[str, float],
                start: float) -> RunResult:
    """Solve, quantize and evaluate: the job's stages after its table."""
    name = solver if isinstance(solver, str) else solver.name
    say(f"[2/4] solve: {name} at {budget}, minimizing {table.default_loss}")
    tick = time.perf_counter()
    warn_if_above_widest(table, budget)
    bitmap = solve(table, budget, solver=solver)
    stages["solve"] = time.perf_counter() - tick
    counts: dict[str, int] = {}
    for entry in bitmap.modules.values():
        counts[entry.option] = counts.get(entry.option, 0) + 1
    say(f"      {bitmap.predicted_bpw:.4f} bpw; " + ", ".join(f"{label} x{n}" for label, n in sorted(counts.items())))
    say("[3/4] quantize (GPTQ-family layers in order, on the quantized prefix)")
    tick = time.perf_counter()
    quantized = quantize_assignment(loaded, corpus, bitmap.assignment(), settings, progress, device=device, keep_dequantized=False)
    stages["quantize"] = time.perf_counter() - tick
    row_name = f"{name}@{budget.value:g}bpw" if budget.kind == "bpw" else f"{name}@{budget}"
    say("[4/4] eval")
    tick = time.perf_counter()
    rows = compare_quantized(loaded, corpus, {row_name: quantized}, settings, {row_name: stages["quantize"]}, progress, windows, device)
    stages["eval"] = time.perf_counter() - tick
    return RunResult(table, bitmap, quantized, rows, windows, time.perf_counter() - start, stages)


def stage_line(stages: dict[str, float]) -> str:
    """``load 3.1 s, profile 212.0 s, ... = total 540.2 s``: where the main job's time went."""
    return ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in stages.items()) + f" = total {sum(stages.values()):.1f} s"


def _stages_with_load(result: RunResult, load_seconds: float | None) -> dict[str, float]:
    """The job's stage seconds, after the model's loading where it was timed (the CLI loads before the job)."""
    return {**({"load": load_seconds} if load_seconds is not None else {}), **result.stage_seconds}


def print_run(result: RunResult, model: str, budget: Budget, load_seconds: float | None = None) -> None:
    """The main job's table on the terminal, and the time of each stage (``load_seconds``: the model's loading, if timed)."""
    name = result.bitmap.solver.name
    shown = f"{budget.value:g} bpw" if budget.kind == "bpw" else str(budget)
    print_rows(result.rows, title=f"{model}: {name} allocation at {shown} - {result.windows.numel()} eval tokens")
    print("stages: " + stage_line(_stages_with_load(result, load_seconds)))


def save_run(out: Path, result: RunResult, loaded: LoadedModel, model: str, corpus_name: str, settings: EvalSettings,
             load_seconds: float | None = None) -> None:
    """``out/bitmap.json``, the packed model in ``out/packed`` and the rows in ``out/rows.json``, each
    written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    result.bitmap.save(out / BITMAP_FILE)
    calibration = {"corpus": corpus_name, "samples": settings.samples, "seqlen": settings.seqlen, "seed": settings.seed,
                   "true_sequential": settings.true_sequential}
    save_quantized(out / PACKED_DIR, model, result.quantized, result.bitmap.assignment(), result.bitmap.options(),
                   model_size_bytes(loaded.model, result.quantized), bitmap_source(result.bitmap, BITMAP_FILE, calibration))
    rows_to_json(out / ROWS_FILE, result.rows, {"model": model, "settings": vars(settings), "wall_seconds": result.seconds,
                                                "stage_seconds": _stages_with_load(result, load_seconds)})
