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

from _common import RESULTS, chosen_models
from finer_options import options_used, profile_and_sweep

OPTION_SPECS = ["binary", "gptq2:clip=mse", "gptq3:clip=mse", "gptq4:clip=mse"]
SETTINGS = {
    # as in results/allocation.md: SmolLM2 with every option's KL measured, Gemma3 from one anchor; Gemma3 then also
    # with every option's KL measured (its one-anchor kl_est misprices the 1-bit options, see clip_search.md)
    "smollm2-135m": {"tokens": 16384, "sweeps": [(None, "kl")]},
    "gemma3-270m": {"tokens": 4096, "sweeps": [(["gptq-w3g128-mse"], "kl_est"), (None, "kl")]},
}
"""Per model: evaluation tokens, and the (KL anchors or None for every option, loss) of each ILP sweep, in order."""
BUDGETS = [2.0, 2.5, 3.0, 3.5]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(SETTINGS))
    parser.add_argument("--render", action="store_true", help="only rewrite clip_search.md from the saved results")
    args = parser.parse_args()
    for model in chosen_models(args.models, SETTINGS):
        if args.render:
            continue
        settings = SETTINGS[model]
        out = RESULTS / "clip_search" / model
        for anchors, loss in settings["sweeps"]:
            profile_and_sweep(model, OPTION_SPECS, anchors, [loss], BUDGETS, settings["tokens"], out)
    (RESULTS / "clip_search.md").write_text(report())
    print(RESULTS / "clip_search.md")


def uniform_gptq(sweep: dict) -> dict[int, dict]:
    """Uniform GPTQ points by bit width (labels ``gptq-w<bits>g128[-mse]``)."""
    return {int(p["option"].split("-w")[1][0]): p for p in sweep["points"] if p["solver"] == "uniform" and p["option"].startswith("gptq-")}


def kl_line(meta: dict, sweeps: list[tuple[list[str] | None, str]]) -> str:
    """The KL measurement's line: what was measured, and what each ``kl_est`` sweep was calibrated on."""
    kl = meta["kl_measurement"]
    measured = "every option" if kl.get("anchors") == "all" else ", ".join(kl.get("anchors", []))
    line = (f"- single-layer KL of {measured} ({kl.get('windows')} x {kl.get('seqlen')} calibration tokens): "
            f"{kl.get('seconds', 0) / 60:.1f} min")
    for anchors, loss in sweeps:
        if anchors is not None and loss == "kl_est":
            line += f"; `kl_est` calibrated on {', '.join(anchors)} only"
    return line


def report() -> str:
    lines = ["# GPTQ with a searched clipping range in the option set", "", __doc__.split("\n\n", 1)[1].strip(), ""]
    for model, settings in SETTINGS.items():
        run_path = RESULTS / "clip_search" / model / "run.json"
        if not run_path.is_file():
            continue
        meta = json.loads(run_path.read_text())
        losses = [loss for _, loss in settings["sweeps"] if (RESULTS / "clip_search" / model / loss / "pareto.json").is_file()]
        new = {loss: json.loads((RESULTS / "clip_search" / model / loss / "pareto.json").read_text()) for loss in losses}
        first = losses[0]  # allocation.md's loss for this model: the min-max rows are quoted from its sweep
        old = json.loads((RESULTS / "allocation" / model / first / "pareto.json").read_text())
        lines += [f"## {model}", "", meta["provenance"].rstrip(), f"- options: {', '.join(meta['labels'])}",
                  f"- profile: {meta['profile_layer_seconds'] / 60:.1f} min of per-layer work", kl_line(meta, settings["sweeps"]),
                  f"- evaluation: {new[first]['settings']['eval']['tokens']} tokens (the windows of results/allocation.md), "
                  f"reference perplexity {new[first]['reference_perplexity']:.3f}", ""]
        ilp_new = {loss: {p["target_bpw"]: p for p in sweep["points"] if p["solver"] == "ilp"} for loss, sweep in new.items()}
        ilp_old = {p["target_bpw"]: p for p in old["points"] if p["solver"] == "ilp"}
        header = f"| budget | ILP on `{first}`, min-max GPTQ options (allocation.md): ppl | KL |"
        header += "".join(f" ILP on `{loss}`, mse GPTQ options: ppl | KL | options used |" for loss in losses)
        lines += [header, "|---|---|---|" + "---|---|---|" * len(losses)]
        for bpw in sorted(ilp_new[first]):
            q = ilp_old.get(bpw)
            row = f"| {bpw:g} | " + (f"{q['perplexity']:.2f} | {q['kl']:.4f} |" if q else "- | - |")
            for loss in losses:
                p = ilp_new[loss].get(bpw)
                row += f" {p['perplexity']:.2f} | {p['kl']:.4f} | {options_used(p)} |" if p else " - | - | - |"
            lines.append(row)
        u_new, u_old = uniform_gptq(new[first]), uniform_gptq(old)
        lines += ["", "Uniform GPTQ g128 (one option on every linear, kept one-shot weights):", "",
                  "| bits | bpw | min-max: ppl | KL | mse: ppl | KL |", "|---|---|---|---|---|---|"]
        for bits in sorted(u_new):
            p, q = u_new[bits], u_old.get(bits)
            before = f"{q['perplexity']:.2f} | {q['kl']:.4f}" if q else "- | -"
            lines.append(f"| {bits} | {p['bpw']:.3f} | {before} | {p['perplexity']:.2f} | {p['kl']:.4f} |")
        lines += ["", "Target (mixed at b - 0.5 bpw no worse than uniform GPTQ at b), each mixed allocation against uniform GPTQ "
                  "of its own option set and against the paper's min-max GPTQ:", ""]
        for loss in losses:
            for bits, target in ((3, 2.5), (4, 3.5)):
                if target not in ilp_new[loss] or bits not in u_new:
                    continue
                m = ilp_new[loss][target]["perplexity"]
                for name, u in (("mse", u_new.get(bits)), ("min-max", u_old.get(bits))):
                    if u:
                        verdict = "meets" if m <= u["perplexity"] else "misses"
                        lines.append(f"- ILP on `{loss}` (mse options) at {target:g} bpw: ppl {m:.2f} vs uniform {name} "
                                     f"gptq-w{bits}g128 at {u['bpw']:.3f} bpw: {u['perplexity']:.2f} -> {verdict}")
        lines.append("")
    lines += ["Notes", "- The 4-bit caveat of results/allocation.md applies: both references are dequantized from 4-bit grids.",
              "- Both columns are one-shot (each layer quantized alone on the reference inputs), as in allocation.md.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
