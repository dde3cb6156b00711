"""``bitalloc`` command line. Bad input gets one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"bitalloc: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _group_size(text: str) -> int | None:
    if text.lower() in ("none", "row", "-1", "0"):
        return None  # one group per output row
    return _positive_int(text)


def build_parser() -> argparse.ArgumentParser:
    from allocator.corpus import DEFAULT_CORPUS
    from allocator.models import DEFAULT_MODEL
    from allocator.pipeline import EvalSettings

    defaults = EvalSettings()
    parser = _Parser(prog="bitalloc", description="Per-layer low-bit allocation, quantization and evaluation of LLMs.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    ev = commands.add_parser("eval", help="quantize every decoder linear uniformly and compare with the float reference")
    ev.add_argument("--model", default=DEFAULT_MODEL, help="built-in name, .gguf path, HF directory or hub id")
    ev.add_argument("--quantizer", default="gptq", choices=["none", "rtn", "gptq"], help="'none' evaluates the reference only")
    ev.add_argument("--bits", type=int, default=3, help="code bits per weight, 1-8")
    ev.add_argument("--group-size", type=_group_size, default=128, help="columns per scale group, or 'none' for per-row")
    ev.add_argument("--sym", action="store_true", help="symmetric grid (no stored zero points)")
    ev.add_argument("--act-order", action="store_true", help="GPTQ: process columns by decreasing Hessian diagonal")
    ev.add_argument("--corpus", default=DEFAULT_CORPUS, help="enwiki (built in), wikitext2 (online) or a text file")
    ev.add_argument("--seqlen", type=_positive_int, default=defaults.seqlen)
    ev.add_argument("--tokens", type=_positive_int, default=defaults.tokens, help="evaluation tokens")
    ev.add_argument("--samples", type=_positive_int, default=defaults.samples, help="calibration sequences")
    ev.add_argument("--seed", type=int, default=defaults.seed)
    ev.add_argument("--json", type=Path, help="also write the rows as JSON here")
    ev.add_argument("--no-progress", action="store_true")

    commands.add_parser("models", help="list the built-in models")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from allocator.errors import BitallocError

    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        if args.command == "models":
            return _cmd_models()
        if args.command == "eval":
            return _cmd_eval(args)
    except BitallocError as exc:
        print(f"bitalloc: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("bitalloc: interrupted", file=sys.stderr)
        return 130
    return EXIT_BAD_INPUT


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(level=logging.INFO, format="bitalloc: %(message)s")


def _cmd_models() -> int:
    from allocator.models import BUILTIN_MODELS

    for model in BUILTIN_MODELS.values():
        print(f"{model.name:16s} {model.description}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from allocator.corpus import load_corpus
    from allocator.errors import BitallocError
    from allocator.layers import quantizable_linears
    from allocator.models import load_model
    from allocator.pipeline import EvalSettings, compare_variants
    from allocator.report import print_rows, rows_to_json
    from allocator.validation import validate_group_size
    from quantizers import build_quantizer

    if args.quantizer != "none" and not 1 <= args.bits <= 8:
        raise BitallocError(f"--bits must be between 1 and 8, got {args.bits}")
    if args.json is not None and not args.json.parent.is_dir():
        raise BitallocError(f"--json: directory {args.json.parent} does not exist")
    start = time.perf_counter()
    loaded = load_model(args.model)
    variants = {}
    if args.quantizer != "none":
        validate_group_size(args.group_size, quantizable_linears(loaded.model))
        settings = {"bits": args.bits, "group_size": args.group_size, "symmetric": args.sym}
        if args.quantizer == "gptq":
            settings["act_order"] = args.act_order
        quantizer = build_quantizer(args.quantizer, **settings)
        variants[quantizer.label()] = quantizer
    eval_settings = EvalSettings(seqlen=args.seqlen, tokens=args.tokens, samples=args.samples, seed=args.seed)
    rows = compare_variants(loaded, load_corpus(args.corpus), variants, eval_settings, progress=not args.no_progress)
    print_rows(rows, title=f"{args.model} - {eval_settings.tokens // eval_settings.seqlen * eval_settings.seqlen} eval tokens")
    if args.json is not None:
        rows_to_json(args.json, rows, {"model": args.model, "corpus": args.corpus, "settings": vars(eval_settings), "wall_seconds": time.perf_counter() - start})
    return 0


if __name__ == "__main__":
    sys.exit(main())
