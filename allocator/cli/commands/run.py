"""``bitalloc run``: the main job: profile -> solve -> quantize -> eval for one budget, printing a table."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from allocator.cli.common import kl_anchors
from allocator.cli.outputs import output_dir, packed_output
from allocator.cli.parser import CORPUS_HELP, add_placement_flags, add_ray_flags, model_help, positive_int, ray_settings

if TYPE_CHECKING:
    from allocator.table.sensitivity import Option, SensitivityTable

NAME = "run"
HELP = "the main job: profile -> solve -> quantize -> eval for one budget, printing a table"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from allocator.jobs.compare import EvalSettings
    from allocator.jobs.run import RUN_KL_SEQLEN, RUN_OPTIONS
    from allocator.model.corpus import DEFAULT_CORPUS
    from allocator.model.loading import DEFAULT_MODEL

    defaults = EvalSettings()
    parser.add_argument("--model", default=DEFAULT_MODEL, help=model_help())
    parser.add_argument("--bpw", type=float, default=2.5, help="budget: average stored bits per weight of the linears (default 2.5)")
    method = parser.add_mutually_exclusive_group()
    method.add_argument("--solver", default=None, help="ilp (default), ilp-cvxpy, convex, baq, dp or greedy")
    method.add_argument("--policy", help="allocate with this trained policy instead of a solver (as for solve: a policy.zip, its run "
                                         "directory, or a shipped policy's name); a features-only policy runs the features pass instead of the profile "
                                         "and the single-layer KL")
    parser.add_argument("--loss-model", help="price every layer with this loss model (policies/loss_model.py: a .json, or a shipped one's "
                                              "name such as features-fisher-kl) on the features pass instead of the profile and the "
                                              "single-layer KL: minutes less per model, a worse allocation (results/loss_model_transfer.md)")
    parser.add_argument("--options", nargs="+", default=RUN_OPTIONS, metavar="SPEC",
                        help="candidate options (as for profile; default main: xnor, w1p1, GPTQ 2/3/4-bit with act order and mse clipping)")
    parser.add_argument("--corpus", default=DEFAULT_CORPUS, help=CORPUS_HELP)
    parser.add_argument("--samples", type=positive_int, default=defaults.samples, help="calibration sequences")
    parser.add_argument("--seqlen", type=positive_int, default=defaults.seqlen)
    parser.add_argument("--tokens", type=positive_int, default=defaults.tokens, help="evaluation tokens")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--kl-anchors", nargs="+", metavar="LABEL",
                        help="measure the single-layer KL of these options only and solve on kl_est (their KL calibrates every "
                        "option's Hessian error); default: every option's KL is measured and solved on")
    parser.add_argument("--kl-seqlen", type=positive_int,
                        help=f"tokens of the calibration window the single-layer KL is measured on (default {RUN_KL_SEQLEN}, or --seqlen if shorter)")
    parser.add_argument("--true-sequential", action="store_true",
                        help="calibrate each GPTQ layer on the outputs of the already quantized layers of its own block too (slower; "
                        "default: a block's layers share one calibration pass over its quantized-prefix inputs)")
    parser.add_argument("--no-kl", action="store_true", help="solve on the Hessian-weighted output error alone (no KL measurement)")
    parser.add_argument("--out", type=Path, help="also save the bit map, the packed model and the rows here (a directory)")
    add_placement_flags(parser)
    add_ray_flags(parser)
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from allocator.errors import BitallocError
    from allocator.jobs.compare import EvalSettings
    from allocator.jobs.run import BITMAP_FILE, PACKED_DIR, ROWS_FILE, RUN_KL_SEQLEN, print_run, run_job, save_run
    from allocator.model.corpus import check_corpus, load_corpus
    from allocator.model.loading import load_model
    from allocator.model.placement import resolve_device, storage_dtype
    from allocator.solvers import SOLVERS, Budget, Solver
    from allocator.table.options import parse_options

    options = parse_options(args.options)  # bad input fails before the model loads
    learned: dict[str, Any] = {}  # run_job's features-pass arguments for a loss model
    if args.loss_model is not None:
        options, learned = loss_model_arguments(args)
    budget = Budget.bpw(args.bpw)
    anchors = None if args.no_kl else kl_anchors(args.kl_anchors, options)
    kl_seqlen = min(RUN_KL_SEQLEN, args.seqlen) if args.kl_seqlen is None else args.kl_seqlen
    if kl_seqlen > args.seqlen or kl_seqlen < 2:
        raise BitallocError(f"--kl-seqlen must be 2 to {args.seqlen} tokens (--seqlen), got {kl_seqlen}")
    device, dtype = resolve_device(args.device), storage_dtype(args.dtype)
    solver: str | Solver = args.solver or "ilp"
    features_only = args.loss_model is not None  # a loss model prices the features pass
    if args.policy is not None:
        from policies.solver import PolicySolver

        solver = PolicySolver.load(args.policy)  # a bad policy (or unknown name) fails before any profiling
        features_only = solver.policy.card.features_only  # it reads the features pass, not the profile and KL
        unused = [flag for flag, given in (("--ray", args.ray is not None), ("--kl-anchors", args.kl_anchors is not None),
                                           ("--kl-seqlen", args.kl_seqlen is not None)) if given]
        if features_only and unused:
            raise BitallocError(f"{args.policy} is a features-only policy: it reads the features pass alone (no profile, no KL), "
                                f"so {', '.join(unused)} would do nothing; leave {'it' if len(unused) == 1 else 'them'} out")
    elif solver not in SOLVERS:
        raise BitallocError(f"unknown solver {solver!r}; choose from {', '.join(SOLVERS)}")
    ray = ray_settings(args)
    output_dir(args.out, "--out", files=(BITMAP_FILE, ROWS_FILE))
    if args.out is not None:
        packed_output(args.out / PACKED_DIR, "--out")
    check_corpus(args.corpus)
    tick = time.perf_counter()
    loaded = load_model(args.model, dtype)
    load_seconds = time.perf_counter() - tick
    corpus = load_corpus(args.corpus)
    settings = EvalSettings(seqlen=args.seqlen, tokens=args.tokens, samples=args.samples, seed=args.seed, true_sequential=args.true_sequential)
    result = run_job(loaded, corpus, options, budget, solver, settings, anchors, measure_kl=not args.no_kl, progress=not args.no_progress,
                     kl_seqlen=kl_seqlen, device=device, ray=ray, features_only=features_only, **learned)
    print_run(result, args.model, budget, load_seconds)
    if args.out is not None:
        save_run(args.out, result, loaded, args.model, args.corpus, settings, load_seconds)
        print(args.out)
    return 0


def loss_model_arguments(args: argparse.Namespace) -> tuple[list[Option], dict[str, Any]]:
    """``--loss-model``: its options and :func:`~allocator.jobs.run.run_job`'s features-pass arguments (its Fisher input
    and the pricing), every conflict refused in one line before the model loads."""
    from allocator.errors import BitallocError
    from allocator.jobs.run import RUN_OPTIONS
    from allocator.measure.features_pass import FEATURE_PASS_SAMPLES, FEATURE_PASS_SEQLEN
    from policies.loss_model import load_loss_model, with_learned_loss

    unused = [flag for flag, given in (("--policy", args.policy is not None), ("--options", args.options != RUN_OPTIONS),
                                       ("--ray", args.ray is not None), ("--kl-anchors", args.kl_anchors is not None),
                                       ("--kl-seqlen", args.kl_seqlen is not None), ("--no-kl", args.no_kl)) if given]
    if unused:
        raise BitallocError(f"--loss-model prices its own options on the features pass (no profile, no KL): it takes no {', '.join(unused)}")
    loss_model = load_loss_model(args.loss_model)  # a bad file (or unknown name) fails before the model loads
    if loss_model.fisher_windows > min(FEATURE_PASS_SAMPLES, args.samples) or loss_model.fisher_seqlen > min(FEATURE_PASS_SEQLEN, args.seqlen):
        raise BitallocError(f"{args.loss_model} reads a Fisher input on {loss_model.fisher_windows} calibration windows of "
                            f"{loss_model.fisher_seqlen} tokens: --samples and --seqlen must be at least that")

    def price(table: SensitivityTable) -> SensitivityTable:
        return with_learned_loss(table, loss_model)

    fisher = {"fisher_windows": loss_model.fisher_windows, "fisher_seqlen": loss_model.fisher_seqlen} if loss_model.uses_fisher else {}
    return list(loss_model.options), {"price": price, "activation_statistics": loss_model.needs_activation_statistics, **fisher}
