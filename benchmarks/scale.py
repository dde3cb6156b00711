"""How the cost and memory of allocating a model grow with its size -> results/scale.md.

A ladder of llama-family shapes (random-init: they serve time and memory, never quality), each built with
``MEASURED_BLOCKS`` decoder blocks at its real width and its real vocabulary, stored in bfloat16 (``--dtype``) in
CPU memory, blocks running one at a time in fp32 on ``--device`` as ``bitalloc run --dtype bfloat16`` runs them.
Every stage runs in its own process (so its peak RSS is its own) on the calibration text's real token ids
(SmolLM2's tokenizer: every shape's vocabulary is at least as large). The two real models (``smollm2-135m``,
``gemma3-270m``) run the same stages loaded as ``bitalloc run --dtype bfloat16`` loads them, cut to their first
``MEASURED_BLOCKS`` blocks, on their own tokenizer's ids; they are left out of the fits below:

- ``capture``: the calibration pass up to the first block (64 x 512 tokens): the fixed part of profile and quantize;
- ``profile``: ``profile_model`` with ``bitalloc run``'s options (``main``: 5 per layer), nothing cached;
  per block = (profile - capture) / blocks;
- ``kl``: the single-layer KL probe as ``bitalloc run`` measures it (1 x 128 tokens): one call that changes block 0
  and one that changes the last block; their difference is one block's forward, the rest the head; the whole
  model's KL pass is then sum over blocks b of linears x options x ((L - b) x block + head): quadratic in depth;
- ``quantize``: ``quantize_model`` with GPTQ 3-bit g128 (act order, mse clip) on every linear, not true-sequential
  as ``bitalloc run``; per block = (quantize - capture) / blocks;
- ``eval``: the block-wise evaluation's forward (:class:`allocator.model.blockwise.BlockwiseForward`) of 4 x 512 tokens
  with the blocks and with one block fewer (each the fastest of ``EVAL_REPEATS`` alternated runs: their difference
  is small and a single pair of timings was noisy enough to come out negative), and its head: per block and head
  per 1k tokens; the whole model's
  evaluation (reference and one quantized variant, 16k tokens) follows.

The extrapolated whole-model time on this machine is the sum of those for the shape's real depth. This shared
machine's speed varies between sessions: the 0.5b profile took 45.7 s per block at 2026-12-04 23:32 UTC and 60.3 s at
2026-12-05 09:47 UTC (the code differs only in summing the losses on one thread, a few seconds per block at most; the
same morning the main job's stages that did not change at all ran 16-28% slower than the evening before:
main_job.md), so compare shapes measured in the same session; each row says when its profile was measured.
Peak RSS is checked against a bound made of what each stage holds by design, every term fixed by the shape's width
(never its depth) but the model's: ``model in storage dtype + process baseline`` (python, torch and transformers
imported, measured) plus, for profile and quantize, ``2 x one block in fp32`` (the working copy and the weights handed
to the quantizers) ``+ a block's inputs and outputs (fp32) + its Hessian sums (fp64) + GPTQ's working set for the
largest linear`` (the stacked weight and codes of each GPTQ option, the Hessian, its inverse and factor, fp32); for
kl and eval, ``one block in fp32 + the windows' activations + the head in fp32`` (a bf16 model's head is copied)
``+ one window's logits, log-probabilities and reference``; for all four, ``one block's forward`` on the windows it
runs at once (8 in profile and quantize: MLP and attention intermediates, attention scores); for capture, the
calibration inputs of block 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import subprocess
import sys
import threading
import time

import numpy as np
import torch
from _common import RESULTS, provenance

SHAPES: dict[str, dict] = {
    # hidden, intermediate, full depth, heads, kv heads, vocab, tied embeddings: the public configs' shapes
    "135m": {"hidden": 576, "intermediate": 1536, "layers": 30, "heads": 9, "kv_heads": 3, "vocab": 49152, "tied": True,
             "like": "SmolLM2-135M"},
    "0.5b": {"hidden": 896, "intermediate": 4864, "layers": 24, "heads": 14, "kv_heads": 2, "vocab": 151936, "tied": True,
             "like": "Qwen2.5-0.5B"},
    "1.5b": {"hidden": 1536, "intermediate": 8960, "layers": 28, "heads": 12, "kv_heads": 2, "vocab": 151936, "tied": True,
             "like": "Qwen2.5-1.5B"},
    "3b": {"hidden": 3072, "intermediate": 8192, "layers": 28, "heads": 24, "kv_heads": 8, "vocab": 128256, "tied": True,
           "like": "Llama-3.2-3B"},
    "8b": {"hidden": 4096, "intermediate": 14336, "layers": 32, "heads": 32, "kv_heads": 8, "vocab": 128256, "tied": False,
           "like": "Llama-3.1-8B"},
    # the real models, loaded as `bitalloc run` loads them and cut to their first MEASURED_BLOCKS blocks
    "smollm2-135m": {"hidden": 576, "intermediate": 1536, "layers": 30, "heads": 9, "kv_heads": 3, "vocab": 49152, "tied": True,
                     "like": "SmolLM2-135M (real)", "real": True},
    "gemma3-270m": {"hidden": 640, "intermediate": 2048, "layers": 18, "heads": 4, "kv_heads": 1, "head_dim": 256, "vocab": 262144,
                    "tied": True, "like": "Gemma-3-270M (real)", "real": True},
}
STAGES = ("baseline", "capture", "profile", "kl", "quantize", "eval")
MEASURED_BLOCKS = 2
SAMPLES, SEQLEN = 64, 512
KL_SEQLEN = 128
OPTIONS = ["main"]
EVAL_WINDOWS = 4
EVAL_REPEATS = 3
EVAL_TOKENS_WHOLE = 16384
LINEARS_PER_BLOCK = 7
OUT = RESULTS / "scale"


def build(shape: dict, blocks: int, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"], num_hidden_layers=blocks,
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
                         tie_word_embeddings=shape["tied"], max_position_embeddings=4096, use_cache=False)
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # initialized in the storage dtype: no fp32 copy on the way
    try:
        model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    model.config.use_cache = False
    return model


def load_real(name: str, dtype: torch.dtype):
    """A real model as ``bitalloc run --dtype`` loads it, cut to its first ``MEASURED_BLOCKS`` blocks; its tokenizer
    and whether its windows start with BOS."""
    from allocator.model.loading import load_model

    loaded = load_model(name, dtype)
    model = loaded.model
    model.model.layers = model.model.layers[:MEASURED_BLOCKS]
    model.config.num_hidden_layers = MEASURED_BLOCKS
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:MEASURED_BLOCKS]
    gc.collect()
    return model, loaded.tokenizer, loaded.add_bos


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from allocator.model.loading import load_model
    from allocator.storage import cache_dir

    found = sorted(cache_dir("models").glob("smollm2-135m-*"))
    if not found:
        load_model("smollm2-135m")  # makes the float cache once (a separate process: its memory is not counted)
        found = sorted(cache_dir("models").glob("smollm2-135m-*"))
    return AutoTokenizer.from_pretrained(found[0])


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StagePeak:
    """The largest RSS while a stage runs, sampled every 10 ms (the process's own peak also holds the harness's
    build of the random model, which can exceed what the stage itself needs)."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self.resident = self._process.memory_info().rss
        self.peak = self.resident
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self._process.memory_info().rss)


