"""``bitalloc train``: train a SAC allocation policy on sensitivity tables -> policy.zip + policy.json."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from allocator.cli.common import TRAIN_ACTION_MAPPINGS, features_for, profile_for
from allocator.cli.outputs import output_dir
from allocator.cli.parser import CORPUS_HELP, positive_int

NAME = "train"
HELP = "train a SAC allocation policy on sensitivity tables -> policy.zip + policy.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from allocator.jobs.compare import EvalSettings
    from allocator.model.corpus import DEFAULT_CORPUS

    defaults = EvalSettings()
    parser.add_argument("--models", help="comma-separated models to profile and train on (built-in names, .gguf paths, HF directories)")
    parser.add_argument("--profile", type=Path, nargs="+", default=[], help="sensitivity tables (.npz) to train on, besides --models")
    parser.add_argument("--timesteps", type=positive_int, default=20000, help="environment steps in total (default 20000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the policy, the budgets and the tables drawn")
    parser.add_argument("--out", type=Path, required=True, help="run directory: run.json, checkpoints/, logs/, policy.zip + policy.json")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    parser.add_argument("--bpw-range", type=float, nargs=2, default=[1.5, 4.0], metavar=("LOW", "HIGH"),
                        help="range the per-episode budgets are drawn from (default 1.5 4.0 bpw)")
    parser.add_argument("--checkpoint-every", type=positive_int, default=5000, help="steps between checkpoints (default 5000)")
    parser.add_argument("--action-mapping", choices=TRAIN_ACTION_MAPPINGS, default="price",
                        help="how an action picks a unit's option: price (default; scales the price that paces the budget) or index "
                        "(envs/FEATURES.md)")
    parser.add_argument("--learning-rate", type=float, default=3e-4, help="SAC's learning rate (default 3e-4, SB3's)")
    parser.add_argument("--gradient-steps", type=positive_int, default=1, help="gradient updates per environment step (default 1, SB3's)")
    parser.add_argument("--target-entropy", type=float, help="SAC's entropy target (default: SB3's -1 for the one action; lower explores less)")
    parser.add_argument("--loss", help="table loss to train on (default: kl, else kl_est if profiled with --measure-kl, else hessian_err)")
    parser.add_argument("--features-only", action="store_true",
                        help="train a features-only policy (zero-shot on a new model from its features pass alone): it observes the "
                        "features table (bitalloc features) of each model trained on and is rewarded on its profile's --loss (e.g. kl "
                        "from bitalloc profile --measure-kl)")
    parser.add_argument("--corpus", default=DEFAULT_CORPUS, help=CORPUS_HELP + " (to profile --models)")
    parser.add_argument("--samples", type=positive_int, default=defaults.samples, help="calibration sequences (to profile --models)")
    parser.add_argument("--seqlen", type=positive_int, default=defaults.seqlen, help="calibration sequence length (to profile --models)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from allocator.errors import BitallocError
    from allocator.measure.profile import BARE_PROFILE_LOSSES
    from allocator.model.corpus import check_corpus
    from allocator.solvers import Constraints
    from allocator.table.sensitivity import SensitivityTable
    from policies.best_checkpoint import BEST_FILE
    from policies.sac import POLICY_FILE, RUN_FILE, TrainConfig, train

    models = [m.strip() for m in (args.models or "").split(",") if m.strip()]
    if not models and not args.profile:
        raise BitallocError("give --models or --profile: the sensitivity tables to train on")
    output_dir(args.out, "--out", files=(RUN_FILE, POLICY_FILE, BEST_FILE))
    if models:
        check_corpus(args.corpus)  # it profiles the models on it
        if args.loss is not None and args.loss not in BARE_PROFILE_LOSSES:
            # the tables of --models are bare profiles: a loss they will not hold fails here, not after profiling
            raise BitallocError(f"--loss {args.loss!r} is not in a profile made for --models (it has {', '.join(BARE_PROFILE_LOSSES)}); "
                                "profile with bitalloc profile --measure-kl (or add the loss) and pass the table with --profile")
    config = TrainConfig(timesteps=args.timesteps, seed=args.seed, bpw_range=(args.bpw_range[0], args.bpw_range[1]),
                         constraints=Constraints(loss=args.loss), checkpoint_every=args.checkpoint_every,
                         action_mapping=args.action_mapping, learning_rate=args.learning_rate, gradient_steps=args.gradient_steps,
                         target_entropy=args.target_entropy)
    tables = [SensitivityTable.load(path) for path in args.profile]  # bad files fail before any profiling
    tables += [profile_for(model, args) for model in models]
    reward_tables = None
    if args.features_only:
        from allocator.measure.features_pass import SHAPE_LOSS

        for table in tables:
            table.loss(args.loss)  # an unknown loss fails before the features passes
        reward_tables = tables
        # each table's own model (a built-in name or the path it was profiled from) gets its features pass
        tables = [features_for(table.key.model, args, table.options) for table in reward_tables]
        config = replace(config, constraints=Constraints(loss=SHAPE_LOSS))
    start = time.perf_counter()
    try:
        path = train(tables, args.out, config, resume=args.resume, progress=not args.no_progress, reward_tables=reward_tables,
                     reward_loss=args.loss if args.features_only else None)
    except KeyboardInterrupt:
        print(f"bitalloc: interrupted; run the same command with --resume to continue from the last checkpoint in {args.out}", file=sys.stderr)
        return 130
    print(f"SAC policy trained on {', '.join(t.key.model for t in tables)} for {args.timesteps} steps "
          f"(budgets {args.bpw_range[0]:g}-{args.bpw_range[1]:g} bpw); {time.perf_counter() - start:.1f} s")
    print(path)
    return 0
