"""bitalloc beside the tools a user would pick instead: same models, same tokens, same budgets -> results/peers.md, peers.png.

Every row of a model is evaluated on the same evaluation token ids (16384 for SmolLM2, 8192 for Gemma3: ``SETTINGS``),
perplexity and mean per-token KL against the same fp32 reference; a method that calibrates gets the same 64 x 512
calibration windows (bitalloc's seeded calibration samples).

- **bitalloc**: ``bitalloc run``'s job (the ``main`` options, every option's single-layer KL on 128 tokens, ILP, GPTQ
  block by block on the quantized prefix) at ``BITALLOC_BUDGETS`` and any ``--bitalloc-budgets`` (a peer row's own
  bpw, so that the comparison there is measured, not interpolated); its time is the allocation (profile + KL, once per
  model, from the profile cache's record) plus each budget's quantization.
- **bitalloc uniform**: each of those GPTQ options on every linear, each layer quantized alone against the float
  model (the profile's kept weights; no sequential quantization), as HQQ quantizes: bitalloc's quantizer beside a
  peer's at the same bits (issue 26 item 3: a peer's quantizer that beats it becomes a profile option).
- **bitalloc uniform sequential**: the same options on every linear, quantized as ``bitalloc run`` quantizes (block by
  block on the quantized prefix): the counterpart of AutoRound, which tunes each block on the quantized prefix too.
- **HQQ** (``hqq``): every decoder linear quantized by ``hqq.core.quantize.Quantizer.quantize`` (half-quadratic
  zero/scale search, calibration-free) at 2, 3 and 4 bits, with HQQ's default group size 64 and with 128.
- **AutoRound** (``auto-round``, :mod:`peer_autoround` says exactly what it is given): SignRound W2/W3/W4 (sym int,
  group 128, ``--autoround-recipe``: AutoRound's ``default`` 200 iterations, or its ``light`` 50 at lr 5e-3, as each
  row says) and AutoScheme's
  mixed W2/W3/W4 allocation at ``SCHEME_BUDGETS`` average bits, tuned by SignRound the same way.
- **bitalloc map + AutoRound**: ``bitalloc run``'s ILP (its table and measured single-layer KL) over its GPTQ 2/3/4-bit
  options alone, at ``--map-budgets`` bpw; AutoRound tunes the model with each layer at the map's bits (its
  ``layer_config``, as AutoScheme hands it its own allocation), the same recipe as the AutoRound rows; beside it the
  same map quantized by bitalloc's GPTQ as ``bitalloc run`` quantizes (``bitalloc map (GPTQ)``).
- **AutoScheme map (GPTQ)**: the other cross, AutoScheme's allocation at each ``--scheme-budgets`` quantized by
  bitalloc's GPTQ as ``bitalloc run`` quantizes; with the three rows above it, allocation and rounding compared one at
  a time (the table "Allocation by rounding").
- **bitalloc + autoround option**: ``bitalloc run``'s job with AutoRound's SignRound per layer (``autoround2/3/4`` at
  the same recipe, :mod:`quantizers.autoround`) as options beside its ``main`` ones (``--tools autoround-option``):
  the allocation with the peer's quantizer (issue 26 item 3); each row records how many layers each option got.
- **llama.cpp**: its presets (with an importance matrix where they need one) and bitalloc's GGUF maps, as measured by
  ``benchmarks/gguf_presets.py`` into ``results/gguf/<model>.json`` (copied here only when they were measured on these
  same token ids: the reference perplexity must agree).

Honest bpw = every bit a tool stores for the decoder linears / their weights: codes as packed in its storage format,
plus each scale and zero point at the width the tool keeps it (HQQ: its packed codes, fp16 scale and fp16 zero per
group, as ``HQQLinear`` keeps them; AutoRound: its export's int32-packed codes and zero points and fp16 scales; any
decoder linear a tool leaves unquantized counts at 16 bits; llama.cpp: the linears' tensor bytes in the GGUF file; bitalloc: its stored forms).
Embeddings, norms and the head stay float in every row and are not counted.

Each row is saved to results/peers/<model>.json as it is measured; a rerun measures only what is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import peer_autoround
import torch
from _common import RESULTS, chosen_models, provenance, resumed_lines

from allocator.evaluate.perplexity import evaluate
from allocator.jobs.compare import EvalSettings, evaluation_tokens, quantize_assignment
from allocator.jobs.run import RUN_KL_SEQLEN, RUN_OPTIONS, run_job
from allocator.measure.layer_kl import add_kl_losses
from allocator.measure.option_weights import OptionWeights
from allocator.measure.profile import cached_table_path, profile_model
from allocator.model.corpus import Corpus, load_corpus
from allocator.model.layers import quantizable_linears
from allocator.model.loading import LoadedModel, load_model
from allocator.model.tokens import calibration_samples
from allocator.solvers import Budget, solve
from allocator.storage import write_json
from allocator.table.assignment import Assignment
from allocator.table.options import parse_options

SETTINGS = {"smollm2-135m": {"tokens": 16384}, "gemma3-270m": {"tokens": 8192}}
BITALLOC_BUDGETS = [2.5, 3.0, 3.5, 4.0]
HQQ_BITS = [2, 3, 4]
HQQ_GROUPS = [64, 128]
AUTOROUND_BITS = [2, 3, 4]
SCHEME_BUDGETS = [2.5, 3.0, 3.5]
TOOLS = ("llama.cpp", "hqq", "bitalloc", "autoround", "autoround-option")
PEER_PACKAGES = ["hqq", "auto-round"]
CALIBRATION_SAMPLES, CALIBRATION_SEQLEN = 64, 512
"""bitalloc's profile calibration (``bitalloc run``'s), handed to every peer that calibrates."""
REFERENCE_AGREEMENT = 1e-3
"""Relative difference of reference perplexities under which another results file counts as measured on these tokens."""

Row = dict[str, Any]


def linear_numel(loaded: LoadedModel) -> int:
    return sum(m.weight.numel() for m in quantizable_linears(loaded.model).values())


def measure_overlays(loaded: LoadedModel, windows: torch.Tensor, overlays: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """Perplexity and KL of each overlay (module name -> weight) against the reference (key ``reference``)."""
    return evaluate(loaded.model, windows, overlays, progress=False)


# ----------------------------------------------------------------------------- HQQ


def hqq_layer(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, int]:
    """HQQ's quantization of one linear: (dequantized fp32 weight, stored bits: packed codes + fp16 scale and zero)."""
    from hqq.core.quantize import Quantizer as HQQQuantizer

    # hqq_base_quant_config's weight settings: optimize on, zero rounded only at 4 bits, groups along the input axis
    codes, meta = HQQQuantizer.quantize(weight.float(), nbits=bits, channel_wise=True, group_size=group_size, optimize=True,
                                        round_zero=bits == 4, axis=1, bitpack=True, compute_dtype=torch.float16, device="cpu")
    meta["compute_dtype"] = torch.float32  # dequantize in fp32; the stored scale and zero are fp16 in HQQLinear
    meta["scale"], meta["zero"] = meta["scale"].half().float(), meta["zero"].half().float()
    dequantized = HQQQuantizer.dequantize(codes, meta).float()
    stored = codes.numel() * codes.element_size() * 8 + 16 * (meta["scale"].numel() + meta["zero"].numel())
    return dequantized, stored


