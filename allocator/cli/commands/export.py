"""``bitalloc export``: write a GGUF that llama.cpp runs: a bit map's per-tensor types, or a llama.cpp preset."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from allocator.cli.common import scale_fold_settings
from allocator.cli.outputs import output_file
from allocator.cli.parser import CORPUS_HELP, add_scale_fold_flags, positive_int

NAME = "export"
HELP = "write a GGUF that llama.cpp runs: a bit map's per-tensor types, or a llama.cpp preset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from allocator.jobs.compare import EvalSettings
    from allocator.model.corpus import DEFAULT_CORPUS

    defaults = EvalSettings()
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--bitmap", type=Path, help="bit map JSON (from bitalloc solve): each module's option as a llama.cpp type")
    what.add_argument("--preset", help="llama.cpp's own preset instead (Q2_K, Q3_K_S, Q3_K_M, Q4_K_M, IQ2_XXS, ...)")
    what.add_argument("--quantized", type=Path, metavar="DIR",
                      help="a packed model (bitalloc quantize): its bit map, and its scale fold if it has one "
                      "(llama.cpp requantizes the float weights to each module's type)")
    parser.add_argument("--format", choices=["gguf"], default="gguf", help="output format (gguf)")
    parser.add_argument("--model", help="built-in name or .gguf (default: the bit map's model; required with --preset)")
    parser.add_argument("--out", type=Path, required=True, help="the .gguf file to write")
    parser.add_argument("--imatrix", choices=["auto", "on", "off"], default="auto",
                        help="importance matrix (per input column mean x^2 of calibration activations): "
                             "auto = where llama.cpp needs one, and for GGUF-native bit maps")
    parser.add_argument("--imatrix-samples", type=positive_int, default=32, help="calibration sequences for the importance matrix")
    parser.add_argument("--embedding-type", default="q8_0", help="token embedding / output type of bit-map exports (default q8_0)")
    parser.add_argument("--eval", action="store_true", help="then run the file in llama.cpp: perplexity and KL on the evaluation split")
    parser.add_argument("--corpus", default=DEFAULT_CORPUS, help=CORPUS_HELP)
    parser.add_argument("--seqlen", type=positive_int, default=defaults.seqlen)
    parser.add_argument("--tokens", type=positive_int, default=defaults.tokens, help="evaluation tokens (with --eval)")
    parser.add_argument("--samples", type=positive_int, default=defaults.samples, help="calibration sequences (with --scale-fold)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    add_scale_fold_flags(parser, "the float model before llama.cpp quantizes it (a --quantized model carries its own)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from allocator.errors import BitallocError
    from allocator.gguf.export import export_bitmap, export_preset, preset_ftype, require_llama_cpp, tensor_plan
    from allocator.gguf.files import gguf_tensor_shapes, source_gguf
    from allocator.gguf.imatrix import needs_imatrix
    from allocator.table.bitmap import BitMap

    if args.out.suffix != ".gguf":
        raise BitallocError(f"--out {args.out} must end in .gguf")
    output_file(args.out, "--out")
    fold_settings = scale_fold_settings(args)
    fold = None
    if args.quantized is not None:
        from allocator.runtime.packed import load_quantized

        if fold_settings is not None:
            raise BitallocError("--scale-fold with --quantized: a packed model carries its own scale fold")
        packed = load_quantized(args.quantized)
        bitmap, fold = packed.bitmap(), packed.quantized.scale_fold
        if packed.quantized.head:
            print(f"note: the packed LM head is not carried over; llama.cpp writes the output tensor as --embedding-type ({args.embedding_type})")
    else:
        bitmap = BitMap.load(args.bitmap) if args.bitmap is not None else None
    if bitmap is None and args.model is None:
        raise BitallocError("--preset needs --model")
    if args.preset is not None:
        preset_ftype(args.preset)  # an unknown preset fails before anything is computed
    require_llama_cpp()
    model = args.model or bitmap.model
    start = time.perf_counter()
    source = source_gguf(model)
    if bitmap is not None:
        # checked on the shipped GGUF (same tensor names and shapes): a map for another model fails before
        # the F32 reference (hundreds of MB) is written to the cache
        plan = tensor_plan(bitmap, gguf_tensor_shapes(source))
        needs = needs_imatrix(bitmap=bitmap, plan=plan)
    else:
        needs = needs_imatrix(preset=args.preset)
    loaded = None
    imatrix = None
    if args.imatrix == "on" or (args.imatrix == "auto" and needs) or args.eval or fold_settings is not None:
        from allocator.model.loading import load_model

        loaded = load_model(model)
    if fold_settings is not None:
        fold = export_scale_fold(loaded, bitmap, fold_settings, args)
    if args.imatrix == "on" or (args.imatrix == "auto" and needs):
        from allocator.gguf.imatrix import cached_imatrix

        imatrix = cached_imatrix(model, loaded, args.corpus, args.imatrix_samples, args.seqlen, args.seed)
    if bitmap is not None:
        result = export_bitmap(bitmap, args.out, model, imatrix, embedding_type=args.embedding_type, scale_fold=fold)
    else:
        result = export_preset(args.preset, model, args.out, imatrix, scale_fold=fold)
    if fold is not None:
        folded = sum(g.alpha is not None for g in fold.groups) - result.unfolded_sites
        skipped = (f"; {result.unfolded_sites} left unfolded where llama.cpp writes a codebook type (iq1/iq2/iq3)"
                   if result.unfolded_sites else "")
        print(f"scale fold ({fold.settings.label()}): {folded} of {len(fold.groups)} sites folded into the float model llama.cpp quantized{skipped}")
    stats = result.stats
    types = ", ".join(f"{kind} x{n}" for kind, n in stats.linear_type_counts().items())
    print(f"{args.out}: {stats.linear_bpw:.4f} bpw over the decoder linears ({types}), {stats.file_bpw:.3f} bpw and "
          f"{stats.file_bytes / 1e6:.2f} MB for the whole file{', importance matrix' if result.imatrix else ''}; "
          f"{time.perf_counter() - start:.1f} s")
    fallbacks = [p for p in result.plan.values() if p.written != p.requested]
    if fallbacks:
        print(f"  {len(fallbacks)} of {len(result.plan)} tensors have rows that are not a multiple of the requested type's block "
              f"and got llama.cpp's fallback (e.g. {fallbacks[0].requested} -> {fallbacks[0].written} on rows of {fallbacks[0].row_length})")
    if args.eval:
        from allocator.gguf.llama_eval import REFERENCE, evaluate_ggufs
        from allocator.jobs.compare import EvalSettings, evaluation_tokens
        from allocator.model.corpus import load_corpus

        windows = evaluation_tokens(loaded, load_corpus(args.corpus), EvalSettings(seqlen=args.seqlen, tokens=args.tokens))
        results = evaluate_ggufs({args.out.name: args.out}, windows, loaded.model, progress=not args.no_progress)
        ref = results[REFERENCE].perplexity
        for name, r in results.items():
            speed = f", decode {r.decode_tok_s:.1f} tok/s" if r.decode_tok_s is not None else ""
            print(f"  {name}: ppl {r.perplexity:.3f} (ratio {r.perplexity / ref:.3f}), KL {r.kl:.4f} over {r.tokens} tokens{speed}")
    return 0


def export_scale_fold(loaded, bitmap, settings, args: argparse.Namespace):  # -> ScaleFold
    """The fold ``bitalloc quantize --scale-fold`` computes for ``bitmap`` with the same calibration
    (for a preset: every site, scored as a profile scores it)."""
    from allocator.gguf.ggml_types import is_ggml_native
    from allocator.jobs.compare import EvalSettings, calibration_tokens
    from allocator.model.corpus import load_corpus
    from allocator.quantize.scalefold import compute_scale_fold, search_quantizers

    samples = calibration_tokens(loaded, load_corpus(args.corpus), EvalSettings(seqlen=args.seqlen, samples=args.samples, seed=args.seed))
    # a GGUF-native map names llama.cpp types, not bitalloc quantizers: score its sites as a profile does
    scorers = search_quantizers(bitmap.assignment().quantizers()) if bitmap is not None and not is_ggml_native(bitmap) else None
    fold, _ = compute_scale_fold(loaded.model, samples, settings, scorers, progress=not args.no_progress)
    return fold
