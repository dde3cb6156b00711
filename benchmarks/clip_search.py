"""GPTQ with a searched clipping range (``clip=mse``) in the option set -> results/clip_search.md.

Issue 4's lever for the mixed-at-(b - 0.5) target: GPTQ's min-max group grids spend their few levels on each
group's outliers. With ``clip=mse`` each group's range is shrunk by the factor with the least diag(H)-weighted
rounding error (quantizers/grid.py). Per model, the default option set with its GPTQ options (2/3/4 bits, g128)
fitted that way is profiled exactly as results/allocation.md profiles the default set (64 x 512 calibration
tokens, kept weights, the same single-layer KL settings per model), the ILP is solved on the same loss at
2.0-3.5 bpw, and every allocation and uniform option is measured on the same evaluation windows. allocation.md's
saved ILP and uniform rows (min-max GPTQ) are quoted beside them, so both columns share protocol and windows.
"""

from __future__ import annotations

import argparse
import json

from _common import RESULTS
from finer_options import profile_and_sweep


OPTION_SPECS = ["binary", "gptq2:clip=mse", "gptq3:clip=mse", "gptq4:clip=mse"]
SETTINGS = {
    # as in results/allocation.md: SmolLM2 with every option's KL measured, Gemma3 from one anchor
    "smollm2-135m": {"tokens": 16384, "kl_anchors": None, "loss": "kl"},
    "gemma3-270m": {"tokens": 4096, "kl_anchors": ["gptq-w3g128-mse"], "loss": "kl_est"},
}
BUDGETS = [2.0, 2.5, 3.0, 3.5]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(SETTINGS))
    parser.add_argument("--render", action="store_true", help="only rewrite clip_search.md from the saved results")
    args = parser.parse_args()
    for model in args.models.split(","):
        if model not in SETTINGS:
            raise SystemExit(f"unknown model {model!r}; choose from {', '.join(SETTINGS)}")
        if args.render:
            continue
        settings = SETTINGS[model]
        out = RESULTS / "clip_search" / model
        profile_and_sweep(model, OPTION_SPECS, settings["kl_anchors"], [settings["loss"]], BUDGETS, settings["tokens"], out)
    (RESULTS / "clip_search.md").write_text(report())
    print(RESULTS / "clip_search.md")


def uniform_gptq(sweep: dict) -> dict[int, dict]:
    """Uniform GPTQ points by bit width (labels ``gptq-w<bits>g128[-mse]``)."""
    return {int(p["option"].split("-w")[1][0]): p for p in sweep["points"] if p["solver"] == "uniform" and p["option"].startswith("gptq-")}


def report() -> str:
    lines = ["# GPTQ with a searched clipping range in the option set", "", __doc__.split("\n\n", 1)[1].strip(), ""]
    for model, settings in SETTINGS.items():
        run_path = RESULTS / "clip_search" / model / "run.json"
        if not run_path.is_file():
            continue
        meta = json.loads(run_path.read_text())
        loss = settings["loss"]
        new = json.loads((RESULTS / "clip_search" / model / loss / "pareto.json").read_text())
        old = json.loads((RESULTS / "allocation" / model / loss / "pareto.json").read_text())
        kl = meta["kl_measurement"]
        lines += [f"## {model}", "", meta["provenance"].rstrip(), f"- options: {', '.join(meta['labels'])}",
                  f"- profile: {meta['profile_layer_seconds'] / 60:.1f} min of per-layer work; single-layer KL of "
                  f"{kl.get('anchors') or 'every option'} ({kl.get('windows')} x {kl.get('seqlen')} calibration tokens): "
                  f"{kl.get('seconds', 0) / 60:.1f} min",
                  f"- evaluation: {new['settings']['eval']['tokens']} tokens (the windows of results/allocation.md), reference "
                  f"perplexity {new['reference_perplexity']:.3f}; ILP on `{loss}`", ""]
        ilp_new = {p["target_bpw"]: p for p in new["points"] if p["solver"] == "ilp"}
        ilp_old = {p["target_bpw"]: p for p in old["points"] if p["solver"] == "ilp"}
        lines += ["| budget | ILP, min-max GPTQ options (allocation.md): ppl | KL | ILP, mse GPTQ options: ppl | KL | options used |",
                  "|---|---|---|---|---|---|"]
        for bpw in sorted(ilp_new):
            p, q = ilp_new[bpw], ilp_old.get(bpw)
            used = ", ".join(f"{k} x{v}" for k, v in sorted(p["bits_histogram"].items()))
            before = f"{q['perplexity']:.2f} | {q['kl']:.4f}" if q else "- | -"
            lines.append(f"| {bpw:g} | {before} | {p['perplexity']:.2f} | {p['kl']:.4f} | {used} |")
        u_new, u_old = uniform_gptq(new), uniform_gptq(old)
        lines += ["", "Uniform GPTQ g128 (one option on every linear, kept one-shot weights):", "",
                  "| bits | bpw | min-max: ppl | KL | mse: ppl | KL |", "|---|---|---|---|---|---|"]
        for bits in sorted(u_new):
            p, q = u_new[bits], u_old.get(bits)
            before = f"{q['perplexity']:.2f} | {q['kl']:.4f}" if q else "- | -"
            lines.append(f"| {bits} | {p['bpw']:.3f} | {before} | {p['perplexity']:.2f} | {p['kl']:.4f} |")
        lines += ["", "Target (mixed at b - 0.5 bpw no worse than uniform GPTQ at b), each mixed allocation against uniform GPTQ "
                  "of its own option set and against the paper's min-max GPTQ:", ""]
        for bits, target in ((3, 2.5), (4, 3.5)):
            if target not in ilp_new or bits not in u_new:
                continue
            m = ilp_new[target]["perplexity"]
            for name, u in (("mse", u_new.get(bits)), ("min-max", u_old.get(bits))):
                if u:
                    verdict = "meets" if m <= u["perplexity"] else "misses"
                    lines.append(f"- ILP (mse options) at {target:g} bpw: ppl {m:.2f} vs uniform {name} gptq-w{bits}g128 at "
                                 f"{u['bpw']:.3f} bpw: {u['perplexity']:.2f} -> {verdict}")
        lines.append("")
    lines += ["Notes", "- The 4-bit caveat of results/allocation.md applies: both references are dequantized from 4-bit grids.",
              "- Both columns are one-shot (each layer quantized alone on the reference inputs), as in allocation.md.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
