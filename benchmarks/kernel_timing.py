"""Packed low-bit CPU kernels against fp32 torch matmul -> results/kernels.md (and results/kernels.json).

(Not named kernels.py: transformers probes for an optional package called ``kernels``, and a
script of that name in this directory would shadow it.)

Three parts, all in one run on one machine:

1. Per weight shape (out x in: SmolLM2's and Gemma3's decoder linears and a 4096x4096) and bit width
   1-4 (uniform grid, group size 128): time of y = x @ W^T through :mod:`quantizers.kernels` for
   1 token (GEMV, decode; with float and with int8-rounded activations) and a few tokens (GEMM,
   prefill), beside ``F.linear`` with the fp32 weight.
   "hot" repeats one product, so the weight sits in cache; "streamed" (1 token) cycles through
   enough copies of the weight to overflow the caches, as a decode pass over a whole model does,
   calling each product from Python ("streamed") or all of them from one C call ("streamed, C loop":
   the kernel alone, as the C decode step uses it).
2. The memory-bandwidth floor of each product: bytes the kernel reads (packed codes + fp16
   (scale, zero) pairs, or the fp32 weight) divided by a STREAM-like copy bandwidth measured here.
3. End to end: SmolLM2-135M decode tokens/s (KV cache, greedy, one token per step) and a 64-token
   prefill with a mixed ~2.5-bpw map of uniform grids (RTN, g128: attention 3-bit, gate/up 2-bit,
   down alternating 2/3 by block) running on QuantLinear, against the fp32 model: through
   transformers and through bitalloc's lean decoder, with float or int8 decode activations, with
   the fp32 or an 8-bit LM head, beside llama.cpp (``--llama-gguf``) in the same run; where each
   token's time goes; and the decode-mode perplexity of int8 activations.

Timing: median of several batches of calls after a warm-up, wall clock, torch's thread count.
Run on an otherwise idle machine; ``--smoke`` runs one small shape to check the script works.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _common import RESULTS, provenance

from allocator.gguf.llama_eval import decode_speed, load_llama
from allocator.model.layers import quantizable_linears, swapped_weights
from allocator.model.loading import load_model
from allocator.quantize.apply import QuantizedModel, quantize_model
from allocator.quantize.head import quantize_head
from allocator.runtime.decode_loops import DecodeTiming, teacher_forced_logits, timed_greedy, timed_lean_greedy
from allocator.runtime.decoder import LlamaDecoder
from allocator.runtime.packed import install_quantized
from allocator.storage import write_json
from quantizers import RTNQuantizer
from quantizers.kernels import GEMM_MAX_BATCH, KernelWeight, QuantLinear, dequantize_reference, kernel_library, round_activations_int8
from quantizers.kernels.build import WeightDescriptor
from quantizers.kernels.layout import ChunkGeometry, pack_chunks
from quantizers.kernels.ops import PreparedWeight

SHAPES: dict[str, list[tuple[int, int]]] = {
    "smollm2-135m": [(576, 576), (192, 576), (1536, 576), (576, 1536)],  # q/o, k/v, gate/up, down
    "gemma3-270m": [(1024, 640), (256, 640), (640, 1024), (2048, 640), (640, 2048)],  # q, k/v, o, gate/up, down
    "large": [(4096, 4096)],
    "smollm2-head": [(49152, 576)],  # the LM head (8-bit with --lm-head-bits 8)
}
GROUP_SIZE = 128
STREAM_BYTES = 256 * 2**20
"""Size of each array in the bandwidth copy, and the least total size of the streamed weight copies
(an eighth of it with --smoke)."""


@dataclass
class ShapeRow:
    family: str
    rows: int
    cols: int
    bits: int | None
    """None: the fp32 torch baseline."""
    tokens: int
    mode: str
    """"hot" or "streamed"."""
    seconds: float
    weight_bytes: int
    bandwidth_floor_seconds: float
    max_rel_error: float | None
    activations: str = "fp32"
    """"fp32", or "int8": the decode GEMV on activations rounded to int8 per block of up to 128 columns."""


def time_call(fn: Callable[[], Any], min_seconds: float, batches: int = 5) -> float:
    """Median seconds per call over ``batches`` batches of calls, each lasting about ``min_seconds / batches``."""
    for _ in range(3):
        fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    per_batch = max(1, int(min_seconds / batches / once))
    samples = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(per_batch):
            fn()
        samples.append((time.perf_counter() - start) / per_batch)
    return statistics.median(samples)


def copy_bandwidth(nbytes: int = STREAM_BYTES, repeats: int = 5) -> float:
    """STREAM-copy bandwidth in bytes/s: (read + write) bytes of a large tensor copy, best of ``repeats``."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def call_overhead(min_seconds: float) -> dict[str, float]:
    """Microseconds per GEMV on an 8x32 weight, where the product itself is negligible: the fixed cost of
    one call (Python binding, ctypes, output allocation, thread dispatch), beside fp32 ``F.linear``."""
    lib = kernel_library()
    weight = random_weight(8, 32, 4, seed=0)
    prepared = PreparedWeight(lib, weight)
    x, dense = torch.randn(1, 32), torch.randn(8, 32)
    return {"kernel_us": time_call(lambda: prepared(x), min_seconds) * 1e6,
            "fp32_linear_us": time_call(lambda: F.linear(x, dense), min_seconds) * 1e6}