def hqq_rows(loaded: LoadedModel, windows: torch.Tensor, done: Mapping[str, Row], save: Callable[[Row], None]) -> None:
    linears = quantizable_linears(loaded.model)
    numel = linear_numel(loaded)
    todo = [(bits, group) for bits in HQQ_BITS for group in HQQ_GROUPS if f"HQQ w{bits} g{group}" not in done]
    for bits, group in todo:
        tick = time.perf_counter()
        overlay, stored = {}, 0
        for name, module in linears.items():
            overlay[name], bits_stored = hqq_layer(module.weight.detach(), bits, group)
            stored += bits_stored
        seconds = time.perf_counter() - tick
        result = measure_overlays(loaded, windows, {"hqq": overlay})["hqq"]
        save({"tool": "HQQ", "variant": f"HQQ w{bits} g{group}", "bpw": stored / numel, "perplexity": result.perplexity, "kl": result.kl,
              "quantize_seconds": seconds, "settings": {"nbits": bits, "group_size": group, "optimize": True, "axis": 1}})


# ----------------------------------------------------------------------------- AutoRound


def calibration_windows(loaded: LoadedModel) -> torch.Tensor:
    """The 64 x 512 calibration windows bitalloc's profile draws (same seed)."""
    return calibration_samples(loaded.tokenizer, load_corpus("enwiki").calibration, CALIBRATION_SAMPLES, CALIBRATION_SEQLEN, loaded.add_bos, 0)


def honest_overlay(loaded: LoadedModel, quantized: Mapping[str, tuple[torch.Tensor, int]]) -> tuple[dict[str, torch.Tensor], float]:
    """The quantized weights as an overlay, and the bpw over every decoder linear (one left float counts 16 bits)."""
    linears = quantizable_linears(loaded.model)
    stored = sum(quantized[name][1] if name in quantized else 16 * module.weight.numel() for name, module in linears.items())
    return {name: quantized[name][0] for name in linears if name in quantized}, stored / linear_numel(loaded)


def autoround_rows(loaded: LoadedModel, windows: torch.Tensor, recipe: str, bit_widths: list[int], scheme_budgets: list[float],
                   done: Mapping[str, Row], save: Callable[[Row], None]) -> None:
    calibration = calibration_windows(loaded)
    settings = {"recipe": recipe, **peer_autoround.RECIPES[recipe], "group_size": 128, "sym": True,
                "nsamples": CALIBRATION_SAMPLES, "seqlen": CALIBRATION_SEQLEN, "batch_size": 8, "amp": False}
    for bits in bit_widths:
        name = f"AutoRound W{bits} g128 ({recipe})"
        if name in done:
            continue
        quantized, seconds = peer_autoround.quantize(loaded.model, calibration, recipe, bits=bits)
        overlay, bpw = honest_overlay(loaded, quantized)
        result = measure_overlays(loaded, windows, {"q": overlay})["q"]
        save({"tool": "AutoRound", "variant": name, "bpw": bpw, "perplexity": result.perplexity, "kl": result.kl, "quantize_seconds": seconds,
              "settings": {**settings, "bits": bits, "quantized_linears": len(quantized)}})
    for avg_bits in scheme_budgets:
        name = f"AutoScheme @{avg_bits:g} ({recipe})"
        if name in done:
            continue
        chosen, allocation = peer_autoround.scheme_bits(loaded.model, calibration, avg_bits, recipe)
        row = autoround_by_layer_bits(loaded, windows, calibration, recipe, chosen)
        counts = row.pop("layers_per_bits")
        save({"tool": "AutoScheme + AutoRound", "variant": name, **row, "allocation_seconds": allocation,
              "settings": {**settings, "avg_bits": avg_bits, "options": peer_autoround.SCHEME_OPTIONS, "layers_per_bits": counts}})


def layers_per_bits(chosen: Mapping[str, int]) -> dict[int, int]:
    """How many linears an allocation (module -> bits) puts at each bit width."""
    return {b: sum(1 for v in chosen.values() if v == b) for b in sorted(set(chosen.values()))}


