"""``bitalloc quantize``: quantize a model by a bit map and save the packed result."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from allocator.cli.common import scale_fold_settings
from allocator.cli.outputs import packed_output
from allocator.cli.parser import CORPUS_HELP, add_placement_flags, add_scale_fold_flags, positive_int

NAME = "quantize"
HELP = "quantize a model by a bit map and save the packed result"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from allocator.jobs.compare import EvalSettings
    from allocator.model.corpus import DEFAULT_CORPUS

    defaults = EvalSettings()
    parser.add_argument("--bitmap", type=Path, required=True, help="bit map JSON (from bitalloc solve)")
    parser.add_argument("--model", help="default: the model the bit map was made for")
    parser.add_argument("--out", type=Path, required=True, help="output directory (quantized.safetensors + quantization_config.json)")
    parser.add_argument("--corpus", default=DEFAULT_CORPUS, help=CORPUS_HELP)
    parser.add_argument("--samples", type=positive_int, default=defaults.samples, help="calibration sequences")
    parser.add_argument("--seqlen", type=positive_int, default=defaults.seqlen)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    add_scale_fold_flags(parser, "quantizing (as the profile was made)")
    parser.add_argument("--lm-head-bits", type=int, choices=(4, 8), default=None,
                        help="also store the LM head as a round-to-nearest 8- or 4-bit grid (groups of 128) that the kernels run; "
                        "outside the bit map and its bpw (default: the float head)")
    add_placement_flags(parser)
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from allocator.evaluate.accounting import model_size_bytes
    from allocator.jobs.compare import EvalSettings, quantize_assignment
    from allocator.model.corpus import check_corpus, load_corpus
    from allocator.model.layers import quantizable_linears
    from allocator.model.loading import load_model
    from allocator.model.placement import resolve_device, storage_dtype
    from allocator.quantize.head import head_quantizer, quantize_head
    from allocator.quantize.validation import check_assignment_fits
    from allocator.runtime.packed import bitmap_source, save_quantized
    from allocator.storage import shown
    from allocator.table.bitmap import BitMap

    bitmap = BitMap.load(args.bitmap)
    assignment = bitmap.assignment().quantizers()  # every entry's settings must build a quantizer
    scale_fold = scale_fold_settings(args)
    device, dtype = resolve_device(args.device), storage_dtype(args.dtype)
    packed_output(args.out, "--out")  # a foreign non-empty directory fails now, not after quantizing
    check_corpus(args.corpus)
    start = time.perf_counter()
    loaded = load_model(args.model or bitmap.model, dtype)
    check_assignment_fits(assignment, quantizable_linears(loaded.model), shown(args.bitmap),
                          {name: e.numel for name, e in bitmap.modules.items()})
    corpus = load_corpus(args.corpus)
    settings = EvalSettings(seqlen=args.seqlen, samples=args.samples, seed=args.seed)
    quantized = quantize_assignment(loaded, corpus, assignment, settings, progress=not args.no_progress, scale_fold=scale_fold,
                                    device=device, keep_dequantized=False)
    if args.lm_head_bits:
        quantized.head = quantize_head(loaded.model, args.lm_head_bits)
    log = logging.getLogger("bitalloc")
    for name, entry in bitmap.modules.items():
        if quantized.tensors[name].storage_bits != entry.storage_bits:
            log.warning("%s stores %d bits, the bit map predicted %d", name, quantized.tensors[name].storage_bits, entry.storage_bits)
    source = bitmap_source(bitmap, str(args.bitmap), {"corpus": args.corpus, "samples": args.samples, "seqlen": args.seqlen, "seed": args.seed})
    if scale_fold is not None:
        source["scale_fold"] = scale_fold.as_dict()
    if args.lm_head_bits:
        source["lm_head"] = head_quantizer(args.lm_head_bits).settings()
    model_bytes = model_size_bytes(loaded.model, quantized)
    save_quantized(args.out, args.model or bitmap.model, quantized, bitmap.assignment(), bitmap.options(), model_bytes, source)
    print(f"{len(quantized.tensors)} modules, {quantized.bits_per_weight:.4f} bpw, {-(-quantized.storage_bits // 8)} bytes of "
          f"linears, {model_bytes / 1e6:.2f} MB whole model; {time.perf_counter() - start:.1f} s")
    print(args.out)
    return 0
