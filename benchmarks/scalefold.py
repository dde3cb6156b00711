"""Scale folding on and off: RTN and GPTQ at 2/3/4 bits and one 1-bit method -> results/scalefold.md.

For every quantizer the model is quantized as it is and after scale folding (allocator/quantize/scalefold.py)
with each alpha setting asked for (default: the global alpha 0.5 and the per-site search), and
every variant is evaluated against the untransformed float reference on the same windows (the
folded float model computes the same function, so the reference is shared). With
``--profiles MODEL=TABLE.npz`` each model also gets mixed allocations: the ILP bit map of its
profile (default loss) at each of ``--mixed`` bpw, quantized by that map (every layer by its own
option, in layer order) with and without the fold. One batch per quantizer or map, each saved to
results/scalefold/<model>.json as soon as it is measured, so an interrupted run resumes with the
batches not yet done (--fresh measures again).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from typing import Any

import torch
from _common import RESULTS, evaluation_protocol, merged_batches, model_section, provenance

from allocator.jobs.compare import EvalSettings, calibration_tokens, compare_quantized, evaluation_tokens
from allocator.model.corpus import load_corpus
from allocator.model.layers import quantizable_linears
from allocator.model.loading import load_model
from allocator.quantize.apply import QuantizedModel, quantize_model, quantize_with_scale_fold
from allocator.quantize.scalefold import DEFAULT_ALPHA, ScaleFoldSettings, parse_alpha
from allocator.solvers import Budget, solve
from allocator.storage import write_json
from allocator.table.sensitivity import SensitivityTable
from quantizers import Quantizer, build_quantizer

MODELS = ("smollm2-135m", "gemma3-270m")
DEFAULT_ALPHAS = f"{DEFAULT_ALPHA},search"
BINARY_CHOICES = {"billm": ("billm", {}), "w1p1": ("w1p1", {}), "xnor-g128": ("xnor", {"group_size": 128})}

COLUMNS = ["method", "scale fold", "bpw", "model MB", "ppl", "ppl ratio", "KL", "quantize s", "alphas chosen"]

NOTES = """\
Notes
- Scale folding (allocator/quantize/scalefold.py): per input channel j, s_j = max|X_j|^alpha / max|W_j|^(1-alpha) (calibration
  absmax of the activations, column max of the weights over the linears sharing that input), divided by its geometric
  mean and clamped to [2^-10, 2^10]; folded at input_layernorm -> q/k/v, v_proj -> o_proj (one scale per value row,
  shared by the query heads of its kv head), post_attention_layernorm (Gemma3: pre_feedforward_layernorm) -> gate/up and
  up_proj -> down_proj. Gemma's (1 + w) norms get (1 + w) / s - 1. The float model's logits are unchanged (tested).
- sf0.5: the global alpha 0.5. sf-search: per fold site, alpha on the grid 0, 0.1, ..., 1 or no fold, whichever gives
  the lowest Hessian-weighted output error of the site's linears under the scoring quantizer (RTN itself; RTN at the
  same bits and group size for GPTQ; XNOR g128 for BiLLM). "alphas chosen" counts the choices over all sites
  ("none": the search kept s = 1).
- bpw is the stored size of all decoder linear layers per weight; folding changes no stored size (the folded norms
  replace the reference's, at the same fp16 in model MB).
- GPTQ and BiLLM: Hessians from calibration windows of the enwiki calibration split, 1% damping, block size 128,
  true-sequential within each decoder block; the fold uses the same calibration windows.
- The SmolLM2 reference is itself dequantized from a Q4_1 GGUF (a 4-bit grid on blocks of 32) and Gemma3's from
  Q4_K_M: 4-bit numbers can look near-lossless partly because the quantizer re-finds that grid -- and folding moves the
  weights off it, which can make folded 4-bit look worse here than it would on a true float model.
- KL is the mean per-token KL(reference || quantized) in nats over the same windows as the perplexity.
- Export: a packed model's saved fold goes into its GGUF (`bitalloc export --quantized`; `export --scale-fold` for a bit
  map or preset). llama.cpp's quantizers on the folded model, and the folded F32 file checked against the reference, are
  in results/gguf_scalefold.md (benchmarks/gguf_presets.py --scale-fold).