def autoscheme_gptq_rows(loaded: LoadedModel, windows: torch.Tensor, recipe: str, scheme_budgets: list[float], done: Mapping[str, Row],
                         save: Callable[[Row], None]) -> None:
    """AutoScheme's allocation, bitalloc's rounding: AutoScheme's per-layer bits at each budget (the allocation its
    tuned row got), each layer at bitalloc run's GPTQ option of those bits, quantized as ``bitalloc run`` quantizes; with
    ``bitalloc map + AutoRound`` the other cross, so allocation and rounding are compared one at a time."""
    gptq = {int(o.settings["bits"]): o.settings for o in parse_options(RUN_OPTIONS) if o.settings["quantizer"] == "gptq"}
    linears = list(quantizable_linears(loaded.model))
    calibration = calibration_windows(loaded)
    corpus = load_corpus("enwiki")
    for avg_bits in scheme_budgets:
        name = f"AutoScheme map @{avg_bits:g} (GPTQ)"
        if name in done:
            continue
        chosen, allocation = peer_autoround.scheme_bits(loaded.model, calibration, avg_bits, recipe)
        if sorted(chosen) != sorted(linears):
            raise RuntimeError(f"AutoScheme @{avg_bits:g} chose bits for {len(chosen)} linears, the model has {len(linears)}")
        assignment = Assignment({module: gptq[bits] for module, bits in chosen.items()})
        save({"tool": "AutoScheme map (GPTQ)", "variant": name, **sequential_row(loaded, windows, corpus, assignment),
              "allocation_seconds": allocation,
              "settings": {"avg_bits": avg_bits, "options": peer_autoround.SCHEME_OPTIONS, "recipe": recipe,
                           "layers_per_bits": layers_per_bits(chosen),
                           "bits": chosen, "how": "AutoScheme's allocation, bitalloc run's quantization (its GPTQ options)"}})


def autoround_by_layer_bits(loaded: LoadedModel, windows: torch.Tensor, calibration: torch.Tensor, recipe: str,
                            chosen: Mapping[str, int]) -> Row:
    """AutoRound tuning the model with each linear at ``chosen[name]`` bits (an allocation: AutoScheme's or bitalloc's),
    measured: the row's bpw, perplexity, KL, quantize seconds and layers per bit width."""
    quantized, seconds = peer_autoround.quantize(loaded.model, calibration, recipe, layer_bits=chosen)
    overlay, bpw = honest_overlay(loaded, quantized)
    result = measure_overlays(loaded, windows, {"q": overlay})["q"]
    return {"bpw": bpw, "perplexity": result.perplexity, "kl": result.kl, "quantize_seconds": seconds,
            "layers_per_bits": layers_per_bits(chosen)}


def run_eval_settings(loaded: LoadedModel) -> EvalSettings:
    """``bitalloc run``'s evaluation and quantization settings (block-wise, not true-sequential) on this model's tokens."""
    return EvalSettings(tokens=SETTINGS[loaded.name]["tokens"], true_sequential=False)


def sequential_row(loaded: LoadedModel, windows: torch.Tensor, corpus: Corpus, assignment: Assignment) -> Row:
    """``assignment`` quantized as ``bitalloc run`` quantizes a bit map (block by block on the quantized prefix, the
    profile's calibration) and measured: the row's bpw, perplexity, KL and quantize seconds."""
    settings = run_eval_settings(loaded)
    tick = time.perf_counter()
    quantized = quantize_assignment(loaded, corpus, assignment, settings, progress=False)
    seconds = time.perf_counter() - tick
    result = measure_overlays(loaded, windows, {"q": quantized.dequantized_weights()})["q"]
    return {"bpw": quantized.bits_per_weight, "perplexity": result.perplexity, "kl": result.kl, "quantize_seconds": seconds}


def bitalloc_map_autoround_rows(loaded: LoadedModel, windows: torch.Tensor, recipe: str, budgets: list[float], done: Mapping[str, Row],
                                save: Callable[[Row], None]) -> None:
    """bitalloc's allocation, AutoRound's rounding: ``bitalloc run``'s ILP over its GPTQ 2/3/4-bit options alone (on its
    table: the profile and its measured single-layer KL), the bits of that map handed to AutoRound per layer, as
    AutoScheme's allocation is (the next lever where AutoRound's block-wise tuning beats bitalloc's sequential GPTQ)."""
    names = [f"bitalloc map @{b:g} + AutoRound ({recipe})" for b in budgets]
    controls = [f"bitalloc map @{b:g} (GPTQ)" for b in budgets]
    if all(name in done for name in names + controls):
        return
    corpus = load_corpus("enwiki")
    table = profile_model(loaded, corpus, parse_options(RUN_OPTIONS), samples=CALIBRATION_SAMPLES, seqlen=CALIBRATION_SEQLEN, progress=False)
    table = add_kl_losses(loaded, table, cached_table_path(table), corpus.calibration, None, seqlen=RUN_KL_SEQLEN, progress=False)
    gptq = [j for j, option in enumerate(table.options) if option.settings["quantizer"] == "gptq"]
    table = dataclasses.replace(table, options=[table.options[j] for j in gptq], bits=table.bits[:, gptq],
                                losses={name: loss[:, gptq] for name, loss in table.losses.items()})  # the GPTQ options alone
    calibration = calibration_windows(loaded)
    for budget, name, control in zip(budgets, names, controls):
        tick = time.perf_counter()
        bitmap = solve(table, Budget.bpw(budget), solver="ilp")
        allocation = time.perf_counter() - tick
        if control not in done:  # the same map with bitalloc's own rounding, as bitalloc run quantizes
            save({"tool": "bitalloc map (GPTQ)", "variant": control, **sequential_row(loaded, windows, corpus, bitmap.assignment()),
                  "allocation_seconds": allocation, "settings": {"budget": budget, "loss": table.default_loss, "options": table.labels,
                                                                 "how": "bitalloc run's quantization of the GPTQ-only map"}})
        if name in done:
            continue
        chosen = {module: int(entry.settings["bits"]) for module, entry in bitmap.modules.items()}
        row = autoround_by_layer_bits(loaded, windows, calibration, recipe, chosen)
        counts = row.pop("layers_per_bits")
        save({"tool": "bitalloc map + AutoRound", "variant": name, **row, "allocation_seconds": allocation,
              "settings": {"recipe": recipe, **peer_autoround.RECIPES[recipe], "group_size": 128, "sym": True, "budget": budget,
                           "loss": table.default_loss, "options": table.labels, "layers_per_bits": counts}})


