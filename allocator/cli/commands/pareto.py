"""``bitalloc pareto``: solve a range of budgets from one table, measure every allocation, plot ppl vs bpw."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from allocator.cli.parser import CORPUS_HELP, positive_int

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
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from allocator.model.corpus import load_corpus
    from allocator.errors import BitallocError
    from allocator.model.loading import load_model
    from allocator.measure.option_weights import OptionWeights
    from allocator.jobs.pareto import apply_measured, budgets_between, load_measured, measure_allocations, plan_sweep, save_sweep, sweep_record
    from allocator.jobs.compare import EvalSettings, evaluation_tokens
    from allocator.evaluate.plotting import plot_pareto
    from allocator.measure.profile import cached_table_path, model_fingerprint
    from allocator.table.sensitivity import SensitivityTable
    from allocator.solvers import SOLVERS, Constraints
    from allocator.storage import atomic_path

    solvers = [s.strip() for s in args.solvers.split(",") if s.strip()]
    unknown = [s for s in solvers if s not in SOLVERS]
    if unknown or not solvers:
        raise BitallocError(f"unknown solver {unknown[0] if unknown else '(none given)'!r}; choose from {', '.join(SOLVERS)}")
    budgets = budgets_between(args.start, args.stop, args.step)
    if args.out.exists() and not args.out.is_dir():
        raise BitallocError(f"--out {args.out} exists and is not a directory")
    table = SensitivityTable.load(args.profile)
    table.loss(args.loss)  # an unknown loss name fails here, in one line
    constraints = Constraints(loss=args.loss, tie=not args.no_tie)
    weights = None
    if not args.no_measure:
        weights = OptionWeights.beside(cached_table_path(table), table.labels)
        missing = weights.missing(table.names)
        if missing:
            raise BitallocError(f"{len(missing)} layers of this profile have no kept weights in {weights.directory}; "
                                "run bitalloc profile again with the same settings (it keeps them by default)")
    points, allocations, notes = plan_sweep(table, budgets, solvers, constraints, uniform=not args.no_uniform)
    for note in notes:
        logging.getLogger("bitalloc").warning("skipped: %s", note)
    settings = {"budgets": budgets, "solvers": solvers, "loss": args.loss, "tie": not args.no_tie,
                "eval": {"corpus": args.corpus, "seqlen": args.seqlen, "tokens": args.tokens}}
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "pareto.json"
    reference_ppl = None
    if weights is not None:
        done, reference_ppl = load_measured(json_path, table, settings)
        loaded = load_model(args.model or table.key.model)
        if table.metadata.get("model_fingerprint") not in (None, model_fingerprint(loaded.model)):
            raise BitallocError(f"{args.model or table.key.model} is not the model this profile was made from (weights differ)")
        windows = evaluation_tokens(loaded, load_corpus(args.corpus), EvalSettings(seqlen=args.seqlen, tokens=args.tokens))
        apply_measured(points, done)

        def record(measured, reference) -> None:
            nonlocal reference_ppl
            reference_ppl = reference
            apply_measured(points, measured)
            save_sweep(json_path, sweep_record(table, points, settings, notes, reference_ppl))

        print(f"{len(allocations)} distinct allocations from {len(points)} points; {len([k for k in allocations if k in done])} measured before")
        measure_allocations(loaded.model, windows, weights, allocations, done, record, args.chunk, not args.no_progress)
    final = sweep_record(table, points, settings, notes, reference_ppl)
    save_sweep(json_path, final)
    lines = ["| point | bpw | predicted loss | ppl | ppl ratio | KL | solve ms |", "|---|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (p.solver == "uniform", p.solver, p.bpw)):
        measured = (f"{p.perplexity:.2f} | {p.ppl_ratio:.3f} | {p.kl:.4f}" if p.perplexity is not None else "- | - | -")
        lines.append(f"| {p.name} | {p.bpw:.3f} | {p.predicted_loss:.4g} | {measured} | {p.solve_seconds * 1000:.1f} |")
    prediction = final["prediction"]
    summary = "\n".join(lines) + "\n\n" + (
        f"Predicted vs measured KL over {prediction['points']} distinct allocations: Pearson (log-log) "
        f"{prediction['pearson_log']:.3f}, Spearman {prediction['spearman']:.3f}\n" if "spearman" in prediction else "")
    with atomic_path(args.out / "pareto.md") as tmp:
        tmp.write_text(summary)
    if weights is not None:
        plot_pareto(points, args.out / "pareto.png", f"{table.key.model}: measured ppl vs bpw ({args.tokens} eval tokens)", reference_ppl)
    print(summary)
    print(args.out)
    return 0
