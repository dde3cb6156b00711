"""``bitalloc`` command line. Bad input gets one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from allocator.sensitivity import SensitivityTable

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"bitalloc: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


RUN_KL_ANCHORS = ["gptq-w3g128"]
"""What ``bitalloc run`` measures the single-layer KL of (one forward per layer): on SmolLM2 the gain
calibrated on this option alone ranked measured allocations as well as measuring every option."""

TRAIN_ACTION_MAPPINGS = ("price", "index")
"""envs.bitalloc_env.ACTION_MAPPINGS (default first), spelled out so that building the parser does not
import gymnasium."""


def _kl_anchors(given: list[str] | None, options: list) -> list[str] | None:
    """``--kl-anchors`` checked against the options' labels: None (every option) for none or ``all``."""
    from allocator.errors import BitallocError

    if not given or given == ["all"]:
        return None
    labels = [o.label for o in options]
    unknown = sorted(set(given) - set(labels))
    if unknown:
        raise BitallocError(f"--kl-anchors: {unknown[0]!r} is not one of the profiled options ({', '.join(labels)})")
    return given


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


class _NotGiven:
    """Default of flags whose absence matters (``--group-size none`` is a real value)."""

    def __repr__(self) -> str:
        return "default"


NOT_GIVEN = _NotGiven()


def _alpha(text: str) -> float | None:
    from allocator.errors import BitallocError
    from allocator.scalefold import parse_alpha

    try:
        return parse_alpha(text)
    except BitallocError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_scale_fold_flags(parser: argparse.ArgumentParser, what: str) -> None:
    from allocator.scalefold import DEFAULT_ALPHA

    parser.add_argument("--scale-fold", action="store_true",
                        help=f"fold activation outliers into the weights (compensated in the norms) before {what}")
    parser.add_argument("--scale-fold-alpha", type=_alpha, default=NOT_GIVEN, metavar="ALPHA",
                        help=f"s = max|x|^alpha / max|w|^(1-alpha): a number in [0, 1] (default {DEFAULT_ALPHA}) or "
                             "'search' (per fold site on a grid, by the Hessian-weighted error of the quantizer)")


def _scale_fold_settings(args: argparse.Namespace):  # -> ScaleFoldSettings | None
    from allocator.errors import BitallocError
    from allocator.scalefold import DEFAULT_ALPHA, ScaleFoldSettings

    if not args.scale_fold:
        if args.scale_fold_alpha is not NOT_GIVEN:
            raise BitallocError("--scale-fold-alpha needs --scale-fold")
        return None
    return ScaleFoldSettings(alpha=DEFAULT_ALPHA if args.scale_fold_alpha is NOT_GIVEN else args.scale_fold_alpha)