def random_weight(rows: int, cols: int, bits: int, seed: int) -> KernelWeight:
    """A weight in the kernel layout with random codes, scales and zero points (speed does not depend on values)."""
    rng = np.random.default_rng(seed)
    geometry = ChunkGeometry(cols, GROUP_SIZE, bits)
    codes = rng.integers(0, 1 << bits, size=(rows, cols), dtype=np.uint8)
    scales = torch.from_numpy(rng.uniform(0.002, 0.02, size=(rows, geometry.groups))).to(torch.float16)
    zeros = torch.from_numpy(rng.integers(0, 1 << bits, size=(rows, geometry.groups))).to(torch.float16)
    return KernelWeight(torch.from_numpy(pack_chunks(codes, geometry)), torch.stack([scales, zeros], -1).contiguous(),
                        (rows, cols), bits, GROUP_SIZE, symmetric=False)


def bench_shapes(families: Sequence[str], bits_list: Sequence[int], token_counts: Sequence[int], bandwidth: float,
                 min_seconds: float, stream_bytes: int) -> list[ShapeRow]:
    """Time every (shape, bits, tokens); ``stream_bytes`` > 0 adds the streamed GEMV rows."""
    lib = kernel_library()
    if lib is None:
        raise SystemExit("the kernels did not build (see the warning); nothing to benchmark")
    rows_out: list[ShapeRow] = []
    for family in families:
        for rows, cols in SHAPES[family]:
            generator = torch.Generator().manual_seed(rows * cols)
            inputs = {t: torch.randn(t, cols, generator=generator) for t in token_counts}
            dense = torch.randn(rows, cols, generator=generator)
            for tokens in token_counts:
                x = inputs[tokens]
                seconds = time_call(lambda: F.linear(x, dense), min_seconds)
                rows_out.append(ShapeRow(family, rows, cols, None, tokens, "hot", seconds, dense.numel() * 4,
                                         dense.numel() * 4 / bandwidth, None))
            if stream_bytes and 1 in token_counts:
                copies = [dense.clone() for _ in range(max(2, math.ceil(stream_bytes / (dense.numel() * 4))))]
                rows_out.append(_streamed_row(family, rows, cols, None, inputs[1], [lambda x, w=w: F.linear(x, w) for w in copies],
                                              dense.numel() * 4, bandwidth, min_seconds))
                del copies
            for bits in bits_list:
                weight = random_weight(rows, cols, bits, seed=bits)
                reference = dequantize_reference(weight)
                for activations in ("fp32", "int8"):
                    int8 = activations == "int8"
                    prepared = PreparedWeight(lib, weight, None, int8)
                    for tokens in token_counts if not int8 else [t for t in token_counts if t == 1]:
                        x = inputs[tokens]
                        got = prepared(x)
                        # the int8 GEMV is exact for the rounded input: its error against the rounded product
                        exact = (round_activations_int8(x, weight.geometry) if int8 else x).double() @ reference.double().T
                        error = float((got.double() - exact).abs().max() / exact.abs().max())
                        seconds = time_call(lambda: prepared(x), min_seconds)
                        rows_out.append(ShapeRow(family, rows, cols, bits, tokens, "hot", seconds, weight.nbytes,
                                                 weight.nbytes / bandwidth, error, activations))
                    if stream_bytes and 1 in token_counts:
                        count = min(4096, max(2, math.ceil(stream_bytes / weight.nbytes)))
                        copies = [PreparedWeight(lib, KernelWeight(weight.codes.clone(), weight.params.clone(), weight.shape, bits,
                                                                   GROUP_SIZE, False), None, int8) for _ in range(count)]
                        row = _streamed_row(family, rows, cols, bits, inputs[1], copies, weight.nbytes, bandwidth, min_seconds)
                        rows_out.append(dataclasses.replace(row, activations=activations))
                        rows_out.append(_c_loop_row(lib, row, copies, inputs[1], int8, min_seconds))
                        del copies
                print(f"{family} {rows}x{cols} {bits}-bit done", flush=True)
    return rows_out


