"""Finer options between the GPTQ steps -> results/finer_options.md.

Issue 4's lever for the mixed-at-(b - 0.5) target: give the solver 3-bit GPTQ at groups of 64 and 32
(3.31 and 3.63 bpw) between gptq-w3g128 (3.16) and gptq-w4g128 (4.17). The model is profiled with the
default options plus these (64 x 512 calibration tokens, kept weights) and the single-layer KL of every
option is measured (1 x 256 tokens), as for allocation.md's ``kl`` sweep; ``bitalloc pareto`` solves the
ILP at the budgets on each ``--losses`` entry (default ``kl``, like for like with allocation.md) and
measures every allocation and every uniform option on the same evaluation windows as
results/allocation.md (16k tokens). allocation.md's default-options ILP on ``kl`` is quoted beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil

from _common import RESULTS, provenance

from allocator.jobs.pareto import run_pareto
from allocator.measure.layer_kl import KL_ESTIMATE_ANCHORS, add_kl_losses
from allocator.measure.profile import cached_table_path, profile_model
from allocator.model.corpus import load_corpus
from allocator.model.loading import load_model
from allocator.storage import write_json
from allocator.table.options import parse_options

EXTRA = ("gptq3:group_size=64", "gptq3:group_size=32")
TARGETS = {3.5: "gptq-w4g128", 2.5: "gptq-w3g128"}
"""Mixed budget -> the uniform option it must not be worse than (allocation.md's target check)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budgets", default="2.5,3.0,3.5")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--losses", default="kl", help="losses the ILP is solved on, one sweep each (default kl)")
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    out = RESULTS / "finer_options" / args.model

    sweeps, meta = profile_and_sweep(args.model, ["default", *EXTRA], None, args.losses.split(","), budgets, args.tokens, out)
    before = json.loads((RESULTS / "allocation" / args.model / "kl" / "pareto.json").read_text())
    (RESULTS / "finer_options.md").write_text(report(args.model, sweeps, before, meta))
    print(RESULTS / "finer_options.md")


def profile_and_sweep(model: str, option_specs: list[str], kl_anchors: list[str] | None, losses: list[str], budgets: list[float],
                      tokens: int, out, uniform: bool = True, kl_windows: int = 1, kl_seqlen: int = 256) -> tuple[dict[str, dict], dict]:
    """Profile ``model`` with these options (64 x 512 calibration tokens, weights kept), measure the single-layer KL
    of ``kl_anchors`` (None: every option; ``kl_windows`` x ``kl_seqlen`` tokens, default 1 x 256), and run ``bitalloc pareto`` (ILP at ``budgets`` and every
    uniform option unless ``uniform`` is False, ``tokens`` evaluation tokens) once per loss into ``out/<loss>``.
    Writes ``out/run.json`` (provenance, profile and KL timings, option labels) and returns ({loss: sweep}, that record)."""
    loaded = load_model(model)
    corpus = load_corpus("enwiki")
    table = profile_model(loaded, corpus, options=parse_options(option_specs), samples=64, seqlen=512)
    table = add_kl_losses(loaded, table, cached_table_path(table), corpus.calibration, kl_anchors, windows=kl_windows, seqlen=kl_seqlen)
    del loaded
    sweeps = {}
    for loss in losses:
        directory = out / loss
        directory.mkdir(parents=True, exist_ok=True)
        earlier = sorted(out.glob("*/pareto.json"))  # another loss's sweep
        if not (directory / "pareto.json").is_file() and earlier:
            shutil.copy(earlier[0], directory / "pareto.json")  # uniform options measured once, not again
        run_pareto(cached_table_path(table), directory, ["ilp"], min(budgets), max(budgets), 0.5, loss=loss, tokens=tokens,
                   uniform=uniform)
        sweeps[loss] = json.loads((directory / "pareto.json").read_text())
    meta = {"provenance": provenance(), "profile_layer_seconds": table.metadata.get("layer_seconds"),
            "kl_measurement": table.metadata.get("kl_measurement", {}), "kl_est_anchors": table.metadata.get(KL_ESTIMATE_ANCHORS),
            "labels": table.labels}
    write_json(out / "run.json", meta)
    return sweeps, meta


def options_used(point: dict) -> str:
    """A sweep point's bits histogram as report text: ``label xcount, ...``."""
    return ", ".join(f"{k} x{v}" for k, v in sorted(point["bits_histogram"].items()))


def report(model: str, sweeps: dict[str, dict], before: dict, meta: dict) -> str:
    sweep = next(iter(sweeps.values()))
    uniform = {p["option"]: p for p in sweep["points"] if p["solver"] == "uniform"}
    old = {p["target_bpw"]: p for p in before["points"] if p["solver"] == "ilp"}
    kl = meta["kl_measurement"]
    lines = [f"# Finer options between the GPTQ steps ({model})", "", meta["provenance"].rstrip(),
             f"- options: {', '.join(meta['labels'])}",
             f"- profile: {meta['profile_layer_seconds'] / 60:.1f} min of per-layer work; single-layer KL of {kl.get('anchors')} "
             f"({kl.get('windows')} x {kl.get('seqlen')} calibration tokens): {kl.get('seconds', 0) / 60:.1f} min",
             f"- evaluation: {sweep['settings']['eval']['tokens']} tokens of the enwiki evaluation split (the windows of "
             f"results/allocation.md), reference perplexity {sweep['reference_perplexity']:.3f}; every allocation is built from the "
             "profile's kept one-shot weights"]
    for loss, sweep in sweeps.items():
        ilp = {p["target_bpw"]: p for p in sweep["points"] if p["solver"] == "ilp"}
        lines += ["", f"## ILP on `{loss}` with the finer options, against the default options", "",
                  "| budget | bpw | ppl | KL | options used | default-options ILP (allocation.md, loss kl): ppl | KL |",
                  "|---|---|---|---|---|---|---|"]
        for bpw in sorted(ilp):
            p, q = ilp[bpw], old.get(bpw)
            used = options_used(p)
            lines.append(f"| {bpw:g} | {p['bpw']:.3f} | {p['perplexity']:.2f} | {p['kl']:.4f} | {used} | "
                         + (f"{q['perplexity']:.2f} | {q['kl']:.4f} |" if q else "- | - |"))
    lines += ["", "## Uniform options (same windows)", "", "| option | bpw | ppl | KL |", "|---|---|---|---|"]
    for label, p in sorted(uniform.items(), key=lambda kv: kv[1]["bpw"]):
        lines.append(f"| {label} | {p['bpw']:.3f} | {p['perplexity']:.2f} | {p['kl']:.4f} |")
    lines += ["", "## Target (mixed at b - 0.5 bpw no worse than uniform GPTQ at b)", ""]
    for loss, sweep in sweeps.items():
        ilp = {p["target_bpw"]: p for p in sweep["points"] if p["solver"] == "ilp"}
        for bpw, label in sorted(TARGETS.items()):
            if bpw in ilp and label in uniform:
                m, u = ilp[bpw], uniform[label]
                verdict = "meets" if m["perplexity"] <= u["perplexity"] else "misses"
                lines.append(f"- ILP on `{loss}` at {bpw:g} bpw with the finer options: ppl {m['perplexity']:.2f} vs uniform {label} "
                             f"at {u['bpw']:.3f} bpw: {u['perplexity']:.2f} -> {verdict} the target")
    lines += ["", "Notes", "- The 4-bit caveat of results/allocation.md applies: the references are dequantized from 4-bit grids.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
