"""Issue 4's target read literally: mixed at b - 0.5 bpw against uniform GPTQ at b bpw -> results/budget_matched.md.

results/allocation.md checks the target against GPTQ at 3 and 4 bits with groups of 128 (3.16 and 4.17 bpw), the
nearest integer widths. Here "uniform GPTQ at b bpw" is taken as written, for b = 2.5, 3.0 and 3.5: the uniform GPTQ
configuration (per-row or power-of-two groups) whose stored size is the first at or above b (so the uniform side
never gets fewer bits than b): 2 bits in groups of 32 (2.56 bpw), 3 bits with one group per row (3.03) and 3 bits in
groups of 32 (3.59), each with the paper's min-max grid and with ``clip=mse``. They are profiled (64 x 512
calibration tokens, kept one-shot weights, as in allocation.md) and measured on allocation.md's evaluation windows;
the mixed allocations at b - 0.5 are the ILP rows already measured on those windows in allocation.md (min-max GPTQ
options) and clip_search.md (mse GPTQ options). ``--ladder`` adds a third: the ILP with the budget-matched mse
configurations themselves among its options (the 1-bit family and mse GPTQ at 2 bits g128/g32, 3 bits
per-row/g128/g32 and 4 bits g128, every option's single-layer KL measured), so a mixed allocation can take, layer by
layer, whatever the uniform side uses. Its uniform points are not measured again (they are in clip_search.md and the
table below).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from _common import RESULTS, chosen_models, provenance
from finer_options import profile_and_sweep

from allocator.jobs.compare import EvalSettings, evaluation_tokens
from allocator.jobs.pareto import Measured, measure_allocations, plan_sweep
from allocator.measure.option_weights import OptionWeights
from allocator.measure.profile import cached_table_path, profile_model
from allocator.model.corpus import load_corpus
from allocator.model.loading import load_model
from allocator.solvers import Constraints
from allocator.storage import write_json
from allocator.table.options import parse_options

BUDGET_MATCHED = {2.5: "gptq2:group_size=32", 3.0: "gptq3:group_size=-1", 3.5: "gptq3:group_size=32"}
"""b -> the GPTQ configuration whose bpw is the first at or above b (both models' shapes)."""
TOKENS = {"smollm2-135m": 16384, "gemma3-270m": 4096}
"""Evaluation tokens: allocation.md's per model, so its windows and reference are shared."""
MIXED_SOURCES = {"min-max GPTQ options (allocation.md)": "allocation", "mse GPTQ options (clip_search.md)": "clip_search"}
"""Mixed rows already measured: their label -> the results directory of their sweep (``<model>/<loss>/pareto.json``)."""
LOSSES = {"smollm2-135m": ["kl"], "gemma3-270m": ["kl_est", "kl"]}
"""The losses of the mixed sweeps per model; the first is allocation.md's (the min-max rows exist only on it)."""
LADDER = ["binary", "gptq2:clip=mse", "gptq2:group_size=32,clip=mse", "gptq3:group_size=-1,clip=mse", "gptq3:clip=mse",
          "gptq3:group_size=32,clip=mse", "gptq4:clip=mse"]
LADDER_SOURCE = "mse GPTQ ladder options (--ladder)"
LADDER_LOSS = "kl"


def ladder_dir(model: str) -> Path:
    return RESULTS / "budget_matched" / model / "ladder"


def option_specs() -> list[str]:
    return [spec + clip for spec in BUDGET_MATCHED.values() for clip in ("", ",clip=mse")]


def measure(model: str, out: Path) -> None:
    """Profile the budget-matched options and measure each uniformly (resumable: measured labels are kept)."""
    results_path = out / "uniform.json"
    saved = json.loads(results_path.read_text()) if results_path.is_file() else {"points": {}}
    loaded = load_model(model)
    corpus = load_corpus("enwiki")
    table = profile_model(loaded, corpus, options=parse_options(option_specs()), samples=64, seqlen=512)
    points, allocations, notes = plan_sweep(table, [], [], Constraints(loss="hessian_err"))
    if notes:
        raise SystemExit("; ".join(notes))
    weights = OptionWeights.beside(cached_table_path(table), table.labels)
    windows = evaluation_tokens(loaded, corpus, EvalSettings(seqlen=512, tokens=TOKENS[model]))
    by_key = {p.allocation: p for p in points}
    done = {p.allocation: Measured(**saved["points"][p.option]["measured"]) for p in points if p.option in saved["points"]}

    def record(measured: dict[str, Measured], reference: float) -> None:
        saved["reference_perplexity"] = reference
        for key, m in measured.items():
            saved["points"][by_key[key].option] = {"bpw": by_key[key].bpw, "measured": vars(m)}
        saved.update(provenance=provenance(), tokens=TOKENS[model], profile_layer_seconds=table.metadata.get("layer_seconds"))
        write_json(results_path, saved)

    measure_allocations(loaded.model, windows, weights, allocations, done, record, chunk=3)


def uniform_curve(model: str, loss: str, mse: bool) -> list[tuple[float, float]]:
    """Measured (bpw, ppl) of uniform GPTQ of one grid fit: the budget-matched points and the g128 ones of
    clip_search.md (mse) or allocation.md (min-max), sorted by bpw."""
    saved = json.loads((RESULTS / "budget_matched" / model / "uniform.json").read_text())["points"]
    points = [(p["bpw"], p["measured"]["perplexity"]) for label, p in saved.items() if label.endswith("-mse") == mse]
    g128 = json.loads((RESULTS / ("clip_search" if mse else "allocation") / model / loss / "pareto.json").read_text())
    points += [(p["bpw"], p["perplexity"]) for p in g128["points"] if p["solver"] == "uniform" and p["option"].startswith("gptq-")]
    return sorted(points)


def mse_uniform_above(model: str, bpw: float) -> dict | None:
    """The measured uniform mse GPTQ configuration that mixed at ``bpw`` is held against (the one at or above
    ``bpw`` + 0.5, from uniform.json), or None where ``bpw`` + 0.5 is not one of :data:`BUDGET_MATCHED`."""
    spec = BUDGET_MATCHED.get(bpw + 0.5)
    if spec is None:
        return None
    saved = json.loads((RESULTS / "budget_matched" / model / "uniform.json").read_text())["points"]
    return saved.get(parse_options([spec])[0].label + "-mse")


def uniform_bpw_for(ppl: float, curve: list[tuple[float, float]]) -> str:
    """The bpw uniform GPTQ needs for ``ppl``: linear in log ppl between neighbouring measured points."""
    for (b0, p0), (b1, p1) in zip(curve, curve[1:]):
        if p1 <= ppl <= p0:
            return f"{b0 + (b1 - b0) * (math.log(p0) - math.log(ppl)) / (math.log(p0) - math.log(p1)):.2f}"
    return f"< {curve[0][0]:.2f}" if ppl > curve[0][1] else f"> {curve[-1][0]:.2f}"


def ladder_lines(model: str) -> list[str]:
    """Where the ``--ladder`` rows come from (their own run), if there are any."""
    path = ladder_dir(model) / "run.json"
    if not path.is_file():
        return []
    meta = json.loads(path.read_text())
    run = "; ".join(line.removeprefix("- ") for line in meta["provenance"].splitlines() if line.startswith(("- command", "- commit")))
    return [f"- ladder rows: {run}; options {', '.join(meta['labels'])}, every option's single-layer KL measured "
            "(its timings shared the CPU with other jobs)"]


def report() -> str:
    lines = ["# Mixed at b - 0.5 bpw against uniform GPTQ at b bpw", "", __doc__.split("\n\n", 1)[1].strip()]
    for model, losses in LOSSES.items():
        path = RESULTS / "budget_matched" / model / "uniform.json"
        if not path.is_file():
            continue
        saved = json.loads(path.read_text())
        uniform = saved["points"]
        lines += ["", f"## {model}", "", saved["provenance"].rstrip(),
                  f"- evaluation: {saved['tokens']} tokens, reference perplexity {saved['reference_perplexity']:.3f}; "
                  f"mixed rows: ILP on {' and '.join(f'`{loss}`' for loss in losses)}", *ladder_lines(model), "",
                  "| b | uniform GPTQ | bpw | ppl (min-max) | ppl (mse) | mixed at b - 0.5 | ppl | verdict | "
                  "uniform bpw at this ppl |", "|---|---|---|---|---|---|---|---|---|"]
        curves = {mse: uniform_curve(model, losses[0], mse) for mse in (False, True)}
        sweep_paths = {}
        for loss in losses:
            named = (lambda source: source) if len(losses) == 1 else (lambda source: f"{source}, ILP on `{loss}`")
            sweep_paths.update({named(source): RESULTS / directory / model / loss / "pareto.json"
                                for source, directory in MIXED_SOURCES.items()})
        sweep_paths[LADDER_SOURCE] = ladder_dir(model) / LADDER_LOSS / "pareto.json"
        sweeps = {source: json.loads(path.read_text()) for source, path in sweep_paths.items() if path.is_file()}
        for b, spec in BUDGET_MATCHED.items():
            label = parse_options([spec])[0].label
            plain, clipped = uniform[label], uniform[f"{label}-mse"]
            for source, sweep in sweeps.items():
                mixed = next(p for p in sweep["points"] if p["solver"] == "ilp" and p["target_bpw"] == b - 0.5)
                # like for like: a mixed allocation against the uniform GPTQ of its own grid fit
                mse = "mse" in source
                reference = clipped if mse else plain
                verdict = "meets" if mixed["perplexity"] <= reference["measured"]["perplexity"] else "misses"
                lines.append(f"| {b:g} | {label} | {plain['bpw']:.3f} | {plain['measured']['perplexity']:.2f} | "
                             f"{clipped['measured']['perplexity']:.2f} | {source} at {mixed['bpw']:.3f} bpw | "
                             f"{mixed['perplexity']:.2f} | {verdict} (vs {'mse' if mse else 'min-max'}) | "
                             f"{uniform_bpw_for(mixed['perplexity'], curves[mse])} |")
    lines += ["", "Notes",
              "- Every row is one-shot (each layer quantized alone on the reference inputs, kept weights), as in allocation.md.",
              "- The uniform side is given at least b bpw (the next configuration up), never fewer.",
              "- Uniform bpw at this ppl: where the measured uniform GPTQ curve of the same grid fit (the table's points and "
              "the g128 ones, linear in log ppl between neighbours) reaches the mixed row's ppl; the target asks for at "
              "least the mixed bpw + 0.5."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(TOKENS))
    parser.add_argument("--render", action="store_true", help="only rewrite budget_matched.md from the saved results")
    parser.add_argument("--ladder", action="store_true", help="also profile and sweep the ladder option set (every option's KL)")
    args = parser.parse_args()
    for model in chosen_models(args.models, TOKENS):
        if not args.render:
            measure(model, RESULTS / "budget_matched" / model)
        if args.ladder and not args.render:
            # every uniform option is measured in the two sweeps above
            profile_and_sweep(model, LADDER, None, [LADDER_LOSS], [b - 0.5 for b in BUDGET_MATCHED], TOKENS[model],
                              ladder_dir(model), uniform=False)
    (RESULTS / "budget_matched.md").write_text(report())
    print(RESULTS / "budget_matched.md")


if __name__ == "__main__":
    main()