# ----------------------------------------------------------------------------- bitalloc


def bitalloc_rows(loaded: LoadedModel, budgets: list[float], done: Mapping[str, Row], save: Callable[[Row], None]) -> None:
    corpus = load_corpus("enwiki")
    for bpw in budgets:
        name = f"bitalloc run @{bpw:g}"
        if name not in done:
            save({"tool": "bitalloc", "variant": name, **run_job_row(loaded, corpus, RUN_OPTIONS, bpw)})


def bitalloc_autoround_option_rows(loaded: LoadedModel, recipe: str, done: Mapping[str, Row], save: Callable[[Row], None]) -> None:
    """``bitalloc run``'s job with the ``autoroundN`` options (issue 26 item 3: AutoRound's SignRound on one layer,
    :mod:`quantizers.autoround`, at 2/3/4 bits and ``recipe``'s iterations) beside its ``main`` options: the profile,
    the single-layer KL and the ILP may pick AutoRound for any layer; each row says how many layers it did."""
    iters, lr = peer_autoround.RECIPES[recipe]["iters"], peer_autoround.RECIPES[recipe]["lr"]
    specs = [*RUN_OPTIONS, *(f"autoround{bits}:iters={iters}" + ("" if lr is None else f",lr={lr}") for bits in AUTOROUND_BITS)]
    corpus = load_corpus("enwiki")
    for bpw in BITALLOC_BUDGETS:
        name = f"bitalloc run + autoround option @{bpw:g} ({recipe})"
        if name not in done:
            save({"tool": "bitalloc + autoround option", "variant": name, **run_job_row(loaded, corpus, specs, bpw)})


def run_job_row(loaded: LoadedModel, corpus: Corpus, specs: list[str], bpw: float) -> Row:
    """``bitalloc run``'s job on ``specs`` at ``bpw`` (ILP, every option's single-layer KL, block-wise quantization) and
    measured: the row's bpw, perplexity, KL, quantize and allocation seconds (profile + KL, from the cached table's
    record), and its settings with the layers the map gave each option."""
    settings = run_eval_settings(loaded)
    result = run_job(loaded, corpus, parse_options(specs), Budget.bpw(bpw), "ilp", settings, None, kl_seqlen=RUN_KL_SEQLEN,
                     progress=False, say=lambda _line: None)
    row, table = result.rows[-1], result.table
    allocation = float(table.metadata.get("seconds", 0.0)) + float(table.metadata.get("kl_measurement", {}).get("seconds", 0.0))
    chosen = [entry.option for entry in result.bitmap.modules.values()]
    return {"bpw": row.bpw, "perplexity": row.perplexity, "kl": row.kl, "quantize_seconds": result.stage_seconds["quantize"],
            "allocation_seconds": allocation,
            "settings": {"options": specs, "kl_seqlen": RUN_KL_SEQLEN, "solver": "ilp", "loss": table.default_loss,
                         "layers_per_option": {label: chosen.count(label) for label in table.labels}}}


def bitalloc_uniform_rows(loaded: LoadedModel, windows: torch.Tensor, done: Mapping[str, Row], save: Callable[[Row], None]) -> None:
    """Each GPTQ option of ``bitalloc run`` on every linear, each layer quantized alone against the float model (the
    profile's kept weights, as HQQ's rows quantize each layer alone): bitalloc's quantizer beside a peer's at the
    same bits, the comparison that decides whether a peer's quantizer should become a profile option."""
    options = parse_options(RUN_OPTIONS)
    if all(o.settings["quantizer"] != "gptq" or f"bitalloc {o.label} uniform" in done for o in options):
        return  # nothing to measure: do not re-make the profile
    table = profile_model(loaded, load_corpus("enwiki"), options, samples=CALIBRATION_SAMPLES, seqlen=CALIBRATION_SEQLEN,
                          progress=False)  # the run rows' cached profile
    weights = OptionWeights.beside(cached_table_path(table), table.labels)
    for j, option in enumerate(table.options):
        name = f"bitalloc {option.label} uniform"
        if option.settings["quantizer"] != "gptq" or name in done:
            continue
        overlay = {layer: weights.load(layer, option.label) for layer in table.names}
        result = measure_overlays(loaded, windows, {"q": overlay})["q"]
        save({"tool": "bitalloc uniform", "variant": name, "bpw": float(table.bits[:, j].sum()) / table.total_numel,
              "perplexity": result.perplexity, "kl": result.kl, "quantize_seconds": None,
              "settings": {**option.settings, "how": "the profile's kept weights: each layer quantized alone"}})


