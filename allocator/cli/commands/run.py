"""``bitalloc run``: the main job: profile -> solve -> quantize -> eval for one budget, printing a table."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from allocator.cli.common import RUN_KL_ANCHORS, kl_anchors
from allocator.cli.parser import CORPUS_HELP, model_help, positive_int

NAME = "run"
HELP = "the main job: profile -> solve -> quantize -> eval for one budget, printing a table"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from allocator.jobs.compare import EvalSettings
    from allocator.model.corpus import DEFAULT_CORPUS
    from allocator.model.loading import DEFAULT_MODEL

    defaults = EvalSettings()
    parser.add_argument("--model", default=DEFAULT_MODEL, help=model_help())
    parser.add_argument("--bpw", type=float, default=2.5, help="budget: average stored bits per weight of the linears (default 2.5)")
    parser.add_argument("--solver", default="ilp", help="ilp (default), ilp-cvxpy, convex, baq, dp or greedy")
    parser.add_argument("--options", nargs="+", default=["default"], metavar="SPEC", help="candidate options (as for profile)")
    parser.add_argument("--corpus", default=DEFAULT_CORPUS, help=CORPUS_HELP)
    parser.add_argument("--samples", type=positive_int, default=defaults.samples, help="calibration sequences")
    parser.add_argument("--seqlen", type=positive_int, default=defaults.seqlen)
    parser.add_argument("--tokens", type=positive_int, default=defaults.tokens, help="evaluation tokens")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--kl-anchors", nargs="+", metavar="LABEL", default=RUN_KL_ANCHORS,
                        help="options whose single-layer KL calibrates the loss (default gptq-w3g128; 'all' measures every option)")
    parser.add_argument("--no-kl", action="store_true", help="solve on the Hessian-weighted output error alone (no KL measurement)")
    parser.add_argument("--out", type=Path, help="also save the bit map, the packed model and the rows here (a directory)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from allocator.evaluate.accounting import model_size_bytes
    from allocator.model.corpus import load_corpus
    from allocator.errors import BitallocError
    from allocator.model.loading import load_model
    from allocator.table.options import parse_options
    from allocator.runtime.packed import save_quantized
    from allocator.jobs.compare import EvalSettings, compare_quantized, evaluation_tokens, quantize_assignment
    from allocator.measure.layer_kl import add_kl_losses
    from allocator.measure.profile import cached_table_path, profile_model
    from allocator.evaluate.report import print_rows, rows_to_json
    from allocator.solvers import SOLVERS, Budget, solve

    options = parse_options(args.options)  # bad input fails before the model loads
    budget = Budget.bpw(args.bpw)
    default_missing = args.kl_anchors == RUN_KL_ANCHORS and not set(RUN_KL_ANCHORS) <= {o.label for o in options}
    # without the default anchor among the options, every option is measured
    anchors = None if args.no_kl or default_missing else kl_anchors(args.kl_anchors, options)
    if args.solver not in SOLVERS:
        raise BitallocError(f"unknown solver {args.solver!r}; choose from {', '.join(SOLVERS)}")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise BitallocError(f"--out {args.out} exists and is not a directory")
    start = time.perf_counter()
    loaded = load_model(args.model)
    corpus = load_corpus(args.corpus)
    settings = EvalSettings(seqlen=args.seqlen, tokens=args.tokens, samples=args.samples, seed=args.seed)
    windows = evaluation_tokens(loaded, corpus, settings)
    progress = not args.no_progress
    print(f"[1/4] profile: {len(options)} options per layer on {args.samples} x {args.seqlen} calibration tokens (cached, resumable)")
    table = profile_model(loaded, corpus, options, samples=args.samples, seqlen=args.seqlen, seed=args.seed, progress=progress)
    if not args.no_kl:
        print(f"      single-layer KL of {', '.join(anchors) if anchors else 'every option'} (cached)")
        table = add_kl_losses(loaded, table, cached_table_path(table), corpus.calibration, anchors, progress=progress)
    print(f"[2/4] solve: {args.solver} at {budget}, minimizing {table.default_loss}")
    bitmap = solve(table, budget, solver=args.solver)
    counts: dict[str, int] = {}
    for entry in bitmap.modules.values():
        counts[entry.option] = counts.get(entry.option, 0) + 1
    print(f"      {bitmap.predicted_bpw:.4f} bpw; " + ", ".join(f"{label} x{n}" for label, n in sorted(counts.items())))
    print("[3/4] quantize (GPTQ-family layers in order, on the quantized prefix)")
    tick = time.perf_counter()
    quantized = quantize_assignment(loaded, corpus, bitmap.assignment().quantizers(), settings, progress)
    seconds = time.perf_counter() - tick
    name = f"{args.solver}@{args.bpw:g}bpw"
    print("[4/4] eval")
    rows = compare_quantized(loaded, corpus, {name: quantized}, settings, {name: seconds}, progress, windows)
    print_rows(rows, title=f"{args.model}: {args.solver} allocation at {args.bpw:g} bpw - {windows.numel()} eval tokens")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        bitmap.save(args.out / "bitmap.json")
        source = {"bitmap": "bitmap.json", "solver": bitmap.solver.name, "budget": bitmap.budget, "loss_name": bitmap.loss_name,
                  "predicted_loss": bitmap.predicted_loss, "table_key": bitmap.table_key,
                  "calibration": {"corpus": args.corpus, "samples": args.samples, "seqlen": args.seqlen, "seed": args.seed}}
        save_quantized(args.out / "packed", args.model, quantized, bitmap.assignment(), bitmap.options(),
                       model_size_bytes(loaded.model, quantized), source)
        rows_to_json(args.out / "rows.json", rows, {"model": args.model, "settings": vars(settings), "wall_seconds": time.perf_counter() - start})
        print(args.out)
    return 0