def storage_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def worker(name: str, stage: str, dtype: torch.dtype, device_spec: str) -> dict:
    """One stage of one shape in this process (see the module doc)."""
    from allocator.model.corpus import load_corpus
    from allocator.model.loading import LoadedModel
    from allocator.model.placement import resolve_device
    from allocator.model.tokens import calibration_samples

    device = resolve_device(device_spec)
    shape = SHAPES[name]
    record: dict = {"shape": name, "stage": stage, "blocks": MEASURED_BLOCKS, "dtype": str(dtype).removeprefix("torch."),
                    "device": str(device)}
    if stage == "baseline":
        import transformers  # noqa: F401  (what every stage imports)

        import allocator.measure.profile  # noqa: F401

        record["peak_rss"] = peak_rss_bytes()
        return record
    corpus = load_corpus("enwiki")
    tick = time.perf_counter()
    if shape.get("real"):
        model, tokenizer, add_bos = load_real(name, dtype)
    else:
        model, tokenizer, add_bos = build(shape, MEASURED_BLOCKS, dtype), smollm2_tokenizer(), False
    record["build_seconds"] = time.perf_counter() - tick
    record["model_bytes"] = storage_bytes(model)
    record["block_params"] = sum(p.numel() for p in model.model.layers[0].parameters())
    samples = calibration_samples(tokenizer, corpus.calibration, SAMPLES, SEQLEN, add_bos, 0)
    rss_before = peak_rss_bytes()
    gc.collect()
    stage_peak = StagePeak()

    from allocator.model.calibration import capture_block_inputs

    def timed(fn):
        tick = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - tick

    if stage in ("capture", "profile", "quantize"):
        captured, record["capture_seconds"] = timed(lambda: capture_block_inputs(model, samples, device=device))
        del captured
    if stage == "profile":
        from allocator.measure.profile import profile_model
        from allocator.table.options import parse_options

        loaded = LoadedModel(f"random-{name}", model, tokenizer, add_bos=False)
        table, seconds = timed(lambda: profile_model(loaded, corpus, parse_options(OPTIONS), samples=SAMPLES, seqlen=SEQLEN, cache=False,
                                                     keep_weights=False, progress=False, device=device))
        record["profile_seconds"] = seconds
        record["options"] = table.num_options
        record["per_block"] = (seconds - record["capture_seconds"]) / MEASURED_BLOCKS
    elif stage == "quantize":
        from allocator.model.layers import quantizable_linears
        from allocator.quantize.apply import quantize_model
        from allocator.table.options import parse_options, quantizer_from_settings

        settings = parse_options(["gptq3:act_order=true,clip=mse"])[0].settings
        quantizers = {n: quantizer_from_settings(settings) for n in quantizable_linears(model)}
        _, seconds = timed(lambda: quantize_model(model, quantizers, samples, true_sequential=False, progress=False, device=device))
        record["quantize_seconds"] = seconds
        record["per_block"] = (seconds - record["capture_seconds"]) / MEASURED_BLOCKS
    elif stage == "kl":
        from allocator.measure.profile import KLProbe

        windows = samples[:1, :KL_SEQLEN]
        probe, record["probe_setup_seconds"] = timed(lambda: KLProbe(model, windows))
        record["tail_path"] = probe._block_inputs is not None
        first, last = "model.layers.0.self_attn.q_proj", f"model.layers.{MEASURED_BLOCKS - 1}.self_attn.q_proj"
        weights = dict(model.named_parameters())
        overlays = {key: {key: (weights[key + ".weight"].float() * 1.01)} for key in (first, last)}
        probe.mean_kl(overlays[first])  # warm-up
        times = {}
        for key in (first, last):
            runs = [timed(lambda key=key: probe.mean_kl(overlays[key]))[1] for _ in range(3)]
            times[key] = min(runs)
        record["kl_from_first"] = times[first]
        record["kl_from_last"] = times[last]
        record["per_block"] = (times[first] - times[last]) / (MEASURED_BLOCKS - 1)
        record["head"] = times[last] - record["per_block"]
    elif stage == "eval":
        from allocator.model.blockwise import BlockwiseForward

        windows = samples[:EVAL_WINDOWS]
        layers = model.model.layers
        full = fewer = math.inf
        for _ in range(EVAL_REPEATS):  # alternated, fastest of each: one block is a small difference of two timings
            model.model.layers, model.config.num_hidden_layers = layers, MEASURED_BLOCKS
            forward = BlockwiseForward(model, device)
            forward.final_hidden(windows[:1], {})  # warm-up
            hidden, seconds = timed(lambda: forward.final_hidden(windows, {}))
            full = min(full, seconds)
            model.model.layers, model.config.num_hidden_layers = layers[:-1], MEASURED_BLOCKS - 1
            shorter = BlockwiseForward(model, device)
            shorter.final_hidden(windows[:1], {})
            fewer = min(fewer, timed(lambda: shorter.final_hidden(windows, {}))[1])
        model.model.layers, model.config.num_hidden_layers = layers, MEASURED_BLOCKS
        _, head = timed(lambda: [forward.logprobs(h, {}).shape for h in hidden])  # one window's log-probabilities alive at a time
        tokens_k = EVAL_WINDOWS * SEQLEN / 1000
        record["per_block"] = (full - fewer) / tokens_k
        record["head"] = head / tokens_k
        record["embed"] = (fewer - (MEASURED_BLOCKS - 1) * (full - fewer)) / tokens_k
    record["rss_after_build"] = rss_before
    record["peak_rss"] = peak_rss_bytes()
    record["resident_before_stage"] = stage_peak.resident
    record["stage_peak_rss"] = stage_peak.stop()
    return record