def bitalloc_sequential_rows(loaded: LoadedModel, windows: torch.Tensor, done: Mapping[str, Row], save: Callable[[Row], None]) -> None:
    """Each GPTQ option of ``bitalloc run`` on every linear, quantized as ``bitalloc run`` quantizes a bit map (block by
    block on the quantized prefix, the profile's calibration): bitalloc's quantizer beside AutoRound's, which also tunes
    each block on the quantized prefix's outputs."""
    corpus = load_corpus("enwiki")
    linears = list(quantizable_linears(loaded.model))
    for option in parse_options(RUN_OPTIONS):
        name = f"bitalloc {option.label} uniform sequential"
        if option.settings["quantizer"] != "gptq" or name in done:
            continue
        save({"tool": "bitalloc uniform sequential", "variant": name, **sequential_row(loaded, windows, corpus, Assignment.uniform(linears, option.settings)),
              "settings": {**option.settings, "how": "bitalloc run's quantization: block by block on the quantized prefix"}})


# ----------------------------------------------------------------------------- llama.cpp


def llama_cpp_rows(model: str, reference_ppl: float, done: Mapping[str, Row], save: Callable[[Row], None]) -> str:
    """Copy results/gguf/<model>.json's rows measured on these tokens; returns what was done (for the notes)."""
    path = RESULTS / "gguf" / f"{model}.json"
    if not path.is_file():
        command = f"python benchmarks/gguf_presets.py --models {model} --tokens {SETTINGS[model]['tokens']}"
        return f"llama.cpp: not run for {model} (no results/gguf/{model}.json: {command})"
    measured = json.loads(path.read_text())
    reference = measured["rows"][0]["perplexity"]
    if abs(reference - reference_ppl) > REFERENCE_AGREEMENT * reference_ppl:
        return f"llama.cpp: results/gguf/{model}.json was measured on other tokens (reference {reference:.3f} vs {reference_ppl:.3f}); not copied"
    for row in measured["rows"][1:]:
        if row["bpw"] is None or row["variant"].startswith("F32") or f"llama.cpp {row['variant']}" in done:
            continue
        save({"tool": "llama.cpp" if not row["variant"].startswith("bitalloc") else "bitalloc GGUF map (llama.cpp)",
              "variant": f"llama.cpp {row['variant']}", "bpw": row["bpw"], "perplexity": row["perplexity"], "kl": row["kl"],
              "quantize_seconds": row.get("make_seconds"), "settings": {"from": f"results/gguf/{model}.json", "types": row.get("linear_types")}})
    return f"llama.cpp: rows copied from results/gguf/{model}.json ({measured['provenance'].splitlines()[2].removeprefix('- ')})"


# ----------------------------------------------------------------------------- the record


def run_model(model: str, tools: set[str], autoround_recipe: str, autoround_bits: list[int], scheme_budgets: list[float],
              map_budgets: list[float], bitalloc_budgets: list[float]) -> None:
    path = RESULTS / "peers" / f"{model}.json"
    record = json.loads(path.read_text()) if path.is_file() else {"model": model, "provenance": provenance(), "rows": {}}
    record.setdefault("resumed", []).append(provenance())
    record["versions"] = {name: _version(name) for name in PEER_PACKAGES}
    rows: dict[str, Row] = record["rows"]

    def save(row: Row) -> None:
        rows[row["variant"]] = row
        write_json(path, record)
        print(f"{model} {row['variant']}: {row['bpw']:.3f} bpw, ppl {row['perplexity']:.2f}, KL {row['kl']:.4f}", flush=True)

    path.parent.mkdir(parents=True, exist_ok=True)
    loaded = load_model(model)
    windows = evaluation_tokens(loaded, load_corpus("enwiki"), EvalSettings(tokens=SETTINGS[model]["tokens"]))
    if "reference" not in record:
        reference = measure_overlays(loaded, windows, {})["reference"]
        record["reference"] = {"perplexity": reference.perplexity, "tokens": reference.tokens}
        write_json(path, record)
    notes = record.setdefault("notes", {})
    if "llama.cpp" in tools:
        notes["llama.cpp"] = llama_cpp_rows(model, record["reference"]["perplexity"], rows, save)
    if "hqq" in tools:
        hqq_rows(loaded, windows, rows, save)
    if "bitalloc" in tools:
        bitalloc_rows(loaded, bitalloc_budgets, rows, save)
        bitalloc_uniform_rows(loaded, windows, rows, save)
        bitalloc_sequential_rows(loaded, windows, rows, save)
    if "autoround" in tools:
        autoround_rows(loaded, windows, autoround_recipe, autoround_bits, scheme_budgets, rows, save)
        bitalloc_map_autoround_rows(loaded, windows, autoround_recipe, map_budgets, rows, save)
        autoscheme_gptq_rows(loaded, windows, autoround_recipe, scheme_budgets, rows, save)
    if "autoround-option" in tools:
        bitalloc_autoround_option_rows(loaded, autoround_recipe, rows, save)
    write_json(path, record)


def _version(package: str) -> str | None:
    try:
        return version(package)
    except Exception:  # not installed: its rows are not run
        return None


