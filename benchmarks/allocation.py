"""Mixed-precision allocation vs uniform GPTQ on the real models -> results/allocation.md.

Per model: ``bitalloc profile`` (default options: the 1-bit family and GPTQ 2/3/4 g128; 64 x 512
calibration tokens; weights kept), the single-layer KL of every (layer, option) from the kept
weights (``bitalloc profile --measure-kl``: 1 x 256 calibration tokens), then ``bitalloc pareto`` at
2.0/2.5/3.0/3.5 bpw with every solver, once minimizing the Hessian-weighted output error and once
the measured KL (results/allocation/<model>/<loss>/pareto.{json,md,png}; sweeps resume if
interrupted, and an allocation measured in one sweep is not measured again in the other); the
additive prediction of every table loss is checked against all measured allocations. Every allocation,
the uniform ones included, is measured on the same evaluation windows from the profile's kept
weights (each layer quantized alone on the reference inputs), so solver and uniform points compare
like with like; the sequential uniform GPTQ numbers of results/uniform.md are quoted beside them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

import numpy as np
from _common import RESULTS, provenance
from scipy.stats import pearsonr, spearmanr

from allocator.jobs.compare import EvalSettings
from allocator.jobs.pareto import plan_sweep, run_pareto
from allocator.jobs.run import print_run, run_job, save_run
from allocator.measure.layer_kl import add_kl_losses, calibrated_kl
from allocator.measure.profile import cached_table_path, profile_model
from allocator.model.corpus import load_corpus
from allocator.model.loading import load_model
from allocator.solvers import Budget, Constraints
from allocator.storage import cache_dir, write_json
from allocator.table.options import parse_options

MODELS = ("smollm2-135m", "gemma3-270m")
SOLVERS = "ilp,ilp-cvxpy,convex,baq,dp,greedy"
GPTQ_BY_BITS = {2: "gptq-w2g128", 3: "gptq-w3g128", 4: "gptq-w4g128"}
LOSSES = ("kl", "kl_est", "hessian_err")
"""The sweeps, in report order: the measured single-layer KL (allocator/measure/layer_kl.py; ``kl`` when every
option's KL is measured, --kl-anchors all, else ``kl_est`` from anchors only), then the profile's
default proxy."""


NOTES = """Notes
- hessian_err: tr((W-Q) H (W-Q)^T) with H from the layer's calibration inputs, i.e. the layer's output error in
  its own units. kl: mean per-token KL(reference || model) with only that layer quantized, on 1 x 256
  calibration tokens. kl_est: hessian_err times a per-layer gain (geometric mean of kl / hessian_err over the
  layer's measured options); the "anchor ... only" rows use one option's measured KL for the gain, which is
  what `bitalloc run` measures (one forward per layer instead of one per (layer, option)).
- The agreement table is computed over allocations chosen by these very losses (solver outputs and uniform
  options), not random ones; it says how well each loss ranks the allocations a solver would pick.
- One-shot weights are what the table's losses describe and make a sweep cheap. `bitalloc quantize` / `run`
  quantize a bit map sequentially instead (GPTQ-family layers see the quantized prefix), which results/uniform.md
  shows helps uniform GPTQ at 2-3 bits (the sequential numbers are quoted in each section).
- 4-bit numbers: both references are themselves dequantized from 4-bit grids (SmolLM2 from Q4_1, blocks of 32; Gemma3
  from a Q4_K_M file), so a 4-bit quantizer can partly re-find the grid the reference came from. That may flatter uniform
  gptq-w4g128, the uniform side of the 3.5-bpw target check, against the 3-bit and 1-2-bit options a mixed allocation
  at 3.5 bpw also uses (not measured: no float-trained model of these families is available here).
- Timings (solve ms, quantize s, wall min) were taken while other jobs shared the 2 cores: indicative only; the
  solver timing target is measured on an idle machine in results/solver_timing.md.
"""


def run_model(model: str, args: argparse.Namespace) -> dict:
    out = RESULTS / "allocation" / model
    meta_path = out / "run.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    loaded = load_model(model)
    corpus = load_corpus("enwiki")
    table = profile_model(loaded, corpus, samples=args.samples, seqlen=512)
    anchors = None if args.kl_anchors == "all" else args.kl_anchors.split(",")
    table = add_kl_losses(loaded, table, cached_table_path(table), corpus.calibration, anchors, windows=1, seqlen=256)
    del loaded
    measured_kl = "kl" if anchors is None else "kl_est"
    wanted = [measured_kl if loss == "auto" else loss for loss in args.losses.split(",")]
    # a sweep not rerun keeps its saved points (the agreement table is computed over every sweep)
    sweeps = {loss: json.loads((out / loss / "pareto.json").read_text()) for loss in LOSSES
              if loss not in wanted and (out / loss / "pareto.json").is_file()}
    for loss in wanted:
        directory = out / loss
        directory.mkdir(parents=True, exist_ok=True)
        earlier = [out / other / "pareto.json" for other in LOSSES if other != loss and (out / other / "pareto.json").is_file()]
        if not (directory / "pareto.json").is_file() and earlier:
            shutil.copy(earlier[0], directory / "pareto.json")  # its measured allocations are reused, not re-measured
        run_pareto(cached_table_path(table), directory, args.solvers.split(","), args.start, args.stop, args.step, loss=loss,
                   tokens=args.tokens)
        sweeps[loss] = json.loads((directory / "pareto.json").read_text())
    sweeps = {loss: sweeps[loss] for loss in sorted(sweeps, key=LOSSES.index)}
    meta["provenance"] = provenance()
    meta["profile_layer_seconds"] = table.metadata.get("layer_seconds")
    meta["kl_measurement"] = table.metadata.get("kl_measurement", {})
    meta["loss_agreement"] = loss_agreement(table, sweeps)
    write_json(meta_path, meta)
    return {"meta": meta, "sweeps": sweeps}


def run_sequential(model: str, budgets: list[float]) -> None:
    """``bitalloc run`` at each budget (the README's main job); its rows, loss and wall time are kept
    in results/allocation/<model>/sequential/run-<bpw>.json (the packed model stays in the cache)."""
    directory = RESULTS / "allocation" / model / "sequential"
    directory.mkdir(parents=True, exist_ok=True)
    for bpw in budgets:
        path = directory / f"run-{bpw:g}.json"
        if path.is_file():
            continue
        work = cache_dir("allocation-runs") / f"{model}-{bpw:g}"
        start = time.perf_counter()
        loaded, corpus, settings = load_model(model), load_corpus("enwiki"), EvalSettings()
        budget = Budget.bpw(bpw)
        # the main job as it was when this file was measured: the default options, kl_est from gptq-w3g128
        result = run_job(loaded, corpus, parse_options(["default"]), budget, "ilp", settings, ["gptq-w3g128"])
        print_run(result, model, budget)
        save_run(work, result, loaded, model, "enwiki", settings)
        rows = json.loads((work / "rows.json").read_text())["rows"]
        bitmap = json.loads((work / "bitmap.json").read_text())
        write_json(path, {"provenance": provenance(), "command": f"bitalloc run --model {model} --bpw {bpw:g}", "bpw": bpw,
                          "loss_name": bitmap.get("loss_name"), "wall_seconds": time.perf_counter() - start, "rows": rows})


def saved_results(model: str) -> dict | None:
    """A model's results from an earlier run (so one model's rerun keeps the other's section)."""
    out = RESULTS / "allocation" / model
    if not (out / "run.json").is_file():
        return None
    sweeps = {loss: json.loads((out / loss / "pareto.json").read_text()) for loss in LOSSES if (out / loss / "pareto.json").is_file()}
    return {"meta": json.loads((out / "run.json").read_text()), "sweeps": sweeps}


def loss_agreement(table, sweeps: dict) -> list[dict]:
    """Per table loss: rank and log-linear correlation of its additive prediction with the measured KL
    over every allocation measured in any sweep (they are re-solved: the solvers are deterministic)."""
    allocations = {}
    for sweep in sweeps.values():
        settings = sweep["settings"]
        allocations.update(plan_sweep(table, settings["budgets"], settings["solvers"], Constraints(loss=settings["loss"]))[1])
    measured = {p["allocation"]: p["kl"] for sweep in sweeps.values() for p in sweep["points"] if p.get("kl") is not None}
    keys = sorted(k for k in allocations if k in measured)
    kl = np.array([measured[k] for k in keys])
    rows = {n: i for i, n in enumerate(table.names)}
    columns = {label: j for j, label in enumerate(table.labels)}
    candidates = {name: table.loss(name) for name in table.loss_names}
    measured_kl = table.losses.get("kl")
    if measured_kl is not None and np.isfinite(measured_kl[table.bits >= 0]).all():
        for j, label in enumerate(table.labels):  # the cheap variant: the gain from one anchor option
            only = np.full_like(measured_kl, np.nan)
            only[:, j] = measured_kl[:, j]
            candidates[f"kl_est, anchor {label} only"] = calibrated_kl(table.loss("hessian_err"), only)
    result = []
    for name, loss in candidates.items():
        predicted = np.array([sum(loss[rows[n], columns[o]] for n, o in allocations[k].items()) for k in keys])
        if not np.isfinite(predicted).all():
            continue  # a loss measured for some options only cannot price every allocation
        result.append({"loss": name, "allocations": len(keys), "spearman": float(spearmanr(predicted, kl)[0]),
                       "pearson_log": float(pearsonr(np.log(predicted), np.log(kl))[0])})
    return result


def section(model: str, data: dict) -> str:
    sweeps, meta = data["sweeps"], data["meta"]
    first = next(iter(sweeps.values()))
    kl_settings = meta.get("kl_measurement", {})
    lines = [f"## {model}", "", meta["provenance"].rstrip(),
             f"- profile: {meta['profile_layer_seconds'] / 60:.1f} min of per-layer work (7 options x every linear)",
             f"- single-layer KL ({kl_settings.get('anchors')} options, {kl_settings.get('windows')} x {kl_settings.get('seqlen')} "
             f"calibration tokens, from the kept weights): {kl_settings['seconds'] / 60:.1f} min",
             f"- sweeps: solvers {', '.join(first['settings']['solvers'])}; evaluation {first['settings']['eval']['tokens']} tokens",
             f"- reference perplexity: {first['reference_perplexity']:.3f}", "",
             "### Does the additive prediction hold?", "",
             "Each table loss summed over the layers of an allocation, against that allocation's measured KL, over every allocation "
             "measured below (both sweeps):", "",
             "| loss | allocations | Spearman | Pearson of logs |", "|---|---|---|---|"]
    for row in meta.get("loss_agreement", []):
        lines.append(f"| {row['loss']} | {row['allocations']} | {row['spearman']:.3f} | {row['pearson_log']:.3f} |")
    uniform = {p["option"]: p for p in first["points"] if p["solver"] == "uniform"}
    for loss, sweep in sweeps.items():
        points = sweep["points"]
        lines += ["", f"### Solvers minimizing `{loss}`", "", f"![measured ppl vs bpw](allocation/{model}/{loss}/pareto.png)", "",
                  "| budget | solver | bpw | predicted loss | ppl | ppl ratio | KL | solve ms |", "|---|---|---|---|---|---|---|---|"]
        solved = sorted((p for p in points if p["solver"] != "uniform"), key=lambda p: (p["target_bpw"], p["solver"]))
        for p in solved:
            lines.append(f"| {p['target_bpw']:g} | {p['solver']} | {p['bpw']:.3f} | {p['predicted_loss']:.4g} | {p['perplexity']:.2f} | "
                         f"{p['ppl_ratio']:.3f} | {p['kl']:.4f} | {p['solve_seconds'] * 1000:.1f} |")
        ilp = {p["target_bpw"]: p for p in solved if p["solver"] == "ilp"}
        checks = []
        for label in GPTQ_BY_BITS.values():
            u = uniform.get(label)
            for target in sorted(ilp) if u else []:
                if u["bpw"] - 1.0 < target <= u["bpw"] - 0.5 + 1e-9:
                    m = ilp[target]
                    verdict = "meets" if m["perplexity"] <= u["perplexity"] else "misses"
                    checks.append(f"- ILP at {target:g} bpw: ppl {m['perplexity']:.2f} vs uniform {label} at {u['bpw']:.3f} bpw: "
                                  f"{u['perplexity']:.2f} -> {verdict} the target")
        if checks:
            lines += ["", "Target (mixed at b - 0.5 bpw no worse than uniform GPTQ at b):", "", *checks]
    lines += ["", "### Uniform (one option on every linear, the same one-shot weights)", "",
              "| option | bpw | ppl | ppl ratio | KL |", "|---|---|---|---|---|"]
    for p in sorted(uniform.values(), key=lambda p: p["bpw"]):
        lines.append(f"| {p['option']} | {p['bpw']:.3f} | {p['perplexity']:.2f} | {p['ppl_ratio']:.3f} | {p['kl']:.4f} |")
    runs = sorted((RESULTS / "allocation" / model / "sequential").glob("run-*.json"))
    if runs:
        lines += ["", "### The main job: the ILP map quantized sequentially (`bitalloc run`)", "",
                  "`bitalloc run --model M --bpw B` (profile cached, KL measured, ILP on the default loss, then every layer quantized "
                  "by its option in layer order on the quantized prefix, as GPTQ does, and evaluated on 16k tokens):", "",
                  "| budget | loss | bpw | ppl | ppl ratio | KL | quantize s | wall min |", "|---|---|---|---|---|---|---|---|"]
        for path in runs:
            run = json.loads(path.read_text())
            row = next(r for r in run["rows"] if r["name"] != "reference")
            lines.append(f"| {run['bpw']:g} | {run['loss_name']} | {row['bpw']:.3f} | {row['perplexity']:.2f} | {row['ppl_ratio']:.3f} | "
                         f"{row['kl']:.4f} | {row['quantize_seconds']:.0f} | {run['wall_seconds'] / 60:.1f} |")
    uniform_seq = RESULTS / "uniform" / f"{model}.json"
    if uniform_seq.is_file():
        rows = [r for r in json.loads(uniform_seq.read_text())["rows"] if r["name"] in GPTQ_BY_BITS.values()]
        if rows:
            lines += ["", "Sequential uniform GPTQ (results/uniform.md, each block on the quantized prefix): "
                      + "; ".join(f"{r['name']} {r['bpw']:.3f} bpw ppl {r['perplexity']:.2f}" for r in rows) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--render", action="store_true", help="only rewrite allocation.md from the saved results (no model is run)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--from", dest="start", type=float, default=2.0)
    parser.add_argument("--to", dest="stop", type=float, default=3.5)
    parser.add_argument("--step", type=float, default=0.5)
    parser.add_argument("--solvers", default=SOLVERS)
    parser.add_argument("--sequential", default="", help="also run `bitalloc run` at these budgets (comma-separated bpw)")
    parser.add_argument("--losses", default="auto,hessian_err",
                        help="sweeps to run, in order ('auto': kl, or kl_est when only anchors are measured; default auto,hessian_err)")
    parser.add_argument("--kl-anchors", default="all", help="options whose single-layer KL is measured ('all' or labels)")
    args = parser.parse_args()
    wanted = [] if args.render else args.models.split(",")
    results = {model: run_model(model, args) for model in wanted}
    for model in wanted:
        run_sequential(model, [float(b) for b in args.sequential.split(",") if b.strip()])
    results.update({model: saved for model in MODELS if model not in results and (saved := saved_results(model))})
    sections = [section(model, results[model]) for model in [*MODELS, *wanted] if model in results]
    sections = list(dict.fromkeys(sections))
    header = (
        "# Mixed-precision allocation vs uniform GPTQ\n\n"
        "Budgets in honest bits per weight of the quantized linears. Every allocation, the uniform ones included, is built "
        "from the profile's kept one-shot weights (each layer quantized alone on the reference inputs) and measured on "
        "windows of 512 tokens of the enwiki evaluation split; calibration: 64 x 512 tokens of the calibration split. "
        "Each model's sweep settings (solvers, evaluation tokens) are listed in its section.\n\n"
    )
    (RESULTS / "allocation.md").write_text(header + "\n".join(sections) + "\n" + NOTES)


if __name__ == "__main__":
    main()