def _streamed_row(family: str, rows: int, cols: int, bits: int | None, x: torch.Tensor, products: list[Callable[[torch.Tensor], Any]],
                  weight_bytes: int, bandwidth: float, min_seconds: float) -> ShapeRow:
    """Seconds per product when every call reads a different copy of the weight (caches overflowed)."""
    state = {"i": 0}

    def step() -> None:
        products[state["i"] % len(products)](x)
        state["i"] += 1

    seconds = time_call(step, max(min_seconds, 0.5))
    return ShapeRow(family, rows, cols, bits, 1, "streamed", seconds, weight_bytes, weight_bytes / bandwidth, None)


def _c_loop_row(lib: Any, row: ShapeRow, copies: list[PreparedWeight], x: torch.Tensor, int8: bool, min_seconds: float) -> ShapeRow:
    """The streamed products again, all issued by one C call (``bq_gemv_sequence``): the kernel's own
    throughput with no Python between products, as the C decode step sees it."""
    descriptors = (WeightDescriptor * len(copies))(*[c._descriptor for c in copies])
    y = torch.empty(row.rows)
    seconds = time_call(lambda: lib.lib.bq_gemv_sequence(ctypes.addressof(descriptors), len(copies), x.data_ptr(), y.data_ptr(), int(int8)),
                        max(min_seconds, 0.5), batches=3) / len(copies)
    return dataclasses.replace(row, mode="streamed, C loop", seconds=seconds, activations="int8" if int8 else "fp32")


# ----------------------------------------------------------------------------- end to end


def mixed_bits(name: str, block: int) -> int:
    """The ~2.5-bpw map: attention 3-bit, gate/up 2-bit, down 2-bit on even blocks and 3-bit on odd ones."""
    if ".self_attn." in name:
        return 3
    if name.endswith("down_proj"):
        return 2 + block % 2
    return 2


@dataclass
class DecodeVariant:
    """One way of decoding: how to time it and which modules its breakdown hooks."""

    label: str
    title: str
    run: Callable[[torch.Tensor, int], DecodeTiming]
    """(prompt ids (1 x n), new tokens) -> the timed greedy decode."""
    linears: list[torch.nn.Module]
    head: torch.nn.Module | None
    """None: the step runs in one C call, so hooks see nothing inside it."""


def hf_variant(label: str, title: str, model: torch.nn.Module) -> DecodeVariant:
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, QuantLinear) and m is not head]
    return DecodeVariant(label, title, lambda ids, n: timed_greedy(model, ids, n), linears, head)


def lean_variant(label: str, title: str, decoder: LlamaDecoder) -> DecodeVariant:
    linears = [m for block in decoder.blocks for m in (*block.qkv, block.o_proj, *block.gate_up, block.down_proj)]
    hooked = decoder.native_step is None
    return DecodeVariant(label, title, lambda ids, n: timed_lean_greedy(decoder, ids[0].tolist(), n), linears if hooked else [],
                         decoder.head if hooked else None)