def report(records: list[dict]) -> str:
    lines = ["# bitalloc beside AutoRound, HQQ and llama.cpp", "", (__doc__ or "").split("\n\n", 1)[1].strip(), "",
             "![ppl vs honest bpw](peers.png)", ""]
    for record in records:
        reference = record.get("reference", {})
        lines += [f"## {record['model']}", "", record["provenance"]]
        lines += resumed_lines(record)
        lines += [f"- peer versions: {', '.join(f'{k} {v}' for k, v in record.get('versions', {}).items())}",
                  f"- reference (fp32) perplexity {reference.get('perplexity', float('nan')):.3f} on {reference.get('tokens')} evaluation tokens"]
        lines += [f"- {note}" for note in record.get("notes", {}).values()] + [""]
        lines += ["| tool | variant | honest bpw | ppl | ppl / ref | KL | quantize s | allocation s |", "|---|---|---|---|---|---|---|---|"]
        for row in sorted(record["rows"].values(), key=lambda r: (r["tool"], r["bpw"])):
            seconds = "-" if row.get("quantize_seconds") is None else f"{row['quantize_seconds']:.0f}"
            allocation = f"{row['allocation_seconds']:.0f}" if row.get("allocation_seconds") else "-"
            lines.append(f"| {row['tool']} | {row['variant']} | {row['bpw']:.3f} | {row['perplexity']:.2f} | "
                         f"{row['perplexity'] / reference.get('perplexity', float('nan')):.3f} | {row['kl']:.4f} | {seconds} | {allocation} |")
        lines += [""] + verdict(list(record["rows"].values())) + [""]
    return "\n".join(lines)


PEER_TOOLS = ("HQQ", "AutoRound", "AutoScheme + AutoRound", "llama.cpp")
"""Rows compared with bitalloc's curve (``bitalloc map + AutoRound`` is bitalloc's allocation with a peer's rounding)."""
TARGET_RANGE = (2.5, 4.0)
"""Honest bpw where bitalloc's mixed curve should lie below every peer's (the issue's target)."""


def line_of(row: Row) -> str:
    """The plotted line a row belongs to: its tool, with HQQ's group size and AutoRound's recipe (a tool's rows at
    the same bpw with another group size or recipe are another method, not a point of the same curve)."""
    settings = row.get("settings", {})
    group = f" g{settings['group_size']}" if row["tool"] == "HQQ" else ""
    recipe = f" ({settings['recipe']})" if "recipe" in settings else ""
    return f"{row['tool']}{group}{recipe}"


def rows_by_line(rows: Iterable[Row]) -> dict[str, list[Row]]:
    """``rows`` grouped by ``line_of``, each line's rows in bpw order."""
    lines: dict[str, list[Row]] = {}
    for row in sorted(rows, key=lambda r: r["bpw"]):
        lines.setdefault(line_of(row), []).append(row)
    return lines


def in_target_range(bpw: float) -> bool:
    """``bpw`` inside ``TARGET_RANGE``, with the slack of a budget's rounding (a 4.0 budget stores up to 4.01 bpw)."""
    return TARGET_RANGE[0] - BPW_TOLERANCE <= bpw <= TARGET_RANGE[1] + 0.01


def log_linear(points: list[tuple[float, float]], bpw: float) -> float | None:
    """Perplexity at ``bpw`` on the line through ``points`` (bpw, ppl), log-linear between them; None outside."""
    points = sorted(points)
    for (b0, p0), (b1, p1) in zip(points, points[1:]):
        if b0 <= bpw <= b1:
            return float(np.exp(np.interp(bpw, [b0, b1], [np.log(p0), np.log(p1)])))
    return None


def bitalloc_curve(rows: list[Row], bpw: float) -> float | None:
    """``bitalloc run``'s perplexity at ``bpw``: log-linear between its budgets, its widest budget's above them (it
    stores fewer bits there), None below its narrowest."""
    points = sorted((r["bpw"], r["perplexity"]) for r in rows if r["tool"] == "bitalloc")
    if not points or bpw < points[0][0] - BPW_TOLERANCE:
        return None
    bpw = max(bpw, points[0][0])
    if bpw >= points[-1][0]:
        return points[-1][1]
    return log_linear(points, bpw)


def peer_lines_at_budgets(rows: list[Row]) -> list[str]:
    """The target read curve against curve: each peer line (``line_of``) interpolated at every ``bitalloc run`` row in
    2.5-4.0 bpw that it has rows on both sides of, against that measured row (a uniform peer's rows are 1 bit apart,
    so the row-by-row check sees at most one of its points inside the range)."""
    runs = sorted((r["bpw"], r["perplexity"]) for r in rows if r["tool"] == "bitalloc" and in_target_range(r["bpw"]))
    found = []
    for name, line in sorted(rows_by_line(r for r in rows if r["tool"] in PEER_TOOLS).items()):
        points = [(r["bpw"], r["perplexity"]) for r in line]
        compared = [(bpw, mine, theirs) for bpw, mine in runs if (theirs := log_linear(points, bpw)) is not None]
        if not compared:
            continue
        above = sum(mine >= theirs for _, mine, theirs in compared)
        word = f"ABOVE it at {above} of {len(compared)}" if above else f"below it at all {len(compared)}"
        cells = "; ".join(f"{bpw:.3f}: {mine:.2f} vs {theirs:.2f} ({mine / theirs - 1:+.1%})" for bpw, mine, theirs in compared)
        found.append(f"- {name}: bitalloc run {word} (bpw: bitalloc run vs the line there) {cells}")
    if not found:
        return []
    return ["", "Curve against curve: each peer line interpolated (log-linear) at bitalloc run's rows in 2.5-4.0 bpw that it "
            "has rows on both sides of (a line spanning none of them is left out). Between two uniform rows the line is the "
            "plot's, not a measured point: a user gets bpw between W2 and W3 only by mixing widths, as AutoScheme does:", ""] + found


