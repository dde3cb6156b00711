"""A longer single-layer KL measurement in the ILP's loss -> results/kl_windows.md.

Issue 4's lever for the like-for-like target: clip_search.md's ``kl`` loss is each (layer, option)'s KL with only that
layer quantized, measured on 1 x 256 calibration tokens. That is few tokens for telling a layer's 3-bit from its
4-bit damage, and shorter than the 512-token evaluation windows. Here the same profile (clip_search.py's option set,
mse GPTQ, 64 x 512 calibration tokens, kept one-shot weights) is given the single-layer KL of every option on
``--windows`` x ``--seqlen`` calibration tokens (default 2 x 512, four times as many), the ILP is solved on it at
2.0-3.5 bpw, and each allocation is measured on the evaluation windows of results/allocation.md. Each row is set
beside clip_search.md's ILP on the 1 x 256 measurement and against budget_matched.md's like-for-like target.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from _common import RESULTS
from budget_matched import TOKENS, mse_uniform_above, uniform_bpw_for, uniform_curve
from clip_search import BUDGETS, OPTION_SPECS
from finer_options import options_used, profile_and_sweep
from scipy.stats import spearmanr

from allocator.measure.profile import cached_table_path, profile_model
from allocator.model.corpus import load_corpus
from allocator.model.loading import load_model
from allocator.storage import write_json
from allocator.table.losses import KL_MEASURED
from allocator.table.options import parse_options
from allocator.table.sensitivity import SensitivityTable

BASELINE = (1, 256)
"""The measurement clip_search.md's ``kl`` rows were solved on (windows, tokens)."""


def baseline_kl(model: str) -> tuple[np.ndarray, Path]:
    """The cached profile's 1 x 256 single-layer KL (measured by clip_search.py), before it is replaced, and the
    profile's path."""
    loaded = load_model(model)
    table = profile_model(loaded, load_corpus("enwiki"), options=parse_options(OPTION_SPECS), samples=64, seqlen=512)
    done = table.metadata.get("kl_measurement") or {}
    if (done.get("windows"), done.get("seqlen"), done.get("anchors")) != (*BASELINE, "all"):
        raise SystemExit(f"the cached {model} profile holds no {BASELINE[0]} x {BASELINE[1]} KL of every option; "
                         "run benchmarks/clip_search.py first")
    return table.loss(KL_MEASURED), cached_table_path(table)


def agreement(before: np.ndarray, after: np.ndarray) -> dict:
    """How far the two measurements agree: rank correlation over every (layer, option), and the median relative change."""
    both = np.isfinite(before) & np.isfinite(after) & (after > 0)
    return {"pairs": int(both.sum()), "spearman": float(spearmanr(before[both], after[both]).statistic),
            "median_relative_change": float(np.median(np.abs(before[both] - after[both]) / after[both]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(TOKENS))
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--render", action="store_true", help="only rewrite kl_windows.md from the saved results")
    args = parser.parse_args()
    out = RESULTS / "kl_windows" / args.model
    if not args.render:
        before, table_path = baseline_kl(args.model)
        _, meta = profile_and_sweep(args.model, OPTION_SPECS, None, ["kl"], BUDGETS, TOKENS[args.model], out, uniform=False,
                                    kl_windows=args.windows, kl_seqlen=args.seqlen)
        after = SensitivityTable.load(table_path).loss(KL_MEASURED)  # profile_and_sweep saved the longer measurement there
        write_json(out / "run.json", {**meta, "agreement_with_1x256": agreement(before, after)})
    (RESULTS / "kl_windows.md").write_text(report(args.model))
    print(RESULTS / "kl_windows.md")


def report(model: str) -> str:
    meta = json.loads((RESULTS / "kl_windows" / model / "run.json").read_text())
    longer = json.loads((RESULTS / "kl_windows" / model / "kl" / "pareto.json").read_text())
    shorter = json.loads((RESULTS / "clip_search" / model / "kl" / "pareto.json").read_text())
    kl, agree = meta["kl_measurement"], meta["agreement_with_1x256"]
    size = f"{kl['windows']} x {kl['seqlen']}"
    lines = [f"# A longer single-layer KL measurement ({model})", "", __doc__.split("\n\n", 1)[1].strip(), "",
             meta["provenance"].rstrip(), f"- options: {', '.join(meta['labels'])}",
             f"- single-layer KL of every option on {size} calibration tokens: {kl.get('seconds', 0) / 60:.1f} min",
             f"- against the 1 x 256 measurement over {agree['pairs']} (layer, option) pairs: Spearman {agree['spearman']:.3f}, "
             f"median relative change {agree['median_relative_change']:.1%}",
             f"- evaluation: {longer['settings']['eval']['tokens']} tokens, reference perplexity {longer['reference_perplexity']:.3f}", "",
             f"| budget | ILP on 1 x 256 KL: ppl | KL | ILP on {size} KL: ppl | KL | options used | uniform mse GPTQ at budget + 0.5: "
             f"ppl | verdict | uniform bpw at this ppl |", "|---|---|---|---|---|---|---|---|---|"]
    ilp = {name: {p["target_bpw"]: p for p in sweep["points"] if p["solver"] == "ilp"} for name, sweep in
           (("shorter", shorter), ("longer", longer))}
    curve = uniform_curve(model, "kl", mse=True)
    for bpw in sorted(ilp["longer"]):
        p, q = ilp["longer"][bpw], ilp["shorter"].get(bpw)
        reference = mse_uniform_above(model, bpw)
        target = "- | - |"
        if reference:
            ppl = reference["measured"]["perplexity"]
            target = f"{ppl:.2f} ({reference['bpw']:.3f} bpw) | {'meets' if p['perplexity'] <= ppl else 'misses'} |"
        lines.append(f"| {bpw:g} | " + (f"{q['perplexity']:.2f} | {q['kl']:.4f}" if q else "- | -")
                     + f" | {p['perplexity']:.2f} | {p['kl']:.4f} | {options_used(p)} | {target} {uniform_bpw_for(p['perplexity'], curve)} |")
    lines += ["", "Notes", "- One-shot kept weights throughout, as in allocation.md; the uniform side is budget_matched.md's mse "
              "configuration at or above budget + 0.5 bpw.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
