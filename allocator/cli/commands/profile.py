"""``bitalloc profile``: measure every (layer, option): exact bits, loss estimates and features -> sensitivity table."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from allocator.cli.common import kl_anchors, scale_fold_settings
from allocator.cli.outputs import output_file
from allocator.cli.parser import CORPUS_HELP, add_placement_flags, add_ray_flags, add_scale_fold_flags, model_help, positive_int, ray_settings

NAME = "profile"
HELP = "measure every (layer, option): exact bits, loss estimates and features -> sensitivity table"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from allocator.jobs.compare import EvalSettings
    from allocator.measure.fisher_losses import DEFAULT_FISHER_SEQLEN, DEFAULT_FISHER_WINDOWS
    from allocator.model.corpus import DEFAULT_CORPUS
    from allocator.model.loading import DEFAULT_MODEL

    defaults = EvalSettings()
    parser.add_argument("--model", default=DEFAULT_MODEL, help=model_help())
    parser.add_argument("--corpus", default=DEFAULT_CORPUS, help=CORPUS_HELP)
    parser.add_argument("--samples", type=positive_int, default=defaults.samples, help="calibration sequences")
    parser.add_argument("--seqlen", type=positive_int, default=defaults.seqlen)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--options", nargs="+", default=["default"], metavar="SPEC",
                        help="candidate options: default, main (bitalloc run's), binary, gptq, gptqN, rtnN, autoroundN (bitalloc[peers]), keep8, "
                        "a quantizer name or a label, each optionally with :key=value,... (default: the 1-bit family and gptq 2/3/4 bits g128)")
    parser.add_argument("--measure-kl", action="store_true",
                        help="also measure each layer's KL with only it quantized (from the kept weights; adds the losses kl and kl_est)")
    parser.add_argument("--kl-anchors", nargs="+", metavar="LABEL",
                        help="measure the KL of these options only (kl_est scales every option's hessian_err by the layer's measured gain); default: all")
    parser.add_argument("--kl-samples", type=positive_int, default=1, help="calibration windows the KL is measured on (default 1)")
    parser.add_argument("--kl-seqlen", type=positive_int, help="tokens of each KL window (default 256, or --seqlen if shorter)")
    parser.add_argument("--fisher", action="store_true",
                        help="also add the losses fisher and fisher_emp: ½ Σ F ⊙ (W − Q)² per (layer, option) from the kept weights, F the "
                        "diagonal Fisher from one forward and backward pass per calibration window (labels sampled from the model / the text)")
    parser.add_argument("--fisher-samples", type=positive_int,
                        help=f"calibration windows of the Fisher pass (default {DEFAULT_FISHER_WINDOWS}, or --samples if fewer)")
    parser.add_argument("--fisher-seqlen", type=positive_int, help=f"tokens of each Fisher window (default {DEFAULT_FISHER_SEQLEN}, or --seqlen if shorter)")
    parser.add_argument("--gptq-by-rtn", action="store_true",
                        help="measure each GPTQ option's losses on RTN onto the same grid (same bits; GPTQ's per-option column loop "
                        "skipped); the options and bit maps stay GPTQ")
    parser.add_argument("--out", type=Path, help="also write the table here (it is always cached; its path is printed)")
    add_placement_flags(parser)
    add_ray_flags(parser)
    parser.add_argument("--recompute", action="store_true", help="ignore a cached table and partial results")
    add_scale_fold_flags(parser, "profiling (use the same with quantize)")
    parser.add_argument("--ggml-types", nargs="*", metavar="TYPE",
                        help="profile llama.cpp's own tensor types instead (for bitalloc export): each linear quantized by llama.cpp to "
                        "each type that fits its rows, priced at its real bytes, loss = the measured KL with only it replaced "
                        "(on --kl-samples x --kl-seqlen tokens); no TYPE: iq2_xxs iq2_xs q2_k iq3_xxs q3_k iq4_nl q4_k q5_0 q5_k q6_k q8_0")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from allocator.errors import BitallocError
    from allocator.measure.fisher_losses import DEFAULT_FISHER_SEQLEN, DEFAULT_FISHER_WINDOWS, add_fisher_losses
    from allocator.measure.layer_kl import add_kl_losses
    from allocator.measure.profile import cached_table_path, profile_model, save_table
    from allocator.model.corpus import check_corpus, load_corpus
    from allocator.model.loading import load_model
    from allocator.model.placement import resolve_device, storage_dtype
    from allocator.table.options import parse_options

    if args.ggml_types is not None:
        return profile_ggml_types_command(args)
    options = parse_options(args.options)  # bad specs fail before the model loads
    device, dtype = resolve_device(args.device), storage_dtype(args.dtype)
    ray = ray_settings(args)
    if args.measure_kl and args.scale_fold:
        raise BitallocError("--measure-kl needs the kept option weights, which a --scale-fold profile does not keep")
    if args.kl_anchors and not args.measure_kl:
        raise BitallocError("--kl-anchors only applies with --measure-kl")
    if args.fisher and args.scale_fold:
        raise BitallocError("--fisher needs the kept option weights, which a --scale-fold profile does not keep")
    for flag, value in (("--fisher-samples", args.fisher_samples), ("--fisher-seqlen", args.fisher_seqlen)):
        if value is not None and not args.fisher:
            raise BitallocError(f"{flag} only applies with --fisher")
    fisher_samples = args.fisher_samples or min(DEFAULT_FISHER_WINDOWS, args.samples)
    fisher_seqlen = args.fisher_seqlen or min(DEFAULT_FISHER_SEQLEN, args.seqlen)
    if args.fisher and (fisher_samples > args.samples or not 2 <= fisher_seqlen <= args.seqlen):  # before the model loads
        raise BitallocError(f"the Fisher is computed on 1 to {args.samples} windows of 2 to {args.seqlen} tokens (--samples, --seqlen), "
                            f"got {fisher_samples} x {fisher_seqlen}")
    anchors = kl_anchors(args.kl_anchors, options)
    output_file(args.out, "--out")  # an existing directory, say, fails now, not after profiling
    check_corpus(args.corpus)
    start = time.perf_counter()
    loaded = load_model(args.model, dtype)
    loaded.check_window(args.seqlen)
    corpus = load_corpus(args.corpus)
    try:
        table = profile_model(
            loaded, corpus, options, samples=args.samples, seqlen=args.seqlen, seed=args.seed,
            recompute=args.recompute, progress=not args.no_progress, scale_fold=scale_fold_settings(args),
            gptq_by_rtn=args.gptq_by_rtn, device=device, ray=ray,
        )
        if args.measure_kl:
            table = add_kl_losses(loaded, table, cached_table_path(table), corpus.calibration, anchors,
                                  args.kl_samples, args.kl_seqlen, progress=not args.no_progress, device=device, ray=ray)
        if args.fisher:
            table = add_fisher_losses(loaded, table, cached_table_path(table), corpus.calibration,
                                      fisher_samples, fisher_seqlen,
                                      recompute=args.recompute, progress=not args.no_progress, ray=ray)
    except KeyboardInterrupt:
        print("bitalloc: interrupted; the finished layers are saved, run the same command again to resume", file=sys.stderr)
        return 130
    path = cached_table_path(table)
    if args.out is not None:
        path = save_table(table, args.out)
    bpw = table.bits.sum(axis=0) / table.total_numel
    print(f"{table.num_layers} layers x {table.num_options} options, losses {', '.join(table.loss_names)}, "
          f"{table.features.shape[1]} features ({table.feature_schema}); {time.perf_counter() - start:.1f} s "
          f"({table.metadata.get('layer_seconds', 0.0):.1f} s of layer work in total)")
    for label, value in zip(table.labels, bpw):
        print(f"  {label:24s} {value:7.3f} bpw")
    print(path)
    return 0


def profile_ggml_types_command(args: argparse.Namespace) -> int:
    from allocator.errors import BitallocError
    from allocator.gguf.constants import DEFAULT_GGML_TYPES, IMATRIX_SAMPLES
    from allocator.gguf.export import require_llama_cpp
    from allocator.gguf.files import source_gguf
    from allocator.gguf.ggml_types import check_ggml_types
    from allocator.gguf.imatrix import cached_imatrix
    from allocator.gguf.native_profile import profile_ggml_types
    from allocator.measure.profile import cached_table_path, save_table
    from allocator.model.corpus import check_corpus, load_corpus
    from allocator.model.loading import load_model
    from allocator.model.tokens import calibration_samples
    from allocator.table.sensitivity import TableKey

    if args.options != ["default"] or args.measure_kl or args.kl_anchors or args.scale_fold or args.fisher:
        raise BitallocError("--ggml-types profiles llama.cpp's types: it takes no --options, --measure-kl, --kl-anchors, --fisher or --scale-fold")
    types = check_ggml_types(args.ggml_types or DEFAULT_GGML_TYPES)  # bad names fail before the model loads
    output_file(args.out, "--out")
    check_corpus(args.corpus)
    require_llama_cpp()
    source_gguf(args.model)  # a model without a GGUF fails before it loads
    start = time.perf_counter()
    loaded = load_model(args.model)
    loaded.check_window(args.seqlen)
    corpus = load_corpus(args.corpus)
    seqlen = args.kl_seqlen or min(256, args.seqlen)
    windows = calibration_samples(loaded.tokenizer, corpus.calibration, args.kl_samples, seqlen, loaded.add_bos, args.seed)
    imatrix = cached_imatrix(args.model, loaded, args.corpus, IMATRIX_SAMPLES, args.seqlen, args.seed)
    key = TableKey(model=args.model, corpus=args.corpus, samples=args.kl_samples, seqlen=seqlen, seed=args.seed)
    try:
        table = profile_ggml_types(loaded, args.model, windows, imatrix, types, key, progress=not args.no_progress,
                                   recompute=args.recompute, imatrix_settings={"samples": IMATRIX_SAMPLES, "seqlen": args.seqlen,
                                                                               "corpus": args.corpus, "seed": args.seed})
    except KeyboardInterrupt:
        print("bitalloc: interrupted; the finished types are saved, run the same command again to resume", file=sys.stderr)
        return 130
    path = save_table(table, args.out) if args.out is not None else cached_table_path(table)
    print(f"{table.num_layers} layers x {table.num_options} llama.cpp types, loss kl on {args.kl_samples} x {seqlen} tokens; "
          f"{time.perf_counter() - start:.1f} s")
    for j, label in enumerate(table.labels):
        fits = table.bits[:, j] >= 0
        bpw = table.bits[fits, j].sum() / table.numel[fits].sum() if fits.any() else float("nan")
        print(f"  {label:10s} {bpw:7.3f} bpw on {int(fits.sum())} of {table.num_layers} layers")
    print(path)
    return 0
