"""Mixed-precision allocation vs uniform GPTQ on the real models -> results/allocation.md.

Per model: ``bitalloc profile`` (default options: the 1-bit family and GPTQ 2/3/4 g128; 64 x 512
calibration tokens; weights kept), then ``bitalloc pareto`` at 2.0/2.5/3.0/3.5 bpw with every solver
(results/allocation/<model>/pareto.{json,md,png}; the sweep resumes if interrupted). Every allocation,
the uniform ones included, is measured on the same evaluation windows from the profile's kept
weights (each layer quantized alone on the reference inputs), so solver and uniform points compare
like with like; the sequential uniform GPTQ numbers of results/uniform.md are quoted beside them.
"""

from __future__ import annotations

import argparse
import json
import time

from _common import RESULTS, provenance

from allocator.cli import main as bitalloc
from allocator.corpus import load_corpus
from allocator.models import load_model
from allocator.profile import cached_table_path, profile_model
from allocator.storage import write_json

MODELS = ("smollm2-135m", "gemma3-270m")
SOLVERS = "ilp,ilp-cvxpy,convex,baq,dp,greedy"
GPTQ_BY_BITS = {2: "gptq-w2g128", 3: "gptq-w3g128", 4: "gptq-w4g128"}


def run_model(model: str, args: argparse.Namespace) -> dict:
    out = RESULTS / "allocation" / model
    meta_path = out / "run.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    start = time.perf_counter()
    loaded = load_model(model)
    table = profile_model(loaded, load_corpus("enwiki"), samples=args.samples, seqlen=512)
    profile_seconds = time.perf_counter() - start
    del loaded
    code = bitalloc(["pareto", "--profile", str(cached_table_path(table)), "--from", str(args.start), "--to", str(args.stop),
                     "--step", str(args.step), "--solvers", SOLVERS, "--tokens", str(args.tokens), "--out", str(out)])
    if code != 0:
        raise SystemExit(f"pareto failed for {model}")
    if "provenance" not in meta:
        meta = {"provenance": provenance(), "profile_layer_seconds": table.metadata.get("layer_seconds"),
                "profile_wall_seconds": profile_seconds}
    meta["sweep_wall_seconds"] = meta.get("sweep_wall_seconds", 0.0) + time.perf_counter() - start - profile_seconds
    write_json(meta_path, meta)
    return {"meta": meta, "sweep": json.loads((out / "pareto.json").read_text())}


def section(model: str, data: dict) -> str:
    sweep, meta = data["sweep"], data["meta"]
    points = sweep["points"]
    lines = [f"## {model}", "", meta["provenance"].rstrip(),
             f"- profile: {meta['profile_layer_seconds'] / 60:.1f} min of per-layer work (7 options x every linear), "
             f"{meta['profile_wall_seconds'] / 60:.1f} min wall including calibration (0 if it was cached)",
             f"- reference perplexity: {sweep['reference_perplexity']:.3f}", "",
             f"![measured ppl vs bpw](allocation/{model}/pareto.png)", "",
             "| budget | solver | bpw | predicted loss | ppl | ppl ratio | KL | solve ms |", "|---|---|---|---|---|---|---|---|"]
    solved = sorted((p for p in points if p["solver"] != "uniform"), key=lambda p: (p["target_bpw"], p["solver"]))
    for p in solved:
        lines.append(f"| {p['target_bpw']:g} | {p['solver']} | {p['bpw']:.3f} | {p['predicted_loss']:.4g} | {p['perplexity']:.2f} | "
                     f"{p['ppl_ratio']:.3f} | {p['kl']:.4f} | {p['solve_seconds'] * 1000:.1f} |")
    lines += ["", "Uniform (one option on every linear, same one-shot weights):", "",
              "| option | bpw | predicted loss | ppl | ppl ratio | KL |", "|---|---|---|---|---|---|"]
    uniform = {p["option"]: p for p in points if p["solver"] == "uniform"}
    for p in sorted(uniform.values(), key=lambda p: p["bpw"]):
        lines.append(f"| {p['option']} | {p['bpw']:.3f} | {p['predicted_loss']:.4g} | {p['perplexity']:.2f} | {p['ppl_ratio']:.3f} | {p['kl']:.4f} |")
    prediction = sweep["prediction"]
    if "spearman" in prediction:
        lines += ["", f"Predicted ({sweep['loss_name']}, summed over layers) vs measured KL over {prediction['points']} distinct "
                      f"allocations: Spearman {prediction['spearman']:.3f}, Pearson of logs {prediction['pearson_log']:.3f}."]
    ilp = {p["target_bpw"]: p for p in solved if p["solver"] == "ilp"}
    checks = []
    for bits, label in GPTQ_BY_BITS.items():
        if label not in uniform:
            continue
        u = uniform[label]
        for target in sorted(ilp):
            if target <= u["bpw"] - 0.5 + 1e-9 and target > u["bpw"] - 1.0:
                m = ilp[target]
                verdict = "meets" if m["perplexity"] <= u["perplexity"] else "misses"
                checks.append(f"- ILP at {target:g} bpw ({m['bpw']:.3f}): ppl {m['perplexity']:.2f} vs uniform {label} at {u['bpw']:.3f} bpw: "
                              f"{u['perplexity']:.2f} -> {verdict} the target (mixed at >= 0.5 bpw less is no worse)")
    if checks:
        lines += ["", "Target check (mixed at b - 0.5 bpw <= uniform GPTQ at b bpw):", "", *checks]
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
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--from", dest="start", type=float, default=2.0)
    parser.add_argument("--to", dest="stop", type=float, default=3.5)
    parser.add_argument("--step", type=float, default=0.5)
    args = parser.parse_args()
    sections = [section(model, run_model(model, args)) for model in args.models.split(",")]
    header = (
        "# Mixed-precision allocation vs uniform GPTQ\n\n"
        f"Budgets {args.start:g}..{args.stop:g} bpw by {args.step:g} (honest bits of the quantized linears), solvers {SOLVERS}; "
        f"loss = Hessian-weighted output error of each layer quantized alone; evaluation: {args.tokens // 512} windows of 512 "
        "tokens of the enwiki evaluation split; calibration: 64 x 512 tokens of the calibration split.\n\n"
    )
    (RESULTS / "allocation.md").write_text(header + "\n".join(sections))


if __name__ == "__main__":
    main()