"""


def plan(binary: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(batch name, quantizer name, settings): RTN and GPTQ 2/3/4 bits g128, then the 1-bit method."""
    batches = [(f"{name}{bits}", name, {"bits": bits, "group_size": 128}) for name in ("rtn", "gptq") for bits in (2, 3, 4)]
    name, settings = BINARY_CHOICES[binary]
    return batches + [(binary, name, settings)]


def alpha_summary(quantized: QuantizedModel) -> str:
    if quantized.scale_fold is None:
        return ""
    counts = Counter("none" if g.alpha is None else f"{g.alpha:g}" for g in quantized.scale_fold.groups)
    return " ".join(f"{alpha}:{count}" for alpha, count in sorted(counts.items()))


def uniform_assignment(loaded, quantizer: Quantizer) -> tuple[str, dict[str, Quantizer]]:
    return quantizer.label(), {layer: quantizer for layer in quantizable_linears(loaded.model)}


def mixed_assignment(table: SensitivityTable, bpw: float) -> tuple[str, dict[str, Quantizer]]:
    """The ILP bit map of ``table`` at ``bpw`` on its default loss, as per-layer quantizers."""
    bitmap = solve(table, Budget.bpw(bpw))
    return f"ilp@{bpw:g}({bitmap.loss_name})", bitmap.assignment().quantizers()


def measure_batch(loaded, corpus, name: str, assignment: dict[str, Quantizer], folds: list[ScaleFoldSettings],
                  settings: EvalSettings, samples: torch.Tensor, windows: torch.Tensor) -> list[dict[str, Any]]:
    quantized: dict[str, QuantizedModel] = {}
    seconds: dict[str, float] = {}
    fold_of: dict[str, str] = {}
    for fold in [None, *folds]:
        label = name + (f"+{fold.label()}" if fold is not None else "")
        start = time.perf_counter()
        with torch.inference_mode():
            if fold is None:
                qm = quantize_model(loaded.model, assignment, samples, settings.true_sequential, progress=True)
            else:
                qm = quantize_with_scale_fold(loaded.model, assignment, samples, fold, settings.true_sequential, progress=True)
        seconds[label] = time.perf_counter() - start
        quantized[label] = qm
        fold_of[label] = fold.label() if fold is not None else "off"
        print(f"{label}: {qm.bits_per_weight:.3f} bpw, {seconds[label]:.0f} s {alpha_summary(qm)}", flush=True)
    rows = compare_quantized(loaded, corpus, quantized, settings, seconds, True, windows)
    out = []
    for row in rows:
        record = row.as_dict()
        record["scale_fold"] = fold_of.get(row.name, "")
        record["alphas"] = alpha_summary(quantized[row.name]) if row.name in quantized else ""
        out.append(record)
    return out