def verdict(rows: list[Row]) -> list[str]:
    """Target check: is ``bitalloc run``'s curve below every peer row it can be compared with (2.5 bpw and up), and
    is bitalloc's own quantizer (its uniform rows) below each peer quantizer at the same code bits."""
    lines = ["Against the target (bitalloc's mixed curve below every peer at 2.5-4.0 honest bpw; a peer row above bitalloc's "
             "widest budget is compared with that budget, which stores fewer bits; rows outside 2.5-4.0 are shown, not "
             "counted):", ""]
    for row in sorted((r for r in rows if r["tool"] in PEER_TOOLS), key=lambda r: r["bpw"]):
        mine = bitalloc_curve(rows, row["bpw"])
        if mine is None:
            lines.append(f"- {row['variant']} ({row['bpw']:.3f} bpw, ppl {row['perplexity']:.2f}): below bitalloc's narrowest budget, not compared")
            continue
        inside = in_target_range(row["bpw"])
        word = "below" if mine < row["perplexity"] else "ABOVE" if inside else "above, outside the target range"
        lines.append(f"- {row['variant']} ({row['bpw']:.3f} bpw, ppl {row['perplexity']:.2f}): bitalloc {mine:.2f}, {word} "
                     f"({mine / row['perplexity'] - 1:+.1%})")
    lines += peer_lines_at_budgets(rows)
    code_bits = {id(r): r["settings"].get("nbits") or r["settings"].get("bits") for r in rows}  # HQQ's rows say nbits
    own_rows = {tool: {code_bits[id(r)]: r for r in rows if r["tool"] == tool} for tool in ("bitalloc uniform", "bitalloc uniform sequential")}
    # HQQ quantizes each layer alone, as the profile's kept weights are; AutoRound tunes block by block on the quantized
    # prefix, as bitalloc run quantizes (its rows are compared with the sequential ones where they exist)
    counterpart = {"HQQ": ("bitalloc uniform",), "AutoRound": ("bitalloc uniform sequential", "bitalloc uniform")}
    pairs = []
    for row in (r for r in rows if r["tool"] in counterpart):
        own = next((own_rows[tool][code_bits[id(row)]] for tool in counterpart[row["tool"]] if code_bits[id(row)] in own_rows[tool]), None)
        if own is not None:
            pairs.append((row, own))
    if pairs:
        lines += ["", "Quantizer against quantizer at the same code bits (HQQ against bitalloc's layers quantized alone, AutoRound "
                  "against bitalloc's sequential quantization where measured; item 3 of the issue: a peer that wins here becomes a "
                  "profile option):", ""]
        for peer, own in sorted(pairs, key=lambda pair: pair[0]["bpw"]):
            wins = own["perplexity"] < peer["perplexity"] and own["bpw"] <= peer["bpw"]
            loses = own["perplexity"] > peer["perplexity"] and own["bpw"] >= peer["bpw"]
            winner = "bitalloc" if wins else "the peer" if loses else "neither (fewer bits, higher ppl)"
            lines.append(f"- {peer['variant']} ({peer['bpw']:.3f} bpw, ppl {peer['perplexity']:.2f}) vs {own['variant']} "
                         f"({own['bpw']:.3f} bpw, ppl {own['perplexity']:.2f}): {winner} (bitalloc {own['perplexity'] / peer['perplexity'] - 1:+.1%})")
    combined = sorted((r for r in rows if r["tool"] == "bitalloc map + AutoRound"), key=lambda r: r["bpw"])
    if combined:
        lines += ["", "bitalloc's allocation with AutoRound's rounding, against bitalloc run's curve (its own GPTQ rounding) at the "
                  "same bpw and AutoScheme's allocation at the same budget:", ""]
        schemes = {r["settings"].get("avg_bits"): r for r in rows if r["tool"] == "AutoScheme + AutoRound"}
        controls = {r["settings"].get("budget"): r for r in rows if r["tool"] == "bitalloc map (GPTQ)"}
        for row in combined:
            mine = bitalloc_curve(rows, row["bpw"])
            scheme = schemes.get(row["settings"]["budget"])
            control = controls.get(row["settings"]["budget"])
            versus = "" if scheme is None else f"; AutoScheme @{scheme['settings']['avg_bits']:g}: {scheme['bpw']:.3f} bpw, ppl {scheme['perplexity']:.2f}"
            if control is not None:
                versus += (f"; the same map with bitalloc's GPTQ: {control['bpw']:.3f} bpw, ppl {control['perplexity']:.2f} "
                           f"(AutoRound's rounding {row['perplexity'] / control['perplexity'] - 1:+.1%})")
            curve = "not compared (below bitalloc run's narrowest budget)" if mine is None else f"{mine:.2f} ({row['perplexity'] / mine - 1:+.1%})"
            lines.append(f"- {row['variant']} ({row['bpw']:.3f} bpw, ppl {row['perplexity']:.2f}): bitalloc run's curve {curve}{versus}")
    lines += allocation_by_rounding(rows)
    with_option = sorted((r for r in rows if r["tool"] == "bitalloc + autoround option"), key=lambda r: r["bpw"])
    if with_option:
        lines += ["", "bitalloc run with AutoRound's per-layer quantizer as options beside its own (item 3: the allocation with it), "
                  "against bitalloc run at the same budget:", ""]
        runs = {round(r["bpw"], 2): r for r in rows if r["tool"] == "bitalloc"}
        for row in with_option:
            picked = {label: n for label, n in row["settings"]["layers_per_option"].items() if label.startswith("autoround") and n}
            run = runs.get(round(row["bpw"], 2))
            versus = "" if run is None else f"; bitalloc run {run['perplexity']:.2f} ({row['perplexity'] / run['perplexity'] - 1:+.1%})"
            lines.append(f"- {row['variant']} ({row['bpw']:.3f} bpw, ppl {row['perplexity']:.2f}): AutoRound layers "
                         f"{', '.join(f'{label} x {n}' for label, n in picked.items()) or 'none'}{versus}")
    return lines


CROSS_CELLS = (("bitalloc map (GPTQ)", "budget"), ("bitalloc map + AutoRound", "budget"), ("AutoScheme map (GPTQ)", "avg_bits"),
               ("AutoScheme + AutoRound", "avg_bits"))