GPTQ_OPTIONS = 3
CALIBRATION_WINDOWS = 8
"""Windows per block forward in profile and quantize (``allocator.model.calibration.CALIBRATION_BATCH``)."""
"""GPTQ options in ``OPTIONS`` (2/3/4-bit): the profile quantizes them stacked, one column loop for all."""


def bound_bytes(shape: dict, model_bytes: int, baseline: int, stage: str, stored_fp32: bool = False) -> dict:
    """The memory bound of ``stage``, by term (see the module doc): nothing in it grows with depth but the model."""
    hidden, inter, vocab = shape["hidden"], shape["intermediate"], shape["vocab"]
    head_dim = shape.get("head_dim", hidden // shape["heads"])
    attention = shape["heads"] * head_dim  # q's outputs and o's inputs
    block = 4 * (hidden * (2 * shape["heads"] + 2 * shape["kv_heads"]) * head_dim + 3 * hidden * inter + 2 * hidden)
    terms = {"model": model_bytes, "baseline": baseline}

    def forward(windows: int, seqlen: int) -> int:
        """One block's forward on ``windows`` at once: MLP gate/up/product, attention's q/k/v/output, and its scores."""
        return 4 * windows * seqlen * (3 * inter + 4 * hidden) + 2 * 4 * windows * shape["heads"] * seqlen * seqlen

    if stage == "capture":
        terms["activations"] = SAMPLES * SEQLEN * hidden * 4
    elif stage in ("profile", "quantize"):
        copies = GPTQ_OPTIONS if stage == "profile" else 1
        terms["blocks_fp32"] = 2 * block  # the working copy, and its weights handed to the quantizers
        terms["activations"] = 2 * SAMPLES * SEQLEN * hidden * 4  # a block's inputs and outputs
        terms["hessians"] = 8 * (2 * hidden * hidden + attention * attention + inter * inter)  # fp64 sums: qkv, o, gate/up, down inputs
        # the largest linear (down_proj) under GPTQ: stacked weight and codes per option, H, its inverse and factor
        terms["gptq"] = 2 * copies * hidden * inter * 4 + 3 * inter * inter * 4
        terms["forward"] = forward(CALIBRATION_WINDOWS, SEQLEN)
    else:  # kl, eval: block-wise forward and the head
        windows, seqlen = (1, KL_SEQLEN) if stage == "kl" else (EVAL_WINDOWS, SEQLEN)
        terms["blocks_fp32"] = block
        terms["activations"] = 2 * windows * seqlen * max(hidden, inter) * 4
        terms["head"] = 0 if stored_fp32 else vocab * hidden * 4  # the head's fp32 copy
        terms["logits"] = 3 * seqlen * vocab * 4  # one window's logits, log-probabilities and the reference's
        terms["forward"] = forward(windows, seqlen)
    terms["total"] = sum(terms.values())
    return terms


def whole_model(shape: dict, stages: dict[str, dict], options: int) -> dict:
    """Extrapolated whole-model seconds per stage at the shape's real depth (see the module doc)."""
    depth = shape["layers"]
    out = {}
    if "profile" in stages:
        out["profile"] = stages["profile"]["capture_seconds"] + depth * stages["profile"]["per_block"]
    if "kl" in stages:
        kl = stages["kl"]
        out["kl"] = sum(LINEARS_PER_BLOCK * options * ((depth - b) * kl["per_block"] + kl["head"]) for b in range(depth))
    if "quantize" in stages:
        out["quantize"] = stages["quantize"]["capture_seconds"] + depth * stages["quantize"]["per_block"]
    if "eval" in stages:
        ev = stages["eval"]
        out["eval"] = 2 * EVAL_TOKENS_WHOLE / 1000 * (depth * ev["per_block"] + ev["head"] + ev.get("embed", 0.0))  # reference + one variant
    out["total"] = sum(out.values())
    return out


def gib(value: float) -> str:
    return f"{value / 2**30:.2f}"


def block_linear_shapes(shape: dict) -> list[tuple[int, int]]:
    """(out, in) of the 7 linears of one block of ``shape``."""
    hidden, head_dim = shape["hidden"], shape.get("head_dim", shape["hidden"] // shape["heads"])
    kv, attention = shape["kv_heads"] * head_dim, shape["heads"] * head_dim
    return [(attention, hidden), (kv, hidden), (kv, hidden), (hidden, attention),
            (shape["intermediate"], hidden), (shape["intermediate"], hidden), (hidden, shape["intermediate"])]


def width_term(records: dict[str, dict[str, dict]]) -> list[str]:
    """Where profile and quantize are not linear in parameters: a fit of per-block time to ``a x params + b x
    sum(out x in^2)``, the second term GPTQ's (its Hessian inverse and column loop cost out x in^2 per linear)."""
    lines = ["", "Where it is not linear: GPTQ costs O(out x in^2) per linear (its column loop and Hessian inverse), so a "
             "wider block costs more per parameter. Fitting each stage's per-block time to `a x params + b x sum(out x in^2)` "
             "(relative least squares over the random-init shapes):", "",
             "| stage | shape | measured s / block | fitted | share of the width term |", "|---|---|---|---|---|"]
    for stage in ("profile", "quantize"):
        names = [n for n, stages in records.items() if stage in stages and not SHAPES[n].get("real")]
        if len(names) < 3:
            continue
        terms = np.array([[sum(o * i for o, i in block_linear_shapes(SHAPES[n])), sum(o * i * i for o, i in block_linear_shapes(SHAPES[n]))]
                          for n in names], dtype=float)
        measured = np.array([records[n][stage]["per_block"] for n in names])
        coefficients = np.linalg.lstsq(terms / measured[:, None], np.ones(len(names)), rcond=None)[0]
        fitted = terms @ coefficients
        for n, m, f, width in zip(names, measured, fitted, terms[:, 1] * coefficients[1]):
            lines.append(f"| {stage} | {n} | {m:.1f} | {f:.1f} ({f / m - 1:+.0%}) | {width / f:.0%} |")
    return lines


def report(records: dict[str, dict[str, dict]]) -> str:
    lines = ["# Scale: cost and memory per block, from 135M to 8B shapes", "", (__doc__ or "").split("\n\n", 1)[1].strip(), ""]
    first = next((r for stages in records.values() for r in stages.values() if "provenance" in r), None)
    if first:
        lines += [first["provenance"], ""]
    lines += ["## Time per block (seconds; eval: per 1k tokens)", "",
              "| shape | like | block params | capture (fixed) | profile / block | KL fwd / block | KL head | quantize / block | "
              "eval / block / 1k tok | eval head / 1k tok | profile measured |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, stages in records.items():
        shape = SHAPES[name]
        cell = lambda stage, key, fmt="{:.2f}": fmt.format(stages[stage][key]) if stage in stages and key in stages[stage] else "-"  # noqa: E731
        params = next((s["block_params"] for s in stages.values() if "block_params" in s), 0)
        lines.append(f"| {name} | {shape['like']} | {params / 1e6:.1f}M | {cell('profile', 'capture_seconds')} | {cell('profile', 'per_block')} | "
                     f"{cell('kl', 'per_block', '{:.3f}')} | {cell('kl', 'head', '{:.3f}')} | {cell('quantize', 'per_block')} | "
                     f"{cell('eval', 'per_block', '{:.3f}')} | {cell('eval', 'head', '{:.3f}')} | {measured_on(stages.get('profile', {}))} |")
    lines += ["", "Linear growth means per-block cost proportional to block parameters: the ratio column below divides each "
              "shape's profile and quantize time per block by its block parameters (seconds per 100M parameters).", "",
              "| shape | profile s / 100M params | quantize s / 100M params |", "|---|---|---|"]
    for name, stages in records.items():
        params = next((s["block_params"] for s in stages.values() if "block_params" in s), 0)
        if not params:
            continue
        ratio = lambda stage: f"{stages[stage]['per_block'] / params * 1e8:.1f}" if stage in stages else "-"  # noqa: E731
        lines.append(f"| {name} | {ratio('profile')} | {ratio('quantize')} |")
    fits = []
    for stage in ("profile", "quantize", "kl", "eval"):
        points = [(next(r["block_params"] for r in stages.values() if "block_params" in r), stages[stage]["per_block"])
                  for name, stages in records.items() if stage in stages and stages[stage]["per_block"] > 0 and not SHAPES[name].get("real")]
        if len(points) >= 2:
            x, y = np.log([p for p, _ in points]), np.log([t for _, t in points])
            fits.append(f"`{stage}` {np.polyfit(x, y, 1)[0]:.2f}")
    if fits:
        lines += ["", "Per-block time grows as (block parameters)^k, k fitted over the random-init shapes (1 is linear): "
                  + ", ".join(fits) + "."]
    lines += width_term(records)
    lines += ["", "## Extrapolated whole model on this machine (minutes)", "",
              "| shape | depth | profile | single-layer KL (all options) | quantize | eval (2 x 16k tokens) | total |", "|---|---|---|---|---|---|---|"]
    for name, stages in records.items():
        shape = SHAPES[name]
        options = stages.get("profile", {}).get("options", 5)
        whole = whole_model(shape, stages, options)
        cell = lambda key: f"{whole[key] / 60:.1f}" if key in whole else "-"  # noqa: E731
        lines.append(f"| {name} | {shape['layers']} | {cell('profile')} | {cell('kl')} | {cell('quantize')} | {cell('eval')} | {cell('total')} |")
    lines += ["", "## Peak RSS against the bound (GiB)", "",
              "Each stage's peak RSS is sampled while the stage runs (every 10 ms), on top of what was resident when it "
              "started: the model, the process baseline and the harness (tokenizer, corpus text, calibration ids). The "
              "bound is that resident memory plus the stage's terms; for the whole model the model term grows by the "
              "blocks not built, nothing else.", "",
              "| shape | stage | model (measured blocks) | resident at start | stage terms | bound | stage peak | peak / bound | "
              "whole-model bound | commit |", "|---|---|---|---|---|---|---|---|---|---|"]
    ratios: dict[str, list[float]] = {}
    for name, stages in records.items():
        shape = SHAPES[name]
        baseline = stages.get("baseline", {}).get("peak_rss", 0)
        for stage in ("capture", "profile", "quantize", "kl", "eval"):
            if stage not in stages or "stage_peak_rss" not in stages[stage]:
                continue
            r = stages[stage]
            terms = bound_bytes(shape, r["model_bytes"], baseline, stage, r["dtype"] == "float32")
            working = terms["total"] - terms["model"] - terms["baseline"]
            bound = r["resident_before_stage"] + working
            block_storage = r["block_params"] * (2 if r["dtype"] in ("bfloat16", "float16") else 4)
            whole = bound + (shape["layers"] - MEASURED_BLOCKS) * block_storage
            lines.append(f"| {name} | {stage} | {gib(r['model_bytes'])} | {gib(r['resident_before_stage'])} | {gib(working)} | "
                         f"{gib(bound)} | {gib(r['stage_peak_rss'])} | {r['stage_peak_rss'] / bound:.2f} | {gib(whole)} | {commit_of(r)} |")
            ratios.setdefault("real" if shape.get("real") else "random", []).append(r["stage_peak_rss"] / bound)
    if ratios:
        spans = {kind: f"{min(v):.2f}-{max(v):.2f}" for kind, v in ratios.items()}
        lines += ["", f"Peak / bound: {spans.get('random', '-')} over the random-init shapes, with no trend in their size, and "
                  f"{spans.get('real', '-')} on the real models. The terms model a llama block; what exceeds them is not "
                  "itemized (Gemma3's block, with q/k norms, 256-wide heads and a 262k-vocabulary embedding, exceeds them most). "
                  "No term grows with depth: the whole-model bound adds only the unbuilt blocks' storage."]
    return "\n".join(lines) + "\n"


def measured_on(record: dict) -> str:
    """Date and commit a stage was measured at (this shared machine's speed has varied from day to day)."""
    text = record.get("provenance", "")
    date = text.split("- date: ")[-1].splitlines()[0][:16] if "- date: " in text else "-"
    return f"{date} {commit_of(record)}"


def commit_of(record: dict) -> str:
    """The commit a stage's record was measured at (stages of one table may come from several runs)."""
    return record.get("provenance", "").split("- commit: ")[-1].splitlines()[0] if "- commit: " in record.get("provenance", "") else "-"


def load_records() -> dict[str, dict[str, dict]]:
    records: dict[str, dict[str, dict]] = {}
    for name in SHAPES:
        for stage in STAGES:
            path = OUT / f"{name}-{stage}.json"
            if path.is_file():
                records.setdefault(name, {})[stage] = json.loads(path.read_text())
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--render", action="store_true", help="only rewrite scale.md from the saved records")
    parser.add_argument("--worker", nargs=2, metavar=("SHAPE", "STAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], dtype, args.device)))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.render:
        for name in args.shapes.split(","):
            if name not in SHAPES:
                raise SystemExit(f"unknown shape {name!r}; choose from {', '.join(SHAPES)}")
            for stage in args.stages.split(","):
                path = OUT / f"{name}-{stage}.json"
                if path.is_file():
                    continue
                done = subprocess.run([sys.executable, __file__, "--worker", name, stage, "--dtype", args.dtype, "--device", args.device],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"{name} {stage} failed:\n{done.stderr[-3000:]}", flush=True)
                    continue
                record = json.loads(done.stdout.strip().splitlines()[-1])
                record["provenance"] = provenance()
                path.write_text(json.dumps(record, indent=1))
                print(f"{name} {stage}: " + ", ".join(f"{k} {v:.3g}" for k, v in record.items() if isinstance(v, float)), flush=True)
    (RESULTS / "scale.md").write_text(report(load_records()))
    print(RESULTS / "scale.md")


if __name__ == "__main__":
    main()
