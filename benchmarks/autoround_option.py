"""The autoround option against bitalloc's GPTQ on real layers, on the objective both minimize -> results/autoround_option.md.

Issue 26 item 3: a peer quantizer that beats bitalloc's at the same honest bits becomes a profile option. The
``autoroundN`` option (:mod:`quantizers.autoround`) runs AutoRound's SignRound on one layer from the profile's Hessian;
this measures, on sampled real layers, the layer's output error ``tr((W - Q) H (W - Q)^T)`` (H from bitalloc's 64 x 512
calibration windows, on the float model, as the profile computes it) of:

- ``gptq-wNg128-act-mse``: ``bitalloc run``'s GPTQ option (asymmetric, act order, mse-clipped grid);
- ``autoround-wNg128-i200``: the autoround option at AutoRound's default 200 iterations (lr 1/200);
- ``rtn-wNg128-sym``: round to nearest on the same symmetric grid (where AutoRound starts from);

with each one's honest bits per weight and wall seconds per layer. Lower error at no more bits wins.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from _common import RESULTS, chosen_models, provenance

from allocator.model.calibration import HessianAccumulator
from allocator.model.corpus import load_corpus
from allocator.model.loading import load_model
from allocator.model.tokens import calibration_samples
from allocator.storage import write_json
from allocator.table.options import parse_options, quantizer_from_settings

MODELS = ("smollm2-135m", "gemma3-270m")
BLOCKS = {"smollm2-135m": (2, 15, 28), "gemma3-270m": (2, 9, 16)}
LAYERS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
BITS = (2, 3, 4)
SAMPLES, SEQLEN, BATCH = 64, 512, 8


def option_specs(bits: int) -> list[str]:
    return [f"gptq{bits}:clip=mse,act_order=true", f"rtn{bits}:symmetric=true", f"autoround{bits}"]


def hessians(model: str, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Each named linear's weight and input Hessian 2 X X^T / n over the calibration windows."""
    loaded = load_model(model)
    windows = calibration_samples(loaded.tokenizer, load_corpus("enwiki").calibration, SAMPLES, SEQLEN, loaded.add_bos, 0)
    modules = {name: loaded.model.get_submodule(name) for name in names}
    accumulators = {name: HessianAccumulator(module.weight.shape[1]) for name, module in modules.items()}
    hooks = [module.register_forward_pre_hook(lambda _m, args, name=name: accumulators[name].add(args[0])) for name, module in modules.items()]
    with torch.inference_mode():
        for start in range(0, SAMPLES, BATCH):
            loaded.model(windows[start:start + BATCH])
    for hook in hooks:
        hook.remove()
    return {n: m.weight.detach().float().clone() for n, m in modules.items()}, {n: a.hessian() for n, a in accumulators.items()}


def measure(model: str, path) -> dict:
    record = json.loads(path.read_text()) if path.is_file() else {"model": model, "provenance": provenance(), "rows": []}
    done = {(r["layer"], r["option"]) for r in record["rows"]}
    names = [f"model.layers.{b}.{layer}" for b in BLOCKS[model] for layer in LAYERS]
    weights, hessian = hessians(model, names)
    for name in names:
        for bits in BITS:
            for option in parse_options(option_specs(bits)):
                if (name, option.label) in done:
                    continue
                quantizer = quantizer_from_settings(option.settings)
                tick = time.perf_counter()
                qt = quantizer.quantize(weights[name], hessian[name])
                seconds = time.perf_counter() - tick
                delta = (qt.dequantized - weights[name]).double()
                error = float(torch.trace(delta @ hessian[name].double() @ delta.T))
                record["rows"].append({"layer": name, "bits": bits, "option": option.label, "bpw": qt.bits_per_weight, "error": error,
                                       "seconds": seconds})
                write_json(path, record)
                print(f"{model} {name} {option.label}: error {error:.4g}, {qt.bits_per_weight:.3f} bpw, {seconds:.1f} s", flush=True)
    return record


def report(records: list[dict]) -> str:
    lines = ["# The autoround option against bitalloc's GPTQ, layer by layer", "", (__doc__ or "").split("\n\n", 1)[1].strip(), ""]
    for record in records:
        rows = record["rows"]
        lines += [f"## {record['model']}", "", record["provenance"], "",
                  "| layer | bits | option | bpw | output error | / GPTQ's | seconds |", "|---|---|---|---|---|---|---|"]
        gptq = {(r["layer"], r["bits"]): r["error"] for r in rows if r["option"].startswith("gptq")}
        for r in rows:
            lines.append(f"| {r['layer'].removeprefix('model.layers.')} | {r['bits']} | {r['option']} | {r['bpw']:.3f} | {r['error']:.4g} | "
                         f"{r['error'] / gptq[(r['layer'], r['bits'])]:.2f} | {r['seconds']:.1f} |")
        lines += ["", "Summary (geometric mean over the sampled layers of each option's error / GPTQ's; mean seconds per layer):", ""]
        for bits in BITS:
            for kind in ("rtn", "autoround-w{b}g128-i200"):
                label = kind.format(b=bits)
                chosen = [r for r in rows if r["bits"] == bits and (r["option"] == label or (kind == "rtn" and r["option"].startswith("rtn")))]
                if not chosen:
                    continue
                ratio = float(np.exp(np.mean([np.log(r["error"] / gptq[(r["layer"], bits)]) for r in chosen])))
                beats = sum(r["error"] < gptq[(r["layer"], bits)] for r in chosen)
                lines.append(f"- {bits} bits, {chosen[0]['option']}: {ratio:.2f}x GPTQ's error (lower than GPTQ's on {beats} of {len(chosen)} layers), "
                             f"{np.mean([r['seconds'] for r in chosen]):.1f} s per layer vs GPTQ's "
                             f"{np.mean([r['seconds'] for r in rows if r['bits'] == bits and r['option'].startswith('gptq')]):.1f} s")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m")
    args = parser.parse_args()
    models = chosen_models(args.models, MODELS)
    (RESULTS / "autoround_option").mkdir(parents=True, exist_ok=True)
    records = [measure(model, RESULTS / "autoround_option" / f"{model}.json") for model in models]
    (RESULTS / "autoround_option.md").write_text(report(records))


if __name__ == "__main__":
    main()
