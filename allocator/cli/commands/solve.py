"""``bitalloc solve``: allocate options to layers under a size budget -> bit map."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from allocator.cli.common import features_for, other_bytes, profile_for
from allocator.cli.outputs import output_file
from allocator.cli.parser import CORPUS_HELP, model_help, positive_int

NAME = "solve"
HELP = "allocate options to layers under a size budget -> bit map"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from allocator.jobs.compare import EvalSettings
    from allocator.model.corpus import DEFAULT_CORPUS

    defaults = EvalSettings()
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--profile", type=Path, help="sensitivity table (.npz from bitalloc profile)")
    source.add_argument("--model", help=model_help() + "; profiled first (cached) with --corpus/--samples/--seqlen")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--bpw", type=float, help="average stored bits per weight of the quantized linears")
    budget.add_argument("--bytes", type=int, help="stored bytes of the quantized linears")
    budget.add_argument("--model-bytes", type=int, help="whole-model bytes (other tensors at float16 taken off)")
    method = parser.add_mutually_exclusive_group()
    method.add_argument("--solver", default=None, help="ilp (default), ilp-cvxpy, convex, baq, dp or greedy")
    method.add_argument("--policy", help="allocate with this trained policy instead of a solver: a policy.zip (from bitalloc train), "
                        "its run directory, or the name of a shipped policy (policies/pretrained/, e.g. smollm2-135m-sac); with --model, a "
                        "features-only policy runs only the features pass (bitalloc features), not the profile")
    parser.add_argument("--loss-model", help="price the layers with this loss model instead of a measured profile: a .json from "
                        "policies/loss_model.py or the name of a shipped one (policies/pretrained/); with --model it runs only the "
                        "features pass (with the Fisher input the loss model reads), then the solver on the predicted KL")
    parser.add_argument("--loss", help="loss to minimize: kl, else kl_est (with --measure-kl), else hessian_err by default; or weight_err")
    parser.add_argument("--no-tie", action="store_true", help="let q/k/v and gate/up take different options")
    parser.add_argument("--out", type=Path, help="write the result here (default: print it)")
    parser.add_argument("--format", choices=["json", "tensor-type", "gptqmodel"], default="json",
                        help="json: the bit map; tensor-type: llama-quantize --tensor-type lines; gptqmodel: its dynamic config")
    parser.add_argument("--corpus", default=DEFAULT_CORPUS, help=CORPUS_HELP + " (to profile --model)")
    parser.add_argument("--samples", type=positive_int, default=defaults.samples, help="calibration sequences (to profile --model)")
    parser.add_argument("--seqlen", type=positive_int, default=defaults.seqlen, help="calibration sequence length (to profile --model)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from allocator.gguf.tensor_overrides import llama_cpp_tensor_types
    from allocator.model.corpus import check_corpus
    from allocator.runtime.gptqmodel import gptqmodel_dynamic
    from allocator.solvers import DEFAULT_SOLVER, Budget, Constraints, Solver, solve, warn_if_above_widest
    from allocator.storage import atomic_path
    from allocator.table.sensitivity import SensitivityTable

    output_file(args.out, "--out")
    if args.model is not None:
        check_corpus(args.corpus)  # it profiles the model on it
    solver: str | Solver = args.solver or DEFAULT_SOLVER
    features_options = None
    loss_model = None
    if args.loss_model is not None:
        from allocator.errors import BitallocError
        from policies.loss_model import load_loss_model

        if args.policy is not None or args.loss is not None:
            raise BitallocError("--loss-model sets the loss the solver minimizes: it takes no --policy or --loss")
        loss_model = load_loss_model(args.loss_model)  # before any model loads
        features_options = list(loss_model.options)
    if args.policy is not None:
        from allocator.table.options import parse_options
        from policies.solver import PolicySolver

        solver = PolicySolver.load(args.policy)  # a bad policy (or unknown name) fails before any profiling
        card = solver.policy.card
        if card.features_only:  # it reads the cheap features pass of the model, never its measured sensitivities
            features_options = parse_options(card.models[0]["option_labels"])
    if args.profile is not None:
        table = SensitivityTable.load(args.profile)
    elif features_options is not None:
        if loss_model is not None:  # the pass its inputs need (without the calibration forward where they allow)
            table = features_for(args.model, args, features_options, loss_model.fisher_windows, loss_model.fisher_seqlen,
                                 loss_model.needs_activation_statistics)
        else:
            table = features_for(args.model, args, features_options)
    else:
        table = profile_for(args.model, args)
    if args.bpw is not None:
        budget = Budget.bpw(args.bpw)
    elif args.bytes is not None:
        budget = Budget.bytes(args.bytes)
    else:
        budget = Budget.bytes(args.model_bytes, other_bytes=other_bytes(table))
    loss = args.loss
    if loss_model is not None:
        from policies.loss_model import LEARNED_LOSS, with_learned_loss

        table, loss = with_learned_loss(table, loss_model), LEARNED_LOSS
    constraints = Constraints(loss=loss, tie=not args.no_tie)
    table.loss(loss)  # an unknown loss name fails here, in one line
    warn_if_above_widest(table, budget)
    bitmap = solve(table, budget, constraints, solver=solver)
    if args.format == "json":
        text = json.dumps(bitmap.to_json(), indent=2) + "\n"
    elif args.format == "tensor-type":
        text = "".join(line + "\n" for line in llama_cpp_tensor_types(bitmap))
    else:
        text = json.dumps(gptqmodel_dynamic(bitmap), indent=2) + "\n"
    # the solver's time is printed here only: the bit map holds no wall-clock values (same seed, same bytes)
    summary = (f"{bitmap.solver.name}: {bitmap.predicted_bpw:.4f} bpw, {bitmap.total_bytes} bytes of {len(bitmap.modules)} modules "
               f"(budget {budget}), predicted {bitmap.loss_name} {bitmap.predicted_loss:.6g}, {bitmap.solver.seconds * 1000:.1f} ms")
    if args.out is None:
        sys.stdout.write(text)
        print(summary, file=sys.stderr)
        return 0
    with atomic_path(args.out) as tmp:
        tmp.write_text(text)
    print(summary)
    print(args.out)
    return 0