def build_parser() -> argparse.ArgumentParser:
    from allocator.corpus import DEFAULT_CORPUS
    from allocator.models import DEFAULT_MODEL
    from allocator.pipeline import EvalSettings
    from quantizers import QUANTIZERS

    defaults = EvalSettings()
    parser = _Parser(prog="bitalloc", description="Per-layer low-bit allocation, quantization and evaluation of LLMs.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    model_help = f"built-in name, .gguf path, HF directory or hub id (default {DEFAULT_MODEL})"
    corpus_help = "enwiki (built in), wikitext2 (online) or a text file"

    ev = commands.add_parser("eval", help="quantize the decoder linears (uniformly, or by a bit map) and compare with the float reference")
    ev.add_argument("--model", help=model_help + "; with --bitmap/--quantized the model they were made for")
    ev.add_argument("--quantizer", choices=["none", *QUANTIZERS],
                    help="quantize every linear with this (default gptq unless --bitmap/--quantized); 'none' evaluates the reference only")
    ev.add_argument("--bits", type=int, help="rtn/gptq code bits per weight, 1-8 (default 3)")
    ev.add_argument("--group-size", type=_group_size, default=NOT_GIVEN,
                    help="columns per scale group, or 'none' for per-row (rtn/gptq default 128; also xnor, pbllm, w1p1)")
    ev.add_argument("--sym", action="store_true", help="rtn/gptq: symmetric grid (no stored zero points)")
    ev.add_argument("--act-order", action="store_true", help="GPTQ: process columns by decreasing Hessian diagonal")
    ev.add_argument("--bitmap", type=Path, help="also evaluate this bit map (quantized in memory)")
    ev.add_argument("--quantized", type=Path, help="also evaluate this packed model directory (from bitalloc quantize)")
    ev.add_argument("--corpus", default=DEFAULT_CORPUS, help=corpus_help)
    ev.add_argument("--seqlen", type=_positive_int, default=defaults.seqlen)
    ev.add_argument("--tokens", type=_positive_int, default=defaults.tokens, help="evaluation tokens")
    ev.add_argument("--samples", type=_positive_int, default=defaults.samples, help="calibration sequences")
    ev.add_argument("--seed", type=int, default=defaults.seed)
    ev.add_argument("--json", type=Path, help="also write the rows as JSON here")
    _add_scale_fold_flags(ev, "quantizing --quantizer/--bitmap (a packed --quantized model carries its own)")
    ev.add_argument("--no-progress", action="store_true")

    pr = commands.add_parser("profile", help="measure every (layer, option): exact bits, loss estimates and features -> sensitivity table")
    pr.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    pr.add_argument("--corpus", default=DEFAULT_CORPUS, help=corpus_help)
    pr.add_argument("--samples", type=_positive_int, default=defaults.samples, help="calibration sequences")
    pr.add_argument("--seqlen", type=_positive_int, default=defaults.seqlen)
    pr.add_argument("--seed", type=int, default=defaults.seed)
    pr.add_argument("--options", nargs="+", default=["default"], metavar="SPEC",
                    help="candidate options: default, binary, gptq, gptqN, rtnN, keep8, a quantizer name or a label, "
                         "each optionally with :key=value,... (default: the 1-bit family and gptq 2/3/4 bits g128)")
    pr.add_argument("--measure-kl", action="store_true",
                    help="also measure each layer's KL with only it quantized (from the kept weights; adds the losses kl and kl_est)")
    pr.add_argument("--kl-anchors", nargs="+", metavar="LABEL",
                    help="measure the KL of these options only (kl_est scales every option's hessian_err by the layer's measured gain); default: all")
    pr.add_argument("--kl-samples", type=_positive_int, default=1, help="calibration windows the KL is measured on (default 1)")
    pr.add_argument("--kl-seqlen", type=_positive_int, help="tokens of each KL window (default 256, or --seqlen if shorter)")
    pr.add_argument("--out", type=Path, help="also write the table here (it is always cached; its path is printed)")
    pr.add_argument("--recompute", action="store_true", help="ignore a cached table and partial results")
    _add_scale_fold_flags(pr, "profiling (use the same with quantize)")
    pr.add_argument("--ggml-types", nargs="*", metavar="TYPE",
                    help="profile llama.cpp's own tensor types instead (for bitalloc export): each linear quantized by llama.cpp to "
                         "each type that fits its rows, priced at its real bytes, loss = the measured KL with only it replaced "
                         "(on --kl-samples x --kl-seqlen tokens); no TYPE: iq2_xxs iq2_xs q2_k iq3_xxs q3_k iq4_nl q4_k q5_0 q5_k q6_k q8_0")
    pr.add_argument("--no-progress", action="store_true")

    so = commands.add_parser("solve", help="allocate options to layers under a size budget -> bit map")
    source = so.add_mutually_exclusive_group(required=True)
    source.add_argument("--profile", type=Path, help="sensitivity table (.npz from bitalloc profile)")
    source.add_argument("--model", help=model_help + "; profiled first (cached) with --corpus/--samples/--seqlen")
    budget = so.add_mutually_exclusive_group(required=True)
    budget.add_argument("--bpw", type=float, help="average stored bits per weight of the quantized linears")
    budget.add_argument("--bytes", type=int, help="stored bytes of the quantized linears")
    budget.add_argument("--model-bytes", type=int, help="whole-model bytes (other tensors at float16 taken off)")
    method = so.add_mutually_exclusive_group()
    method.add_argument("--solver", default=None, help="ilp (default), ilp-cvxpy, convex, baq, dp or greedy")
    method.add_argument("--policy", help="allocate with this trained policy instead of a solver: a policy.zip (from bitalloc train), "
                                         "its run directory, or the name of a shipped policy (policies/pretrained/, e.g. smollm2-135m-sac)")
    so.add_argument("--loss", help="loss to minimize: kl, else kl_est (with --measure-kl), else hessian_err by default; or weight_err")
    so.add_argument("--no-tie", action="store_true", help="let q/k/v and gate/up take different options")
    so.add_argument("--out", type=Path, help="write the result here (default: print it)")
    so.add_argument("--format", choices=["json", "tensor-type", "gptqmodel"], default="json",
                    help="json: the bit map; tensor-type: llama-quantize --tensor-type lines; gptqmodel: its dynamic config")
    so.add_argument("--corpus", default=DEFAULT_CORPUS, help=corpus_help + " (to profile --model)")
    so.add_argument("--samples", type=_positive_int, default=defaults.samples, help="calibration sequences (to profile --model)")
    so.add_argument("--seqlen", type=_positive_int, default=defaults.seqlen, help="calibration sequence length (to profile --model)")
    so.add_argument("--no-progress", action="store_true")

    tr = commands.add_parser("train", help="train a SAC allocation policy on sensitivity tables -> policy.zip + policy.json")
    tr.add_argument("--models", help="comma-separated models to profile and train on (built-in names, .gguf paths, HF directories)")
    tr.add_argument("--profile", type=Path, nargs="+", default=[], help="sensitivity tables (.npz) to train on, besides --models")
    tr.add_argument("--timesteps", type=_positive_int, default=20000, help="environment steps in total (default 20000)")
    tr.add_argument("--seed", type=int, default=0, help="seed of the policy, the budgets and the tables drawn")
    tr.add_argument("--out", type=Path, required=True, help="run directory: run.json, checkpoints/, logs/, policy.zip + policy.json")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    tr.add_argument("--bpw-range", type=float, nargs=2, default=[1.5, 4.0], metavar=("LOW", "HIGH"),
                    help="range the per-episode budgets are drawn from (default 1.5 4.0 bpw)")
    tr.add_argument("--checkpoint-every", type=_positive_int, default=5000, help="steps between checkpoints (default 5000)")
    tr.add_argument("--action-mapping", choices=TRAIN_ACTION_MAPPINGS, default="price",
                    help="how an action picks a unit's option: price (default; scales the price that paces the budget) or index "
                         "(envs/FEATURES.md)")
    tr.add_argument("--loss", help="table loss to train on (default: kl, else kl_est if profiled with --measure-kl, else hessian_err)")
    tr.add_argument("--corpus", default=DEFAULT_CORPUS, help=corpus_help + " (to profile --models)")
    tr.add_argument("--samples", type=_positive_int, default=defaults.samples, help="calibration sequences (to profile --models)")
    tr.add_argument("--seqlen", type=_positive_int, default=defaults.seqlen, help="calibration sequence length (to profile --models)")
    tr.add_argument("--no-progress", action="store_true")

    qu = commands.add_parser("quantize", help="quantize a model by a bit map and save the packed result")
    qu.add_argument("--bitmap", type=Path, required=True, help="bit map JSON (from bitalloc solve)")
    qu.add_argument("--model", help="default: the model the bit map was made for")
    qu.add_argument("--out", type=Path, required=True, help="output directory (quantized.safetensors + quantization_config.json)")
    qu.add_argument("--corpus", default=DEFAULT_CORPUS, help=corpus_help)
    qu.add_argument("--samples", type=_positive_int, default=defaults.samples, help="calibration sequences")
    qu.add_argument("--seqlen", type=_positive_int, default=defaults.seqlen)
    qu.add_argument("--seed", type=int, default=defaults.seed)
    _add_scale_fold_flags(qu, "quantizing (as the profile was made)")
    qu.add_argument("--lm-head-bits", type=int, choices=(4, 8), default=None,
                    help="also store the LM head as a round-to-nearest 8- or 4-bit grid (groups of 128) that the kernels run; "
                         "outside the bit map and its bpw (default: the float head)")
    qu.add_argument("--no-progress", action="store_true")

    pa = commands.add_parser("pareto", help="solve a range of budgets from one table, measure every allocation, plot ppl vs bpw")
    pa.add_argument("--profile", type=Path, required=True, help="sensitivity table (.npz from bitalloc profile, weights kept)")
    pa.add_argument("--model", help="default: the model the table was made for")
    pa.add_argument("--from", dest="start", type=float, default=1.5, help="lowest budget in bpw (default 1.5)")
    pa.add_argument("--to", dest="stop", type=float, default=4.0, help="highest budget in bpw (default 4.0)")
    pa.add_argument("--step", type=float, default=0.25, help="budget step in bpw (default 0.25)")
    pa.add_argument("--solvers", default="ilp,convex,baq,dp,greedy", help="comma-separated solver names")
    pa.add_argument("--loss", help="loss to minimize (default: kl, else kl_est if profiled with --measure-kl, else hessian_err)")
    pa.add_argument("--no-tie", action="store_true", help="let q/k/v and gate/up take different options")
    pa.add_argument("--out", type=Path, required=True, help="output directory: pareto.json, pareto.md, pareto.png")
    pa.add_argument("--corpus", default=DEFAULT_CORPUS, help=corpus_help)
    pa.add_argument("--seqlen", type=_positive_int, default=defaults.seqlen)
    pa.add_argument("--tokens", type=_positive_int, default=defaults.tokens, help="evaluation tokens")
    pa.add_argument("--chunk", type=_positive_int, default=4, help="allocations evaluated per reference pass")
    pa.add_argument("--no-measure", action="store_true", help="only solve (predicted loss and bpw, no evaluation)")
    pa.add_argument("--no-uniform", action="store_true", help="leave out the uniform points (one option on every layer)")
    pa.add_argument("--no-progress", action="store_true")

    ru = commands.add_parser("run", help="the main job: profile -> solve -> quantize -> eval for one budget, printing a table")
    ru.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    ru.add_argument("--bpw", type=float, default=2.5, help="budget: average stored bits per weight of the linears (default 2.5)")
    ru.add_argument("--solver", default="ilp", help="ilp (default), ilp-cvxpy, convex, baq, dp or greedy")
    ru.add_argument("--options", nargs="+", default=["default"], metavar="SPEC", help="candidate options (as for profile)")
    ru.add_argument("--corpus", default=DEFAULT_CORPUS, help=corpus_help)
    ru.add_argument("--samples", type=_positive_int, default=defaults.samples, help="calibration sequences")
    ru.add_argument("--seqlen", type=_positive_int, default=defaults.seqlen)
    ru.add_argument("--tokens", type=_positive_int, default=defaults.tokens, help="evaluation tokens")
    ru.add_argument("--seed", type=int, default=defaults.seed)
    ru.add_argument("--kl-anchors", nargs="+", metavar="LABEL", default=RUN_KL_ANCHORS,
                    help="options whose single-layer KL calibrates the loss (default gptq-w3g128; 'all' measures every option)")
    ru.add_argument("--no-kl", action="store_true", help="solve on the Hessian-weighted output error alone (no KL measurement)")
    ru.add_argument("--out", type=Path, help="also save the bit map, the packed model and the rows here (a directory)")
    ru.add_argument("--no-progress", action="store_true")

    exp = commands.add_parser("export", help="write a GGUF that llama.cpp runs: a bit map's per-tensor types, or a llama.cpp preset")
    what = exp.add_mutually_exclusive_group(required=True)
    what.add_argument("--bitmap", type=Path, help="bit map JSON (from bitalloc solve): each module's option as a llama.cpp type")
    what.add_argument("--preset", help="llama.cpp's own preset instead (Q2_K, Q3_K_S, Q3_K_M, Q4_K_M, IQ2_XXS, ...)")
    what.add_argument("--quantized", type=Path, metavar="DIR",
                      help="a packed model (bitalloc quantize): its bit map, and its scale fold if it has one "
                           "(llama.cpp requantizes the float weights to each module's type)")
    exp.add_argument("--format", choices=["gguf"], default="gguf", help="output format (gguf)")
    exp.add_argument("--model", help="built-in name or .gguf (default: the bit map's model; required with --preset)")
    exp.add_argument("--out", type=Path, required=True, help="the .gguf file to write")
    exp.add_argument("--imatrix", choices=["auto", "on", "off"], default="auto",
                     help="importance matrix (per input column mean x^2 of calibration activations): auto = where llama.cpp needs one, and for GGUF-native bit maps")
    exp.add_argument("--imatrix-samples", type=_positive_int, default=32, help="calibration sequences for the importance matrix")
    exp.add_argument("--embedding-type", default="q8_0", help="token embedding / output type of bit-map exports (default q8_0)")
    exp.add_argument("--eval", action="store_true", help="then run the file in llama.cpp: perplexity and KL on the evaluation split")
    exp.add_argument("--corpus", default=DEFAULT_CORPUS, help=corpus_help)
    exp.add_argument("--seqlen", type=_positive_int, default=defaults.seqlen)
    exp.add_argument("--tokens", type=_positive_int, default=defaults.tokens, help="evaluation tokens (with --eval)")
    exp.add_argument("--samples", type=_positive_int, default=defaults.samples, help="calibration sequences (with --scale-fold)")
    exp.add_argument("--seed", type=int, default=defaults.seed)
    _add_scale_fold_flags(exp, "the float model before llama.cpp quantizes it (a --quantized model carries its own)")
    exp.add_argument("--no-progress", action="store_true")

    ge = commands.add_parser("generate", help="greedy text generation from a packed model (bitalloc quantize) or a float model")
    ge.add_argument("--prompt", required=True, help="the text to continue")
    ge.add_argument("--quantized", type=Path, help="packed model directory (from bitalloc quantize)")
    ge.add_argument("--model", help=model_help + "; with --quantized, the model it was made for (default: the one its config names)")
    ge.add_argument("--max-new-tokens", type=_positive_int, default=64, help="tokens to generate at most (default 64; stops at EOS)")
    ge.add_argument("--engine", choices=["auto", "lean", "transformers"], default="auto",
                    help="lean: bitalloc's llama decoder (static KV cache, fused projections); transformers: HF generate; "
                         "auto (default): lean where the architecture allows")
    ge.add_argument("--float-activations", action="store_true",
                    help="decode packed layers with float activations (exact to the stored weights) instead of rounding them "
                         "to int8 per block of up to 128 columns, as llama.cpp does per 256 (faster)")

    commands.add_parser("models", help="list the built-in models")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from allocator.errors import BitallocError

    args = build_parser().parse_args(argv)
    _quiet_libraries()
    commands = {"eval": _cmd_eval, "profile": _cmd_profile, "solve": _cmd_solve, "train": _cmd_train, "quantize": _cmd_quantize, "pareto": _cmd_pareto, "run": _cmd_run, "export": _cmd_export,
                "generate": _cmd_generate}
    try:
        if args.command == "models":
            return _cmd_models()
        return commands[args.command](args)
    except BitallocError as exc:
        print(f"bitalloc: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("bitalloc: interrupted", file=sys.stderr)
        return 130


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


def _check_json_target(path: Path | None, flag: str) -> None:
    from allocator.errors import BitallocError

    if path is not None and not path.parent.is_dir():
        raise BitallocError(f"{flag}: directory {path.parent} does not exist")


def _cmd_eval(args: argparse.Namespace) -> int:
    from allocator.bitmap import BitMap
    from allocator.corpus import load_corpus
    from allocator.errors import BitallocError
    from allocator.layers import quantizable_linears
    from allocator.models import DEFAULT_MODEL, load_model
    from allocator.options import assignment_from_settings, quantizer_from_flags
    from allocator.packed import check_float_weights, check_matches, load_quantized
    from allocator.pipeline import EvalSettings, compare_quantized, evaluation_tokens, quantize_assignment
    from allocator.report import print_rows, rows_to_json
    from allocator.validation import validate_group_size

    _check_json_target(args.json, "--json")
    group_given = args.group_size is not NOT_GIVEN
    quantizer_name = args.quantizer
    if quantizer_name is None and args.bitmap is None and args.quantized is None:
        quantizer_name = "gptq"
    if quantizer_name in (None, "none"):
        flags = [f for f, given in (("--bits", args.bits is not None), ("--group-size", group_given), ("--sym", args.sym), ("--act-order", args.act_order)) if given]
        if flags:
            raise BitallocError(f"{flags[0]} sets up --quantizer; give --quantizer rtn, gptq, ... with it")
    quantizer = None
    if quantizer_name not in (None, "none"):
        quantizer = quantizer_from_flags(quantizer_name, args.bits, None if not group_given else args.group_size, group_given, args.sym, args.act_order)
    scale_fold = _scale_fold_settings(args)
    if scale_fold is not None and quantizer is None and args.bitmap is None:
        raise BitallocError("--scale-fold applies to --quantizer/--bitmap variants; a packed --quantized model carries its own")
    suffix = f"+{scale_fold.label()}" if scale_fold is not None else ""
    start = time.perf_counter()
    bitmap = BitMap.load(args.bitmap) if args.bitmap is not None else None
    packed = load_quantized(args.quantized) if args.quantized is not None else None
    model_spec = args.model or (bitmap.model if bitmap else None) or (packed.model if packed else None) or DEFAULT_MODEL
    for made_for, what in ((bitmap.model if bitmap else None, "bit map"), (packed.model if packed else None, "packed model")):
        if made_for and made_for != model_spec:
            logging.getLogger("bitalloc").warning("the %s was made for %s; evaluating on %s", what, made_for, model_spec)
    loaded = load_model(model_spec)
    linears = quantizable_linears(loaded.model)
    if quantizer is not None:
        validate_group_size(getattr(quantizer, "group_size", None), linears)
    corpus = load_corpus(args.corpus)
    settings = EvalSettings(seqlen=args.seqlen, tokens=args.tokens, samples=args.samples, seed=args.seed)
    windows = evaluation_tokens(loaded, corpus, settings)  # bad settings fail before any quantization
    progress = not args.no_progress
    quantized, seconds = {}, {}
    if quantizer is not None:
        tick = time.perf_counter()
        label = quantizer.label() + suffix
        quantized[label] = quantize_assignment(loaded, corpus, {name: quantizer for name in linears}, settings, progress, scale_fold)
        seconds[label] = time.perf_counter() - tick
    if bitmap is not None:
        name = f"bitmap:{args.bitmap.stem}{suffix}"
        tick = time.perf_counter()
        quantized[name] = quantize_assignment(loaded, corpus, assignment_from_settings(bitmap.assignment()), settings, progress, scale_fold)
        seconds[name] = time.perf_counter() - tick
    if packed is not None:
        check_matches(packed.quantized, linears, str(args.quantized))
        check_float_weights(packed.quantized, loaded.model, str(args.quantized))
        quantized[f"packed:{args.quantized.name}"] = packed.quantized
    rows = compare_quantized(loaded, corpus, quantized, settings, seconds, progress, windows)
    print_rows(rows, title=f"{model_spec} - {windows.numel()} eval tokens")
    if args.json is not None:
        context = {"model": model_spec, "corpus": args.corpus, "settings": vars(settings), "wall_seconds": time.perf_counter() - start}
        if args.bitmap is not None:
            context["bitmap"] = str(args.bitmap)
        if args.quantized is not None:
            context["quantized"] = str(args.quantized)
        if scale_fold is not None:
            context["scale_fold"] = scale_fold.as_dict()
        rows_to_json(args.json, rows, context)
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from allocator.corpus import load_corpus
    from allocator.errors import BitallocError
    from allocator.layer_kl import add_kl_losses
    from allocator.models import load_model
    from allocator.options import parse_options
    from allocator.profile import cached_table_path, profile_model, save_table

    if args.ggml_types is not None:
        return _profile_ggml_types(args)
    options = parse_options(args.options)  # bad specs fail before the model loads
    if args.measure_kl and args.scale_fold:
        raise BitallocError("--measure-kl needs the kept option weights, which a --scale-fold profile does not keep")
    if args.kl_anchors and not args.measure_kl:
        raise BitallocError("--kl-anchors only applies with --measure-kl")
    anchors = _kl_anchors(args.kl_anchors, options)
    if args.out is not None:
        _check_json_target(args.out, "--out")
    start = time.perf_counter()
    loaded = load_model(args.model)
    corpus = load_corpus(args.corpus)
    try:
        table = profile_model(
            loaded, corpus, options, samples=args.samples, seqlen=args.seqlen, seed=args.seed,
            recompute=args.recompute, progress=not args.no_progress, scale_fold=_scale_fold_settings(args),
        )
        if args.measure_kl:
            table = add_kl_losses(loaded, table, cached_table_path(table), corpus.calibration, anchors,
                                  args.kl_samples, args.kl_seqlen, progress=not args.no_progress)
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


def _profile_ggml_types(args: argparse.Namespace) -> int:
    from allocator.corpus import load_corpus
    from allocator.errors import BitallocError
    from allocator.gguf_export import cached_imatrix, require_llama_cpp, source_gguf
    from allocator.gguf_profile import DEFAULT_GGML_TYPES, IMATRIX_SAMPLES, check_ggml_types, profile_ggml_types
    from allocator.models import load_model
    from allocator.profile import cached_table_path, save_table
    from allocator.sensitivity import TableKey
    from allocator.tokens import calibration_samples

    if args.options != ["default"] or args.measure_kl or args.kl_anchors or args.scale_fold:
        raise BitallocError("--ggml-types profiles llama.cpp's types: it takes no --options, --measure-kl, --kl-anchors or --scale-fold")
    types = check_ggml_types(args.ggml_types or DEFAULT_GGML_TYPES)  # bad names fail before the model loads
    if args.out is not None:
        _check_json_target(args.out, "--out")
    require_llama_cpp()
    source_gguf(args.model)  # a model without a GGUF fails before it loads
    start = time.perf_counter()
    loaded = load_model(args.model)
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


def _cmd_solve(args: argparse.Namespace) -> int:
    from allocator.bitmap import gptqmodel_dynamic, llama_cpp_tensor_types
    from allocator.sensitivity import SensitivityTable
    from allocator.solvers import DEFAULT_SOLVER, Budget, Constraints, solve
    from allocator.storage import atomic_path

    policy = None
    if args.policy is not None:
        from policies.artifact import load_policy
        from policies.pretrained import resolve

        policy = load_policy(resolve(args.policy))  # a bad policy (or unknown name) fails before any profiling
    table = SensitivityTable.load(args.profile) if args.profile is not None else _profile_for(args.model, args)
    if args.bpw is not None:
        budget = Budget.bpw(args.bpw)
    elif args.bytes is not None:
        budget = Budget.bytes(args.bytes)
    else:
        budget = Budget.bytes(args.model_bytes, other_bytes=_other_bytes(table))
    constraints = Constraints(loss=args.loss, tie=not args.no_tie)
    table.loss(args.loss)  # an unknown loss name fails here, in one line
    if policy is not None:
        from policies.apply import apply_policy

        bitmap = apply_policy(policy, table, budget, constraints)
    else:
        bitmap = solve(table, budget, constraints, solver=args.solver or DEFAULT_SOLVER)
    if args.format == "json":
        text = json.dumps(bitmap.to_json(), indent=2) + "\n"
    elif args.format == "tensor-type":
        text = "".join(line + "\n" for line in llama_cpp_tensor_types(bitmap))
    else:
        text = json.dumps(gptqmodel_dynamic(bitmap), indent=2) + "\n"
    summary = (f"{bitmap.solver.name}: {bitmap.predicted_bpw:.4f} bpw, {bitmap.total_bytes} bytes of {len(bitmap.modules)} modules "
               f"(budget {budget}), predicted {bitmap.loss_name} {bitmap.predicted_loss:.6g}, {bitmap.solver.seconds * 1000:.1f} ms")
    if args.out is None:
        sys.stdout.write(text)
        print(summary, file=sys.stderr)
        return 0
    if not args.out.parent.is_dir():
        from allocator.errors import BitallocError

        raise BitallocError(f"--out: directory {args.out.parent} does not exist")
    with atomic_path(args.out) as tmp:
        tmp.write_text(text)
    print(summary)
    print(args.out)
    return 0


def _profile_for(model: str, args: argparse.Namespace) -> SensitivityTable:
    """The sensitivity table of ``model`` with the default options (cached by bitalloc profile)."""
    from allocator.corpus import load_corpus
    from allocator.models import load_model
    from allocator.profile import profile_model

    loaded = load_model(model)
    return profile_model(loaded, load_corpus(args.corpus), samples=args.samples, seqlen=args.seqlen, progress=not args.no_progress)


def _cmd_train(args: argparse.Namespace) -> int:
    from allocator.errors import BitallocError
    from allocator.sensitivity import SensitivityTable
    from allocator.solvers import Constraints
    from policies.sac import TrainConfig, train

    models = [m.strip() for m in (args.models or "").split(",") if m.strip()]
    if not models and not args.profile:
        raise BitallocError("give --models or --profile: the sensitivity tables to train on")
    if args.out.exists() and not args.out.is_dir():
        raise BitallocError(f"--out {args.out} exists and is not a directory")
    config = TrainConfig(timesteps=args.timesteps, seed=args.seed, bpw_range=(args.bpw_range[0], args.bpw_range[1]),
                         constraints=Constraints(loss=args.loss), checkpoint_every=args.checkpoint_every,
                         action_mapping=args.action_mapping)
    tables = [SensitivityTable.load(path) for path in args.profile]  # bad files fail before any profiling
    tables += [_profile_for(model, args) for model in models]
    start = time.perf_counter()
    try:
        path = train(tables, args.out, config, resume=args.resume, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"bitalloc: interrupted; run the same command with --resume to continue from the last checkpoint in {args.out}", file=sys.stderr)
        return 130
    print(f"SAC policy trained on {', '.join(t.key.model for t in tables)} for {args.timesteps} steps "
          f"(budgets {args.bpw_range[0]:g}-{args.bpw_range[1]:g} bpw); {time.perf_counter() - start:.1f} s")
    print(path)
    return 0


def _other_bytes(table: SensitivityTable) -> int:
    from allocator.errors import BitallocError

    other = table.metadata.get("other_bytes")
    if not isinstance(other, int):
        raise BitallocError("this table does not record the size of the other tensors; use --bytes or --bpw")
    return other


def _cmd_quantize(args: argparse.Namespace) -> int:
    from allocator.accounting import model_size_bytes
    from allocator.bitmap import BitMap
    from allocator.corpus import load_corpus
    from allocator.head import head_quantizer, quantize_head
    from allocator.models import load_model
    from allocator.options import assignment_from_settings
    from allocator.packed import save_quantized
    from allocator.pipeline import EvalSettings, quantize_assignment

    bitmap = BitMap.load(args.bitmap)
    assignment = assignment_from_settings(bitmap.assignment())
    scale_fold = _scale_fold_settings(args)
    if args.out.exists() and not args.out.is_dir():
        from allocator.errors import BitallocError

        raise BitallocError(f"--out {args.out} exists and is not a directory")
    start = time.perf_counter()
    loaded = load_model(args.model or bitmap.model)
    corpus = load_corpus(args.corpus)
    settings = EvalSettings(seqlen=args.seqlen, samples=args.samples, seed=args.seed)
    quantized = quantize_assignment(loaded, corpus, assignment, settings, progress=not args.no_progress, scale_fold=scale_fold)
    if args.lm_head_bits:
        quantized.head = quantize_head(loaded.model, args.lm_head_bits)
    log = logging.getLogger("bitalloc")
    for name, entry in bitmap.modules.items():
        if quantized.tensors[name].storage_bits != entry.storage_bits:
            log.warning("%s stores %d bits, the bit map predicted %d", name, quantized.tensors[name].storage_bits, entry.storage_bits)
    source = {
        "bitmap": str(args.bitmap),
        "solver": bitmap.solver.name,
        "budget": bitmap.budget,
        "loss_name": bitmap.loss_name,
        "predicted_loss": bitmap.predicted_loss,
        "table_key": bitmap.table_key,
        "calibration": {"corpus": args.corpus, "samples": args.samples, "seqlen": args.seqlen, "seed": args.seed},
    }
    if scale_fold is not None:
        source["scale_fold"] = scale_fold.as_dict()
    if args.lm_head_bits:
        source["lm_head"] = head_quantizer(args.lm_head_bits).settings()
    model_bytes = model_size_bytes(loaded.model, quantized)
    save_quantized(args.out, args.model or bitmap.model, quantized, bitmap.assignment(), bitmap.options(), model_bytes, source)
    print(f"{len(quantized.tensors)} modules, {quantized.bits_per_weight:.4f} bpw, {-(-quantized.storage_bits // 8)} bytes of "
          f"linears, {model_bytes / 1e6:.2f} MB whole model; {time.perf_counter() - start:.1f} s")
    print(args.out)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from allocator.bitmap import BitMap, is_ggml_native
    from allocator.errors import BitallocError
    from allocator.gguf_export import IMATRIX_PRESETS, IMATRIX_TYPES, export_bitmap, export_preset, float_gguf, gguf_tensor_shapes, preset_ftype, require_llama_cpp, source_gguf, tensor_plan

    if args.out.suffix != ".gguf":
        raise BitallocError(f"--out {args.out} must end in .gguf")
    _check_json_target(args.out, "--out")
    fold_settings = _scale_fold_settings(args)
    fold = None
    if args.quantized is not None:
        from allocator.packed import load_quantized

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
        needs = any(p.written in IMATRIX_TYPES for p in tensor_plan(bitmap, gguf_tensor_shapes(float_gguf(source))).values())
        # GGUF-native options (profile --ggml-types) were measured on files made with the importance matrix
        needs = needs or is_ggml_native(bitmap)
    else:
        needs = args.preset.upper() in IMATRIX_PRESETS
    loaded = None
    imatrix = None
    if args.imatrix == "on" or (args.imatrix == "auto" and needs) or args.eval or fold_settings is not None:
        from allocator.models import load_model

        loaded = load_model(model)
    if fold_settings is not None:
        fold = _export_scale_fold(loaded, bitmap, fold_settings, args)
    if args.imatrix == "on" or (args.imatrix == "auto" and needs):
        from allocator.gguf_export import cached_imatrix

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
        from allocator.corpus import load_corpus
        from allocator.llama_eval import REFERENCE, evaluate_ggufs
        from allocator.pipeline import EvalSettings, evaluation_tokens

        windows = evaluation_tokens(loaded, load_corpus(args.corpus), EvalSettings(seqlen=args.seqlen, tokens=args.tokens))
        results = evaluate_ggufs({args.out.name: args.out}, windows, loaded.model, progress=not args.no_progress)
        ref = results[REFERENCE].perplexity
        for name, r in results.items():
            speed = f", decode {r.decode_tok_s:.1f} tok/s" if r.decode_tok_s is not None else ""
            print(f"  {name}: ppl {r.perplexity:.3f} (ratio {r.perplexity / ref:.3f}), KL {r.kl:.4f} over {r.tokens} tokens{speed}")
    return 0


def _export_scale_fold(loaded, bitmap, settings, args: argparse.Namespace):  # -> ScaleFold
    """The fold ``bitalloc quantize --scale-fold`` computes for ``bitmap`` with the same calibration
    (for a preset: every site, scored as a profile scores it)."""
    from allocator.bitmap import is_ggml_native
    from allocator.corpus import load_corpus
    from allocator.options import assignment_from_settings
    from allocator.pipeline import EvalSettings, calibration_tokens
    from allocator.scalefold import compute_scale_fold, search_quantizers

    samples = calibration_tokens(loaded, load_corpus(args.corpus), EvalSettings(seqlen=args.seqlen, samples=args.samples, seed=args.seed))
    # a GGUF-native map names llama.cpp types, not bitalloc quantizers: score its sites as a profile does
    scorers = search_quantizers(assignment_from_settings(bitmap.assignment())) if bitmap is not None and not is_ggml_native(bitmap) else None
    fold, _ = compute_scale_fold(loaded.model, samples, settings, scorers, progress=not args.no_progress)
    return fold


def _cmd_pareto(args: argparse.Namespace) -> int:
    from allocator.corpus import load_corpus
    from allocator.errors import BitallocError
    from allocator.models import load_model
    from allocator.option_weights import OptionWeights
    from allocator.pareto import apply_measured, budgets_between, load_measured, measure_allocations, plan_sweep, save_sweep, sweep_record
    from allocator.pipeline import EvalSettings, evaluation_tokens
    from allocator.plotting import plot_pareto
    from allocator.profile import cached_table_path, model_fingerprint
    from allocator.sensitivity import SensitivityTable
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


def _cmd_run(args: argparse.Namespace) -> int:
    from allocator.accounting import model_size_bytes
    from allocator.corpus import load_corpus
    from allocator.errors import BitallocError
    from allocator.models import load_model
    from allocator.options import assignment_from_settings, parse_options
    from allocator.packed import save_quantized
    from allocator.pipeline import EvalSettings, compare_quantized, evaluation_tokens, quantize_assignment
    from allocator.layer_kl import add_kl_losses
    from allocator.profile import cached_table_path, profile_model
    from allocator.report import print_rows, rows_to_json
    from allocator.solvers import SOLVERS, Budget, solve

    options = parse_options(args.options)  # bad input fails before the model loads
    budget = Budget.bpw(args.bpw)
    default_missing = args.kl_anchors == RUN_KL_ANCHORS and not set(RUN_KL_ANCHORS) <= {o.label for o in options}
    # without the default anchor among the options, every option is measured
    anchors = None if args.no_kl or default_missing else _kl_anchors(args.kl_anchors, options)
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
    quantized = quantize_assignment(loaded, corpus, assignment_from_settings(bitmap.assignment()), settings, progress)
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



def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from allocator.decoder import LlamaDecoder, supports
    from allocator.errors import BitallocError
    from allocator.models import DEFAULT_MODEL, load_model
    from allocator.packed import load_quantized_model
    from quantizers.kernels import QuantLinear

    if not args.prompt.strip():
        raise BitallocError("--prompt is empty")
    if args.quantized is not None:
        loaded = load_quantized_model(args.quantized, load_model(args.model) if args.model else None).loaded
    else:
        loaded = load_model(args.model or DEFAULT_MODEL)
    model = loaded.model
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.int8_activations = not args.float_activations
    engine = args.engine if args.engine != "auto" else ("lean" if supports(model) else "transformers")
    if engine == "lean" and not supports(model):
        raise BitallocError(f"--engine lean runs llama-architecture models, not {model.config.model_type}; use --engine transformers")
    prompt = loaded.tokenizer(args.prompt).input_ids
    # the stop tokens transformers' generate uses: the generation config's EOS ids, else the tokenizer's
    configured = getattr(model.generation_config, "eos_token_id", None)
    stop = [configured] if isinstance(configured, int) else list(configured or [])
    if not stop and loaded.tokenizer.eos_token_id is not None:
        stop = [loaded.tokenizer.eos_token_id]
    generated: list[int] = []
    shown = ""
    marks: list[float] = []

    def stream(token: int) -> None:
        nonlocal shown
        marks.append(time.perf_counter())
        generated.append(token)
        text = loaded.tokenizer.decode(generated, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        # wait for the rest of a multi-byte character, or for a decode that extends what is shown
        if not text.endswith("\ufffd") and text.startswith(shown):
            print(text[len(shown):], end="", flush=True)
            shown = text

    if engine == "lean":
        decoder = LlamaDecoder(model, len(prompt) + args.max_new_tokens)
        engine = "lean, C step" if decoder.native_step is not None else "lean, torch step"
        start = time.perf_counter()
        decoder.generate(prompt, args.max_new_tokens, stop=stop, on_token=stream)
    else:
        start = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(torch.tensor([prompt]), max_new_tokens=args.max_new_tokens, do_sample=False, use_cache=True,
                                    eos_token_id=stop or None, pad_token_id=stop[0] if stop else 0)
        for token in output[0, len(prompt):].tolist():
            stream(token)
            if token in stop:
                break  # the rest is padding
    final = loaded.tokenizer.decode(generated, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    print(final[len(shown):] if final.startswith(shown) else "", flush=True)  # what a trailing partial character held back
    if engine.startswith("lean") and len(marks) > 1:
        rate = f"prefill {len(prompt) / (marks[0] - start):.1f} tok/s, decode {(len(marks) - 1) / (marks[-1] - marks[0]):.1f} tok/s"
    else:
        rate = f"{len(generated) / (time.perf_counter() - start):.1f} tok/s overall"
    activations = "float" if args.float_activations else "int8"
    print(f"bitalloc: {len(prompt)} prompt tokens, {len(generated)} generated; {rate} ({engine} engine, {activations} decode "
          f"activations, {torch.get_num_threads()} threads)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
