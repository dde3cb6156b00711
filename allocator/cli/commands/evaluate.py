"""``bitalloc eval``: quantize the decoder linears (uniformly, or by a bit map) and compare with the float reference."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from allocator.cli.common import scale_fold_settings
from allocator.cli.outputs import output_file
from allocator.cli.parser import CORPUS_HELP, NOT_GIVEN, add_placement_flags, add_scale_fold_flags, group_size, model_help, positive_int

NAME = "eval"
HELP = "quantize the decoder linears (uniformly, or by a bit map) and compare with the float reference"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from allocator.jobs.compare import EvalSettings
    from allocator.model.corpus import DEFAULT_CORPUS
    from quantizers import QUANTIZERS

    defaults = EvalSettings()
    parser.add_argument("--model", help=model_help() + "; with --bitmap/--quantized the model they were made for")
    parser.add_argument("--quantizer", choices=["none", *QUANTIZERS],
                        help="quantize every linear with this (default gptq unless --bitmap/--quantized); 'none' evaluates the reference only")
    parser.add_argument("--bits", type=int, help="rtn/gptq code bits per weight, 1-8 (default 3)")
    parser.add_argument("--group-size", type=group_size, default=NOT_GIVEN,
                        help="columns per scale group, or 'none' for per-row (rtn/gptq default 128; also xnor, pbllm, w1p1)")
    parser.add_argument("--sym", action="store_true", help="rtn/gptq: symmetric grid (no stored zero points)")
    parser.add_argument("--act-order", action="store_true", help="GPTQ: process columns by decreasing Hessian diagonal")
    parser.add_argument("--bitmap", type=Path, help="also evaluate this bit map (quantized in memory)")
    parser.add_argument("--quantized", type=Path, help="also evaluate this packed model directory (from bitalloc quantize)")
    parser.add_argument("--corpus", default=DEFAULT_CORPUS, help=CORPUS_HELP)
    parser.add_argument("--seqlen", type=positive_int, default=defaults.seqlen)
    parser.add_argument("--tokens", type=positive_int, default=defaults.tokens, help="evaluation tokens")
    parser.add_argument("--samples", type=positive_int, default=defaults.samples, help="calibration sequences")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    add_scale_fold_flags(parser, "quantizing --quantizer/--bitmap (a packed --quantized model carries its own)")
    add_placement_flags(parser)
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from allocator.errors import BitallocError
    from allocator.evaluate.report import print_rows, rows_to_json
    from allocator.jobs.compare import EvalSettings, compare_quantized, evaluation_tokens, quantize_assignment
    from allocator.model.corpus import check_corpus, load_corpus
    from allocator.model.layers import quantizable_linears
    from allocator.model.loading import DEFAULT_MODEL, load_model
    from allocator.model.placement import resolve_device, storage_dtype
    from allocator.quantize.validation import check_assignment_fits, validate_group_size
    from allocator.runtime.packed import check_float_weights, check_matches, load_quantized
    from allocator.storage import shown
    from allocator.table.bitmap import BitMap
    from allocator.table.options import quantizer_from_flags

    output_file(args.json, "--json")  # a path that cannot be written fails now, not after the evaluation
    check_corpus(args.corpus)
    group_given = args.group_size is not NOT_GIVEN
    quantizer_name = args.quantizer
    if quantizer_name is None and args.bitmap is None and args.quantized is None:
        quantizer_name = "gptq"
    if quantizer_name in (None, "none"):
        given_flags = (("--bits", args.bits is not None), ("--group-size", group_given), ("--sym", args.sym), ("--act-order", args.act_order))
        flags = [f for f, given in given_flags if given]
        if flags:
            raise BitallocError(f"{flags[0]} sets up --quantizer; give --quantizer rtn, gptq, ... with it")
    quantizer = None
    if quantizer_name not in (None, "none"):
        quantizer = quantizer_from_flags(quantizer_name, args.bits, None if not group_given else args.group_size, group_given, args.sym, args.act_order)
    scale_fold = scale_fold_settings(args)
    device, dtype = resolve_device(args.device), storage_dtype(args.dtype)
    if scale_fold is not None and quantizer is None and args.bitmap is None:
        raise BitallocError("--scale-fold applies to --quantizer/--bitmap variants; a packed --quantized model carries its own")
    suffix = f"+{scale_fold.label()}" if scale_fold is not None else ""
    start = time.perf_counter()
    bitmap = BitMap.load(args.bitmap) if args.bitmap is not None else None
    # every entry's settings must build a quantizer before anything loads
    bitmap_quantizers = bitmap.assignment().quantizers() if bitmap is not None else {}
    packed = load_quantized(args.quantized) if args.quantized is not None else None
    model_spec = args.model or (bitmap.model if bitmap else None) or (packed.model if packed else None) or DEFAULT_MODEL
    for made_for, what in ((bitmap.model if bitmap else None, "bit map"), (packed.model if packed else None, "packed model")):
        if made_for and made_for != model_spec:
            logging.getLogger("bitalloc").warning("the %s was made for %s; evaluating on %s", what, made_for, model_spec)
    loaded = load_model(model_spec, dtype)
    linears = quantizable_linears(loaded.model)
    if quantizer is not None:
        validate_group_size(getattr(quantizer, "group_size", None), linears)
    if bitmap is not None:
        check_assignment_fits(bitmap_quantizers, linears, shown(args.bitmap), {name: e.numel for name, e in bitmap.modules.items()})
    if packed is not None:  # checked now: the variants before it take minutes to quantize
        check_matches(packed.quantized, linears, shown(args.quantized))
        check_float_weights(packed.quantized, loaded.model, shown(args.quantized))
    corpus = load_corpus(args.corpus)
    settings = EvalSettings(seqlen=args.seqlen, tokens=args.tokens, samples=args.samples, seed=args.seed)
    windows = evaluation_tokens(loaded, corpus, settings)  # bad settings fail before any quantization
    progress = not args.no_progress
    quantized, seconds = {}, {}
    if quantizer is not None:
        tick = time.perf_counter()
        label = quantizer.label() + suffix
        quantized[label] = quantize_assignment(loaded, corpus, {name: quantizer for name in linears}, settings, progress, scale_fold,
                                               device)
        seconds[label] = time.perf_counter() - tick
    if bitmap is not None:
        name = f"bitmap:{args.bitmap.stem}{suffix}"
        tick = time.perf_counter()
        quantized[name] = quantize_assignment(loaded, corpus, bitmap_quantizers, settings, progress, scale_fold, device)
        seconds[name] = time.perf_counter() - tick
    if packed is not None:
        quantized[f"packed:{args.quantized.name}"] = packed.quantized
    rows = compare_quantized(loaded, corpus, quantized, settings, seconds, progress, windows, device)
    print_rows(rows, title=f"{model_spec} - {windows.numel()} eval tokens")
    if args.json is not None:
        context = {"model": model_spec, "corpus": args.corpus, "settings": vars(settings), "wall_seconds": time.perf_counter() - start}
        if args.bitmap is not None:
            context["bitmap"] = str(args.bitmap)
        if args.quantized is not None:
            context["quantized"] = str(args.quantized)
        if scale_fold is not None:
            context["scale_fold"] = scale_fold.as_dict()
        rows_to_json(args.json, rows, context)
    return 0
