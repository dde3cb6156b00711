"""``bitalloc pareto``: solve a range of budgets from one table, measure every allocation, plot ppl vs bpw."""

from __future__ import annotations

import argparse
from pathlib import Path

from allocator.cli.outputs import output_dir
from allocator.cli.parser import CORPUS_HELP, add_placement_flags, positive_int

NAME = "pareto"
HELP = "solve a range of budgets from one table, measure every allocation, plot ppl vs bpw"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from allocator.jobs.compare import EvalSettings
    from allocator.model.corpus import DEFAULT_CORPUS

    defaults = EvalSettings()
    parser.add_argument("--profile", type=Path, required=True, help="sensitivity table (.npz from bitalloc profile, weights kept)")
    parser.add_argument("--model", help="default: the model the table was made for")
    parser.add_argument("--from", dest="start", type=float, default=1.5, help="lowest budget in bpw (default 1.5)")
    parser.add_argument("--to", dest="stop", type=float, default=4.0, help="highest budget in bpw (default 4.0)")
    parser.add_argument("--step", type=float, default=0.25, help="budget step in bpw (default 0.25)")
    parser.add_argument("--solvers", default="ilp,convex,baq,dp,greedy", help="comma-separated solver names")
    parser.add_argument("--loss", help="loss to minimize (default: kl, else kl_est if profiled with --measure-kl, else hessian_err)")
    parser.add_argument("--no-tie", action="store_true", help="let q/k/v and gate/up take different options")
    parser.add_argument("--out", type=Path, required=True, help="output directory: pareto.json, pareto.md, pareto.png")
    parser.add_argument("--corpus", default=DEFAULT_CORPUS, help=CORPUS_HELP)
    parser.add_argument("--seqlen", type=positive_int, default=defaults.seqlen)
    parser.add_argument("--tokens", type=positive_int, default=defaults.tokens, help="evaluation tokens")
    parser.add_argument("--chunk", type=positive_int, default=4, help="allocations evaluated per reference pass")
    parser.add_argument("--no-measure", action="store_true", help="only solve (predicted loss and bpw, no evaluation)")
    parser.add_argument("--no-uniform", action="store_true", help="leave out the uniform points (one option on every layer)")
    add_placement_flags(parser)
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from allocator.jobs.pareto import SWEEP_FILES, run_pareto
    from allocator.model.corpus import check_corpus
    from allocator.model.placement import resolve_device, storage_dtype

    device, dtype = resolve_device(args.device), storage_dtype(args.dtype)
    output_dir(args.out, "--out", files=SWEEP_FILES)
    if not args.no_measure:
        check_corpus(args.corpus)
    solvers = [s.strip() for s in args.solvers.split(",") if s.strip()]
    summary = run_pareto(args.profile, args.out, solvers, args.start, args.stop, args.step, loss=args.loss, tie=not args.no_tie,
                         corpus=args.corpus, seqlen=args.seqlen, tokens=args.tokens, chunk=args.chunk, measure=not args.no_measure,
                         uniform=not args.no_uniform, model=args.model, progress=not args.no_progress,
                         device=device, dtype=dtype)
    print(summary)
    print(args.out)
    return 0