def set_int8_activations(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.int8_activations = enabled
    return model


def decode_breakdown(variant: DecodeVariant, prompt: torch.Tensor, new_tokens: int) -> dict[str, float]:
    """Milliseconds per decoded token inside the decoder linears, inside the LM head, and the rest
    (attention, norms, rotary, embeddings, per-step Python), from forward hooks on one timed run that
    count only single-token calls (the decode steps, not the prefill). The hooks themselves add
    ~1-2 us per call, counted in "rest"."""
    spent = {"linears": 0.0, "head": 0.0}
    started: dict[int, float] = {}

    def before(module: torch.nn.Module, _args: Any) -> None:
        started[id(module)] = time.perf_counter()

    def after(module: torch.nn.Module, args: Any, _out: Any) -> None:
        if args[0].numel() == args[0].shape[-1]:  # one token
            spent["head" if module is variant.head else "linears"] += time.perf_counter() - started[id(module)]

    if variant.head is None:
        step = variant.run(prompt, new_tokens).seconds_per_token
        return {"total": step * 1e3}
    hooked = [*variant.linears, variant.head]
    handles = [h for m in hooked for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        step = variant.run(prompt, new_tokens).seconds_per_token
    finally:
        for handle in handles:
            handle.remove()
    ms = {key: value / new_tokens * 1e3 for key, value in spent.items()}
    return {**ms, "rest": step * 1e3 - ms["linears"] - ms["head"], "total": step * 1e3}


@torch.inference_mode()
def decode_quality(loaded: Any, models: dict[str, torch.nn.Module], tokens: int, seqlen: int = 256) -> dict[str, Any]:
    """Perplexity of the evaluation split decoded one token at a time (every product a single-token GEMV,
    the path int8 activations change) by each model's lean decoder (C step), and the mean KL of every
    model's next-token distribution from the first one's."""
    from allocator.jobs.compare import EvalSettings, evaluation_tokens
    from allocator.model.corpus import load_corpus

    decoders = {label: LlamaDecoder(model, seqlen, native=True) for label, model in models.items()}
    windows = evaluation_tokens(loaded, load_corpus(), EvalSettings(tokens=tokens, seqlen=seqlen))
    nll = {label: 0.0 for label in decoders}
    kl = {label: 0.0 for label in decoders}
    count = 0
    first = next(iter(decoders))
    for window in windows:
        # every decoder steps through the window together, so each position's distributions can be compared
        steps = zip(*(teacher_forced_logits(d, window[:-1]) for d in decoders.values()))
        for position, logits in enumerate(steps):
            logprobs = {label: torch.log_softmax(step.double(), -1) for label, step in zip(decoders, logits)}
            target = int(window[position + 1])
            for label, lp in logprobs.items():
                nll[label] -= float(lp[target])
                kl[label] += float((logprobs[first].exp() * (logprobs[first] - lp)).sum())
            count += 1
    return {"tokens": count, "windows": int(windows.shape[0]), "seqlen": seqlen,
            "ppl": {label: math.exp(value / count) for label, value in nll.items()},
            "kl_from_" + first: {label: value / count for label, value in kl.items()}}


def head_quality(loaded: Any, quantized: Any, head_bits: int, tokens: int) -> dict[str, float]:
    """Perplexity and KL of the packed linears with the float head and with the quantized head."""
    from allocator.evaluate.perplexity import evaluate
    from allocator.jobs.compare import EvalSettings, evaluation_tokens
    from allocator.model.corpus import load_corpus

    windows = evaluation_tokens(loaded, load_corpus(), EvalSettings(tokens=tokens))
    linears = quantized.dequantized_weights()
    head = {name: qt.dequantized for name, qt in quantize_head(loaded.model, head_bits).items()}
    results = evaluate(loaded.model, windows, {"float head": linears, "quantized head": {**linears, **head}, "head only": head},
                       progress=False)
    return {"eval_tokens": results["float head"].tokens, "reference_ppl": results["reference"].perplexity,
            "head_only_ppl": results["head only"].perplexity, "head_only_kl": results["head only"].kl,
            "float_head_ppl": results["float head"].perplexity, "float_head_kl": results["float head"].kl,
            "quantized_head_ppl": results["quantized head"].perplexity, "quantized_head_kl": results["quantized head"].kl}


def quality_model_decode(loaded: Any, head: QuantLinear, tokens: int) -> dict[str, Any]:
    """:func:`decode_quality` of a usable model (every linear RTN 4-bit g128, the same packed head), float
    against int8 activations: the speed map is far too lossy for its perplexity to say much."""
    model = copy.deepcopy(loaded.model)
    names = quantizable_linears(model)
    install_quantized(model, quantize_model(model, {name: RTNQuantizer(4, GROUP_SIZE) for name in names}, progress=False))
    model.lm_head = copy.deepcopy(head)
    return decode_quality(loaded, {"float activations": set_int8_activations(model, False),
                                   "int8 activations": set_int8_activations(copy.deepcopy(model), True)}, tokens)


def bench_end_to_end(model_name: str, new_tokens: int, prompt_tokens: int, repeats: int, head_bits: int = 8,
                     head_eval_tokens: int = 4096, ggufs: dict[str, Path] | None = None, decode_eval_tokens: int = 512) -> dict[str, Any]:
    loaded = load_model(model_name)
    model = loaded.model
    names = list(quantizable_linears(model))
    assignment = {name: RTNQuantizer(mixed_bits(name, int(name.split(".")[2])), GROUP_SIZE) for name in names}
    start = time.perf_counter()
    quantized = quantize_model(model, assignment, progress=False)
    quantize_s = time.perf_counter() - start
    kernel_model = copy.deepcopy(model)
    start = time.perf_counter()
    kinds = install_quantized(kernel_model, quantized)
    convert_s = time.perf_counter() - start
    assert set(kinds.values()) == {"kernel"}
    set_int8_activations(kernel_model, False)
    text = "The history of the city begins with a small settlement on the river, where traders from the north " * 8
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids[:, :prompt_tokens]
    # the kernel model against the simulated one (fp32 dequantized weights): same logits up to summation order
    with torch.inference_mode(), swapped_weights(model, quantized.dequantized_weights()):
        simulated = model(ids[:, :16]).logits
        on_kernels = kernel_model(ids[:, :16]).logits
    logit_error = float((simulated - on_kernels).abs().max() / simulated.abs().max())
    head_model = copy.deepcopy(kernel_model)
    install_quantized(head_model, QuantizedModel(head=quantize_head(model, head_bits)))
    head_int8_model = set_int8_activations(copy.deepcopy(head_model), True)
    max_length = ids.shape[1] + new_tokens + 1
    lean_torch = LlamaDecoder(head_model, max_length, native=False)
    lean_float = LlamaDecoder(head_model, max_length, native=True)
    lean_int8 = LlamaDecoder(head_int8_model, max_length, native=True)
    head = f"{head_bits}-bit head"
    variants = [
        hf_variant("fp32", "fp32 (transformers)", model),
        hf_variant("packed", "packed, fp32 head (transformers)", kernel_model),
        hf_variant("packed_head", f"packed + {head} (transformers)", head_model),
        lean_variant("lean_torch", f"packed + {head}, lean decoder, torch step", lean_torch),
        lean_variant("lean_c", f"packed + {head}, lean decoder, C step", lean_float),
        lean_variant("lean_c_int8", f"packed + {head}, lean decoder, C step, int8 decode activations", lean_int8),
    ]
    llamas = {label: load_llama(path, seqlen=max_length, threads=torch.get_num_threads()) for label, path in (ggufs or {}).items()}
    # repeats interleaved over every variant, llama.cpp's included: the VM's speed drifts by tens of
    # percent over minutes, and interleaving spreads the drift over all of them alike
    all_runs: dict[str, list[DecodeTiming]] = {v.label: [] for v in variants}
    llama_speeds: dict[str, list[float]] = {label: [] for label in llamas}
    for _ in range(repeats):
        for variant in variants:
            all_runs[variant.label].append(variant.run(ids, new_tokens))
        for label, llm in llamas.items():
            llama_speeds[label].append(decode_speed(llm, ids[0].numpy(), new_tokens))
    del llamas
    results: dict[str, Any] = {}
    for variant in variants:
        runs = all_runs[variant.label]
        prefill = statistics.median(r.prefill_seconds for r in runs)
        step = statistics.median(r.seconds_per_token for r in runs)
        results[variant.label] = {"title": variant.title, "prefill_s": prefill, "decode_s_per_token": step, "tokens_per_s": 1 / step,
                                  "prefill_tokens_per_s": ids.shape[1] / prefill, "greedy": runs[0].tokens}
    linear_fp32_bytes = sum(m.weight.numel() * 4 for m in quantizable_linears(model).values())
    packed_bytes = sum(m.weight_layout.nbytes for m in kernel_model.modules() if isinstance(m, QuantLinear))
    breakdown = {v.label: decode_breakdown(v, ids, new_tokens) for v in variants}
    reference_greedy = results["packed_head"]["greedy"]
    for result in results.values():
        result["greedy_agreement_with_packed_head"] = next((i for i, (a, b) in enumerate(zip(result["greedy"], reference_greedy)) if a != b),
                                                           len(reference_greedy))
    head_bytes = head_model.get_output_embeddings().weight_layout.nbytes
    return {
        "model": model_name,
        "variants": results,
        "llama_cpp_tokens_per_s": {label: statistics.median(v) for label, v in llama_speeds.items()},
        "head_bits": head_bits,
        "head_fp32_mb": model.get_output_embeddings().weight.numel() * 4 / 1e6,
        "head_packed_mb": head_bytes / 1e6,
        "breakdown_ms": breakdown,
        "head_quality": head_quality(loaded, quantized, head_bits, head_eval_tokens) if head_eval_tokens else None,
        "decode_quality": {
            "map": decode_quality(loaded, {"float activations": head_model, "int8 activations": head_int8_model}, decode_eval_tokens),
            "rtn4": quality_model_decode(loaded, head_model.get_output_embeddings(), decode_eval_tokens),
        } if decode_eval_tokens else None,
        "bpw": quantized.bits_per_weight,
        "map": "attention 3-bit, gate/up 2-bit, down 2-bit (even blocks) / 3-bit (odd blocks); RTN asymmetric g128",
        "quantize_s": quantize_s,
        "convert_s": convert_s,
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": new_tokens,
        "linear_fp32_mb": linear_fp32_bytes / 1e6,
        "linear_packed_mb": packed_bytes / 1e6,
        "max_rel_logit_error_vs_simulated": logit_error,
    }


# ----------------------------------------------------------------------------- report


def markdown(shape_rows: list[ShapeRow], bandwidth: float, stream_bytes: int, e2e: dict[str, Any] | None,
             settings: dict[str, Any], run_provenance: str, library: str, overhead: dict[str, float] | None = None) -> str:
    lines = [
        "# Packed low-bit CPU kernels vs. fp32 torch matmul\n",
        run_provenance,
        library,
        f"- settings: {json.dumps(settings)}",
        f"- STREAM-like copy bandwidth (2 x {stream_bytes // 2**20} MiB moved per copy, best of 5): **{bandwidth / 1e9:.1f} GB/s**",
        *([f"- fixed cost per call: a GEMV on an 8x32 weight takes {overhead['kernel_us']:.1f} us through the kernels "
           f"(fp32 F.linear: {overhead['fp32_linear_us']:.1f} us)"] if overhead else []),
        "",
    ]
    if shape_rows:
        lines += [
            "## Per shape (uniform grid, group size 128)\n",
            "Times in microseconds per product (median). `floor` is the memory-bandwidth limit: bytes the product reads "
            "(packed codes + fp16 (scale, zero) per group, or the fp32 weight) / the copy bandwidth. `hot` repeats one "
            "product (weight in cache, so it can beat the DRAM floor); `streamed` cycles through copies of the weight "
            f"totalling >= {stream_bytes // 2**20} MiB (at most 4096 copies), as a decode pass over a model larger than "
            "the caches does, one Python call per product; `streamed, C loop` issues the same products from one C call "
            "(`bq_gemv_sequence`), so it is the kernel's own time, as the C decode step sees it. "
            "`speed-up` is fp32 time / kernel time in the same mode. `rel err` is max |kernel - exact| / max |exact| "
            "against a float64 product with the same dequantized weight. `of floor` is floor / time: the share of the "
            "bandwidth limit reached (the target is >= 50% for streamed GEMV).\n",
            *streamed_summary(shape_rows),
            "| shape (out x in) | tokens | mode | weight | KiB | us | floor us | of floor | speed-up vs fp32 | rel err |",
            "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        baseline = {(r.rows, r.cols, r.tokens, r.mode): r.seconds for r in shape_rows if r.bits is None}
        for r in shape_rows:
            label = "fp32" if r.bits is None else f"{r.bits}-bit" + (", int8 act" if r.activations == "int8" else "")
            speedup = baseline.get((r.rows, r.cols, r.tokens, r.mode))
            speed = "" if r.bits is None or speedup is None else f"{speedup / r.seconds:.2f}x"
            err = "" if r.max_rel_error is None else f"{r.max_rel_error:.1e}"
            share = f"{r.bandwidth_floor_seconds / r.seconds:.0%}"
            lines.append(f"| {r.family} {r.rows}x{r.cols} | {r.tokens} | {r.mode} | {label} | {r.weight_bytes / 1024:.0f} | "
                         f"{r.seconds * 1e6:.1f} | {r.bandwidth_floor_seconds * 1e6:.1f} | {share} | {speed} | {err} |")
        lines.append("")
    if e2e:
        variants = e2e["variants"]
        lines += [
            f"## End to end: {e2e['model']} decode\n",
            f"Map: {e2e['map']} -> **{e2e['bpw']:.3f} bpw** over the decoder linears "
            f"({e2e['linear_packed_mb']:.1f} MB packed in the kernel layout vs {e2e['linear_fp32_mb']:.1f} MB fp32). "
            f"Prompt {e2e['prompt_tokens']} tokens (prefill through the GEMM kernel), then {e2e['new_tokens']} greedy "
            f"tokens one at a time with the KV cache (GEMV kernel); medians over repeats, interleaved over all rows. "
            "\"transformers\" rows run the HF model's forward per token; \"lean decoder\" rows run "
            "allocator/runtime/decoder.py (`bitalloc generate`) on the same modules: its \"torch step\" in torch operations, its "
            "\"C step\" as one call per token into quantizers/kernels/llama_step.c (norms, rotary, attention and SiLU in C, "
            "fp32). Prompts run in torch in every bitalloc row; llama.cpp rows run the GGUF as written.\n",
            "| model | decode tokens/s | ms/token | prefill tokens/s | greedy tokens equal to the packed + head row |",
            "|---|---:|---:|---:|---:|",
            *[f"| {v['title']} | {v['tokens_per_s']:.1f} | {v['decode_s_per_token'] * 1e3:.1f} | {v['prefill_tokens_per_s']:.0f} | "
              f"{v['greedy_agreement_with_packed_head']} of {len(v['greedy'])} |" for v in variants.values()],
            *[f"| llama.cpp {label} (same run, same prompt and length) | {speed:.1f} | {1e3 / speed:.1f} | | |"
              for label, speed in e2e.get("llama_cpp_tokens_per_s", {}).items()],
            "",
            "\"greedy tokens equal\": how many leading greedy tokens equal those of the packed + head (transformers, float "
            "activations) row; int8 activations change the numbers slightly, so a near-tie between two tokens can flip.\n",
            *[f"Against llama.cpp {label} ({speed:.1f} tok/s): "
              + ", ".join(f"{v['title']} **{v['tokens_per_s'] / speed:.2f}x**" for key, v in variants.items() if key != "fp32")
              + " (target >= 0.5x).\n"
              for label, speed in e2e.get("llama_cpp_tokens_per_s", {}).items()],
            *head_section(e2e),
            *decode_quality_section(e2e),
            f"Check: max relative logit difference between the packed model and the simulated (dequantized fp32) "
            f"model on 16 tokens: {e2e['max_rel_logit_error_vs_simulated']:.1e}. RTN quantization took "
            f"{e2e['quantize_s']:.1f} s, conversion to the kernel layout {e2e['convert_s']:.1f} s.\n",
        ]
    lines += [
        "Notes",
        "- `fp32` activations: the kernels compute the simulated model's product up to summation order; GEMV folds the "
        "zero point as s * (sum x q - z * sum x) with per-group sums of x. `int8` activations (QuantLinear's default for a "
        "single token, like llama.cpp's Q8_K activations, which are rounded per 256): x is rounded per block of up to 128 "
        "columns inside a weight group (scale max|x| / 127) and each block's sum x q is an exact integer dot product "
        "(maddubs, int16 sums within the block, madd); the result is the exact product of the weight with the rounded x "
        "(its `rel err` is against that).",
        "- 1-bit weights with rows in multiples of 32 take the int8 GEMV through lookup tables (T-MAC): the 16 subset sums "
        "of every 4 int8 activations are tabled once per product and one pshufb looks up 32 rows x 4 columns, from LUT tiles "
        "kept beside the chunk layout (the same bytes, so the same floor).",
        "- 3-bit chunks pair up inside a group (16 bytes of nibbles holding the first chunk's codes and the second's high "
        "bits, then the second's 2-bit plane): a pair unpacks in 7 vector operations where two chunks as separate 2 + 1 "
        "bit planes took 12 (before commit 0f6af7b; kernels.md at 77192f6 has those timings).",
        f"- Batches above {GEMM_MAX_BATCH} tokens dequantize the weight (C unpacker) and use torch's BLAS.",
        "- Small shapes are bound by call overhead and caches rather than DRAM bandwidth; the `streamed` rows and the "
        "end-to-end numbers are the decode-relevant ones.",
    ]
    return "\n".join(lines) + "\n"


def head_section(e2e: dict[str, Any]) -> list[str]:
    """Where a decode step's time goes, and what the quantized LM head costs in quality."""
    lines = [
        f"Where a decoded token's time goes (ms/token, from forward hooks on one run of {e2e['new_tokens']} tokens; "
        f"the LM head is {e2e['head_fp32_mb']:.0f} MB in fp32, {e2e['head_packed_mb']:.1f} MB at {e2e['head_bits']} bits "
        f"(round to nearest, groups of 128, `bitalloc quantize --lm-head-bits {e2e['head_bits']}`)):\n",
        "| model | decoder linears | LM head | rest (attention, norms, per-step Python) | total |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, variant in e2e["variants"].items():
        b = e2e["breakdown_ms"][label]
        if "head" not in b:
            lines.append(f"| {variant['title']} | (one C call per token) | | | {b['total']:.1f} |")
            continue
        linears = "(not hooked)" if label == "fp32" else f"{b['linears']:.1f}"
        lines.append(f"| {variant['title']} | {linears} | {b['head']:.1f} | {b['rest']:.1f} | {b['total']:.1f} |")
    quality = e2e.get("head_quality")
    if quality:
        lines += ["", f"Quality of the {e2e['head_bits']}-bit head ({quality['eval_tokens']} evaluation tokens of the enwiki "
                  f"evaluation split, reference ppl {quality['reference_ppl']:.3f}): the float model with only the head quantized "
                  f"ppl {quality['head_only_ppl']:.3f} (KL {quality['head_only_kl']:.4f}); the packed map with the float head "
                  f"ppl {quality['float_head_ppl']:.3f} (KL {quality['float_head_kl']:.4f}), with the {e2e['head_bits']}-bit head "
                  f"ppl {quality['quantized_head_ppl']:.3f} (KL {quality['quantized_head_kl']:.4f})."]
    return lines + [""]


def decode_quality_section(e2e: dict[str, Any]) -> list[str]:
    qualities = e2e.get("decode_quality")
    if not qualities:
        return []
    lines = [f"Decode-mode quality ({e2e['head_bits']}-bit head, lean decoder with the C step): evaluation-split tokens fed one at a "
             "time, so every product is a single-token GEMV, with float and with int8 activations:\n",
             "| model | tokens | ppl, float activations | ppl, int8 activations | KL(float \\|\\| int8) per token |",
             "|---|---:|---:|---:|---:|"]
    titles = {"map": f"the speed map ({e2e['bpw']:.2f} bpw)", "rtn4": "RTN 4-bit g128 everywhere"}
    for key, quality in qualities.items():
        kl_key = next(k for k in quality if k.startswith("kl_from_"))
        ppl = quality["ppl"]
        lines.append(f"| {titles[key]} | {quality['tokens']} | {ppl['float activations']:.3f} | {ppl['int8 activations']:.3f} | "
                     f"{quality[kl_key]['int8 activations']:.4f} |")
    return lines + [""]


def streamed_summary(shape_rows: list[ShapeRow]) -> list[str]:
    """One line per weight kind: the share of the bandwidth floor streamed GEMV reaches (median, range)."""
    lines = []
    kinds = sorted({(r.bits, r.activations) for r in shape_rows if r.bits is not None}) + [(None, "fp32")]
    for bits, activations in kinds:
        for mode in ("streamed", "streamed, C loop"):
            shares = [r.bandwidth_floor_seconds / r.seconds for r in shape_rows
                      if r.mode == mode and r.bits == bits and r.activations == activations]
            if shares:
                label = "fp32 F.linear" if bits is None else f"{bits}-bit kernel, {activations} activations"
                lines.append(f"- {mode} GEMV, {label}: {statistics.median(shares):.1%} of the bandwidth floor "
                             f"(median over {len(shares)} shapes; {min(shares):.0%}-{max(shares):.0%})")
    return [*lines, ""] if lines else []


def library_line() -> str:
    lib = kernel_library()
    return (f"- kernels: `{lib.path.name}` built with `{lib.compiler} {' '.join(lib.flags)}`, SIMD path {lib.simd}, "
            f"{lib.max_threads} OpenMP threads (shared with torch)")


def rerender(path: Path) -> None:
    """Write the markdown again from a run's JSON (same numbers, current layout)."""
    data = json.loads(path.read_text())
    rows = [ShapeRow(**r) for r in data["shapes"]]
    md = markdown(rows, data["bandwidth_bytes_per_s"], data["settings"].get("stream_bytes", STREAM_BYTES), data["end_to_end"],
                  data["settings"], data["provenance"], data.get("library", library_line()), data.get("call_overhead"))
    path.with_suffix(".md").write_text(md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(SHAPES), help=f"shape families ({', '.join(SHAPES)})")
    parser.add_argument("--bits", default="1,2,3,4,8")
    parser.add_argument("--tokens", default="1,16,64", help="tokens per product (1 = GEMV)")
    parser.add_argument("--min-seconds", type=float, default=0.3, help="measuring time per timed product")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--head-bits", type=int, choices=(4, 8), default=8, help="LM head width of the third decode variant")
    parser.add_argument("--head-eval-tokens", type=int, default=4096, help="evaluation tokens for the head's quality (0: skip)")
    parser.add_argument("--decode-eval-tokens", type=int, default=512,
                        help="evaluation tokens decoded one at a time to compare float and int8 activations (0: skip)")
    parser.add_argument("--llama-gguf", action="append", default=[], metavar="LABEL=PATH",
                        help="also time llama.cpp's decode of this GGUF in the same run (repeatable; e.g. one from benchmarks/gguf_presets.py)")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end decode")
    parser.add_argument("--no-streamed", action="store_true", help="skip the cache-overflowing GEMV timings")
    parser.add_argument("--smoke", action="store_true", help="one small shape, 2-bit, few tokens: checks the script runs")
    parser.add_argument("--out", type=Path, default=RESULTS / "kernels.md")
    parser.add_argument("--render", action="store_true", help="only rewrite --out from its .json (no timing)")
    args = parser.parse_args()
    ggufs = {}
    for item in args.llama_gguf:
        label, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            parser.error(f"--llama-gguf wants LABEL=PATH of an existing file, got {item!r}")
        ggufs[label] = Path(path)
    if args.render:
        rerender(args.out.with_suffix(".json"))
        return
    if args.smoke:
        SHAPES["smoke"] = [(192, 576)]
        args.families, args.bits, args.tokens, args.min_seconds = "smoke", "2", "1,8", 0.1
        args.new_tokens, args.prompt_tokens, args.repeats, args.head_eval_tokens, args.decode_eval_tokens = 4, 16, 1, 0, 0
    families = args.families.split(",")
    bits_list = [int(b) for b in args.bits.split(",")]
    token_counts = [int(t) for t in args.tokens.split(",")]
    stream_bytes = STREAM_BYTES // 8 if args.smoke else STREAM_BYTES
    bandwidth = copy_bandwidth(stream_bytes)
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    overhead = call_overhead(args.min_seconds)
    shape_rows = bench_shapes(families, bits_list, token_counts, bandwidth, args.min_seconds, 0 if args.no_streamed else stream_bytes)
    e2e = None if args.no_e2e else bench_end_to_end(args.model, args.new_tokens, args.prompt_tokens, args.repeats, args.head_bits,
                                                    args.head_eval_tokens, ggufs, args.decode_eval_tokens)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "render")} | {"out": str(args.out), "stream_bytes": stream_bytes}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    run_provenance, library = provenance(), library_line()
    args.out.write_text(markdown(shape_rows, bandwidth, stream_bytes, e2e, settings, run_provenance, library, overhead))
    write_json(args.out.with_suffix(".json"), {"schema_version": 2, "provenance": run_provenance, "library": library,
                                              "settings": settings, "bandwidth_bytes_per_s": bandwidth, "call_overhead": overhead,
                                              "shapes": [asdict(r) for r in shape_rows], "end_to_end": e2e})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