"""The 2 x 2 of allocation (bitalloc's GPTQ-only ILP map, AutoScheme's) by rounding (bitalloc's GPTQ, AutoRound): each
cell's tool and the settings key that holds its budget."""


def allocation_by_rounding(rows: list[Row]) -> list[str]:
    """The table that separates allocation from rounding: per budget, each allocation under each rounding (empty where
    the AutoScheme-under-GPTQ cross was not measured)."""
    cells: dict[tuple[float, str], list[Row]] = {}
    for row in rows:
        for tool, key in CROSS_CELLS:
            if row["tool"] == tool:
                cells.setdefault((round(row["settings"][key], 3), tool), []).append(row)
    budgets = sorted({budget for budget, tool in cells if tool == "AutoScheme map (GPTQ)"})
    if not budgets:
        return []
    lines = ["", "Allocation by rounding at the same budget (ppl; the AutoRound recipe in brackets): columns 1 and 3 (and 2 "
             "and 4) differ only in the allocation, columns 1 and 2 (and 3 and 4) only in the rounding; the last is bitalloc's "
             "product path at that budget:", "",
             "| budget | bitalloc's map, bitalloc's GPTQ | bitalloc's map, AutoRound | AutoScheme's map, bitalloc's GPTQ | "
             "AutoScheme's map, AutoRound | bitalloc run (its main options, its GPTQ) |", "|---|---|---|---|---|---|"]
    for budget in budgets:
        texts = []
        for tool, _ in CROSS_CELLS:
            found = sorted(cells.get((budget, tool), []), key=lambda r: r["variant"])
            texts.append(", ".join(f"{r['perplexity']:.2f}" + (f" ({r['settings']['recipe']})" if "AutoRound" in tool else "")
                                   for r in found) or "-")
        run = bitalloc_curve(rows, budget)
        texts.append("-" if run is None else f"{run:.2f}")
        lines.append(f"| {budget:g} | " + " | ".join(texts) + " |")
    return lines


BPW_TOLERANCE = 0.005
"""A row this far below bitalloc's narrowest budget is still compared with it (a 2.499 bpw map against the 2.5 budget)."""
PLOT_TOP = 15
"""The plot's top, in multiples of the reference perplexity."""


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(records), figsize=(6.5 * len(records), 4.8), squeeze=False)
    for ax, record in zip(axes[0], records):
        ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)  # more lines than the default cycle's 10 colours
        for name, rows in sorted(rows_by_line(record["rows"].values()).items()):
            ax.plot([r["bpw"] for r in rows], [r["perplexity"] for r in rows], marker="o", label=name,
                    linewidth=2.5 if name == "bitalloc" else 1.2)
        ax.set_yscale("log")
        if "reference" in record:
            reference = record["reference"]["perplexity"]
            ax.axhline(reference, color="gray", linestyle="--", linewidth=1, label="fp32 reference")
            # the collapsed rows (HQQ at 2-3 bits: 1e2-1e8) would squeeze every usable row into the bottom tenth
            ax.set_ylim(0.9 * reference, PLOT_TOP * reference)
        ax.set_xlabel("honest bits per weight (decoder linears)")
        ax.set_ylabel("perplexity (log)")
        ax.set_title(f"{record['model']} (rows above {PLOT_TOP:g}x the reference are off the chart)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def number_list(kind: type) -> Callable[[str], list]:
    """An argparse type: comma-separated numbers of ``kind`` ('' for none); a bad one is argparse's one-line error."""
    def parse(text: str) -> list:
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list of {kind.__name__}s: {text!r}") from None

    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(SETTINGS))
    parser.add_argument("--tools", default=",".join(TOOLS), help="which rows to measure (comma-separated)")
    parser.add_argument("--autoround-recipe", choices=sorted(peer_autoround.RECIPES), default="default",
                        help="AutoRound's recipe: default (200 iterations) or light (50 at lr 5e-3)")
    parser.add_argument("--autoround-bits", type=number_list(int), default=AUTOROUND_BITS, help="SignRound's uniform bit widths (comma-separated, in order)")
    parser.add_argument("--scheme-budgets", type=number_list(float), default=SCHEME_BUDGETS, help="AutoScheme's avg_bits ('' for none)")
    parser.add_argument("--map-budgets", type=number_list(float), default=SCHEME_BUDGETS,
                        help="bpw of bitalloc's GPTQ-only maps tuned by AutoRound ('' for none)")
    parser.add_argument("--bitalloc-budgets", type=number_list(float), default=BITALLOC_BUDGETS,
                        help="bpw of the bitalloc run rows (add a peer's own bpw to compare there without interpolating)")
    parser.add_argument("--render", action="store_true", help="only rewrite peers.md and peers.png from the saved records")
    args = parser.parse_args()
    torch.manual_seed(0)
    models = chosen_models(args.models, SETTINGS)
    tools = {t.strip() for t in args.tools.split(",")}
    if tools - set(TOOLS):
        parser.error(f"--tools: unknown {', '.join(sorted(tools - set(TOOLS)))}; choose from {', '.join(TOOLS)}")
    if not args.render:
        for model in models:
            run_model(model, tools, args.autoround_recipe, args.autoround_bits, args.scheme_budgets, args.map_budgets,
                      args.bitalloc_budgets)
    records = [json.loads(p.read_text()) for p in sorted((RESULTS / "peers").glob("*.json"))]
    (RESULTS / "peers.md").write_text(report(records))
    plot(records, RESULTS / "peers.png")
    print(RESULTS / "peers.md")


if __name__ == "__main__":
    main()