def reading(rows: list[dict[str, Any]]) -> str:
    """Per method: perplexity and KL with the fold against without it, and where it helps or hurts.
    Computed from the rows (nothing here is typed in by hand)."""
    off = {r["name"]: r for r in rows if r["scale_fold"] == "off"}
    lines, helped, hurt = [], [], []
    for r in rows:
        if r["scale_fold"] in ("", "off"):
            continue
        base = off.get(r["name"].split("+")[0])
        if base is None:
            continue
        change = r["perplexity"] / base["perplexity"] - 1
        (helped if change < 0 else hurt).append(base["name"])
        lines.append(f"- {base['name']} ({base['bpw']:.3f} bpw), {r['scale_fold']}: ppl {base['perplexity']:.4g} -> "
                     f"{r['perplexity']:.4g} ({change:+.1%}), KL {base['kl']:.4f} -> {r['kl']:.4f}")
    if not lines:
        return ""
    summary = (f"The fold lowers perplexity for {len(helped)} of {len(lines)} variants"
               + (f" and raises it for {', '.join(hurt)}" if hurt else "") + ".")
    return "\n".join(["Reading (computed from the table):", "", *lines, "", summary, ""])


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        bpw = "16 (fp)" if r["bpw"] is None else f"{r['bpw']:.3f}"
        method = r["name"].split("+")[0]
        cells = [method, r["scale_fold"], bpw, f"{r['model_mb']:.1f}", f"{r['perplexity']:.2f}", f"{r['ppl_ratio']:.2f}",
                 f"{r['kl']:.4f}", f"{r['quantize_seconds']:.0f}", r["alphas"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--alphas", default=DEFAULT_ALPHAS, help=f"comma-separated fold settings: numbers in [0, 1] or 'search' (default {DEFAULT_ALPHAS})")
    parser.add_argument("--binary", choices=sorted(BINARY_CHOICES), default="billm", help="the 1-bit method (default billm)")
    parser.add_argument("--profiles", default="", help="MODEL=TABLE.npz,...: also measure that profile's ILP maps (see --mixed)")
    parser.add_argument("--mixed", default="2.5,3.0", help="budgets (bpw) of the mixed allocations (default 2.5,3.0)")
    parser.add_argument("--fresh", action="store_true", help="ignore saved per-model results")
    parser.add_argument("--plan", action="store_true", help="print the batches and variants, measure nothing")
    parser.add_argument("--render", action="store_true", help="only rewrite results/scalefold.md from the saved batches")
    args = parser.parse_args()
    settings = EvalSettings(tokens=args.tokens, samples=args.samples)
    folds = [ScaleFoldSettings(alpha=parse_alpha(a)) for a in args.alphas.split(",") if a.strip()]
    batches = plan(args.binary)
    profiles = dict(item.split("=", 1) for item in args.profiles.split(",") if item.strip())
    budgets = [float(b) for b in args.mixed.split(",") if b.strip()]
    if args.plan:
        for batch, name, kwargs in batches:
            label = build_quantizer(name, **kwargs).label()
            print(f"{batch}: {label}, " + ", ".join(f"{label}+{f.label()}" for f in folds))
        for model_name in profiles:
            print(f"{model_name}: ILP maps at {', '.join(f'{b:g}' for b in budgets)} bpw, off and " + ", ".join(f.label() for f in folds))
        return
    saved_dir = RESULTS / "scalefold"
    if not args.render:
        measure(args.models.split(","), settings, folds, batches, profiles, budgets, args.fresh, saved_dir)
    render(saved_dir)


def measure(models: list[str], settings: EvalSettings, folds: list[ScaleFoldSettings], batches: list[tuple[str, str, dict[str, Any]]],
            profiles: dict[str, str], budgets: list[float], fresh: bool, saved_dir) -> None:
    """Measure every batch not yet saved for each model, saving after each one."""
    identity = {"settings": vars(settings), "folds": [f.as_dict() for f in folds]}
    corpus = load_corpus("enwiki")
    for model_name in models:
        saved = saved_dir / f"{model_name}.json"
        data = json.loads(saved.read_text()) if saved.is_file() and not fresh else {}
        if data.get("identity") != identity:
            data = {"model": model_name, "identity": identity, "batches": {}, "provenance": provenance(), "wall_seconds": 0.0}
        profile = SensitivityTable.load(profiles[model_name]) if model_name in profiles else None
        work = [(batch, lambda loaded, name=name, kwargs=kwargs: uniform_assignment(loaded, build_quantizer(name, **kwargs)))
                for batch, name, kwargs in batches]
        work += [(f"mixed{bpw:g}", lambda loaded, bpw=bpw, profile=profile: mixed_assignment(profile, bpw))
                 for bpw in budgets if profile is not None]
        if any(batch not in data["batches"] for batch, _ in work):
            loaded = load_model(model_name)
            windows = evaluation_tokens(loaded, corpus, settings)
            samples = calibration_tokens(loaded, corpus, settings)
            for batch, assign in work:
                if batch in data["batches"]:
                    continue
                start = time.perf_counter()
                name, assignment = assign(loaded)
                data["batches"][batch] = measure_batch(loaded, corpus, name, assignment, folds, settings, samples, windows)
                data["wall_seconds"] += time.perf_counter() - start
                data["provenance"] = provenance()
                write_json(saved, data)


def render(saved_dir) -> None:
    """results/scalefold.md from every model's saved batches."""
    sections = []
    for model_name in MODELS:
        saved = saved_dir / f"{model_name}.json"
        if not saved.is_file():
            continue
        data = json.loads(saved.read_text())
        protocol = evaluation_protocol(EvalSettings(**data["identity"]["settings"]), reference=", against the untransformed float reference",
                                       calibration="calibration (Hessians and the fold's activation statistics)")
        rows = merged_batches(data["batches"], list(data["batches"]))
        sections.append(model_section(model_name, data, protocol + markdown_table(rows) + "\n\n" + reading(rows)))
    header = "# Scale folding before quantization: on and off\n\n"
    (RESULTS / "scalefold.md").write_text(header + "\n".join(sections) + "\n" + NOTES)


if __name__ == "__main__":
    main()
