"""``bitalloc features``: the features pass alone (few calibration windows, calibration-free option twins, no KL)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from allocator.cli.outputs import output_file
from allocator.cli.parser import CORPUS_HELP, add_placement_flags, model_help, positive_int

NAME = "features"
HELP = "the cheap features pass a features-only policy allocates from (no per-layer sensitivity measured) -> features table"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from allocator.measure.features_pass import FEATURE_PASS_SAMPLES, FEATURE_PASS_SEQLEN, FISHER_TWIN_SEQLEN
    from allocator.model.corpus import DEFAULT_CORPUS
    from allocator.model.loading import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help=model_help())
    parser.add_argument("--corpus", default=DEFAULT_CORPUS, help=CORPUS_HELP)
    parser.add_argument("--samples", type=positive_int, default=FEATURE_PASS_SAMPLES,
                        help=f"calibration windows (default {FEATURE_PASS_SAMPLES}; a full profile takes 64)")
    parser.add_argument("--seqlen", type=positive_int, default=FEATURE_PASS_SEQLEN)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--options", nargs="+", default=["main"], metavar="SPEC",
                        help="candidate options, as for bitalloc profile (default: main, bitalloc run's)")
    parser.add_argument("--fisher-windows", type=int, default=0, metavar="N",
                        help="also price every option's twin by the diagonal Fisher of N of the windows (the loss fisher_twin, "
                             "which a loss model reads; default 0: none)")
    parser.add_argument("--fisher-seqlen", type=positive_int, default=FISHER_TWIN_SEQLEN, help="tokens of each Fisher window")
    parser.add_argument("--no-activation-statistics", action="store_true",
                        help="leave out the calibration forward: weight and structure features only (the activation ones "
                             "NaN), twins priced without a Hessian; with --fisher-windows the Fisher pass is the one forward")
    parser.add_argument("--out", type=Path, help="also write the table here (it is always cached; its path is printed)")
    add_placement_flags(parser)
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from allocator.errors import BitallocError
    from allocator.measure.features_pass import features_table, features_table_path, twins_needing_hessian
    from allocator.measure.profile import save_table
    from allocator.model.corpus import check_corpus, load_corpus
    from allocator.model.loading import load_model
    from allocator.model.placement import resolve_device, storage_dtype
    from allocator.table.options import parse_options

    options = parse_options(args.options)  # bad specs fail before the model loads
    if not 0 <= args.fisher_windows <= args.samples or (args.fisher_windows and not 2 <= args.fisher_seqlen <= args.seqlen):
        raise BitallocError(f"--fisher-windows takes 0 to --samples ({args.samples}) windows and --fisher-seqlen 2 to --seqlen "
                            f"({args.seqlen}) tokens")
    if args.no_activation_statistics and (needing := twins_needing_hessian(options)):
        raise BitallocError(f"--no-activation-statistics: the twins of {', '.join(needing)} need the input Hessian")
    device, dtype = resolve_device(args.device), storage_dtype(args.dtype)
    output_file(args.out, "--out")
    check_corpus(args.corpus)
    start = time.perf_counter()
    loaded = load_model(args.model, dtype)
    loaded.check_window(args.seqlen)
    table = features_table(loaded, load_corpus(args.corpus), options, samples=args.samples, seqlen=args.seqlen, seed=args.seed,
                           progress=not args.no_progress, device=device, fisher_windows=args.fisher_windows,
                           fisher_seqlen=args.fisher_seqlen, activation_statistics=not args.no_activation_statistics)
    path = features_table_path(table)
    if args.out is not None:
        path = save_table(table, args.out)
    computed = table.metadata["features_pass"]["seconds"]
    print(f"{table.num_layers} layers x {table.num_options} options, losses {', '.join(table.loss_names)}, "
          f"{table.features.shape[1]} features; {time.perf_counter() - start:.1f} s now (the pass itself took {computed:.1f} s "
          + (f"on {args.samples} x {args.seqlen} tokens)" if not args.no_activation_statistics
             else f"without activation statistics{f', Fisher on {args.fisher_windows} x {args.fisher_seqlen} tokens' if args.fisher_windows else ''})"))
    print(path)
    return 0
