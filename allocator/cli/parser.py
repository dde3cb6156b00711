"""What the ``bitalloc`` argument parser is made of: one-line errors, shared argument types and flags.

Each command declares its own arguments with these (:mod:`allocator.cli.commands`);
:func:`allocator.cli.build_parser` puts them together.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from allocator.measure.distributed import RaySettings

EXIT_BAD_INPUT = 2

CORPUS_HELP = "enwiki (built in), wikitext2 (online) or a text file"


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports errors in one line (no usage dump) and exits with code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"bitalloc: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def model_help() -> str:
    from allocator.model.loading import DEFAULT_MODEL

    return f"built-in name, .gguf path, HF directory or hub id (default {DEFAULT_MODEL})"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def group_size(text: str) -> int | None:
    if text.lower() in ("none", "row", "-1", "0"):
        return None  # one group per output row
    return positive_int(text)


class NotGiven:
    """Default of flags whose absence matters (``--group-size none`` is a real value)."""

    def __repr__(self) -> str:
        return "default"


NOT_GIVEN = NotGiven()


def alpha(text: str) -> float | None:
    from allocator.errors import BitallocError
    from allocator.quantize.scalefold import parse_alpha

    try:
        return parse_alpha(text)
    except BitallocError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_scale_fold_flags(parser: argparse.ArgumentParser, what: str) -> None:
    from allocator.quantize.scalefold import DEFAULT_ALPHA

    parser.add_argument("--scale-fold", action="store_true",
                        help=f"fold activation outliers into the weights (compensated in the norms) before {what}")
    parser.add_argument("--scale-fold-alpha", type=alpha, default=NOT_GIVEN, metavar="ALPHA",
                        help=f"s = max|x|^alpha / max|w|^(1-alpha): a number in [0, 1] (default {DEFAULT_ALPHA}) or "
                             "'search' (per fold site on a grid, by the Hessian-weighted error of the quantizer)")


def add_ray_flags(parser: argparse.ArgumentParser) -> None:
    """``--ray`` and ``--ray-cpus``: the profile's, the KL's and the Fisher's units on a Ray cluster (:mod:`allocator.measure.distributed`)."""
    from allocator.measure.distributed import RAY_ADDRESS_HELP

    parser.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                        help=RAY_ADDRESS_HELP + "; the serial table, its measured KLs and Fisher losses up to float rounding")
    parser.add_argument("--ray-cpus", type=positive_int, default=None, metavar="N",
                        help="CPUs of the local Ray cluster --ray starts (default: every CPU here)")


def ray_settings(args: argparse.Namespace) -> RaySettings | None:
    """The :class:`allocator.measure.distributed.RaySettings` of ``--ray``/``--ray-cpus``, the cluster already joined
    or started (so a missing Ray or an unreachable address fails before the model loads)."""
    from allocator.errors import BitallocError
    from allocator.measure.distributed import RaySettings, require_ray

    if args.ray is None:
        if args.ray_cpus is not None:
            raise BitallocError("--ray-cpus only applies with --ray")
        return None
    settings = RaySettings(address=args.ray, num_cpus=args.ray_cpus)
    settings.connect(require_ray())  # stays up until the command exits
    return settings


def add_placement_flags(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype``: where blocks run, and the dtype the model is kept in (:mod:`allocator.model.placement`)."""
    from allocator.model.placement import DEVICE_HELP, STORAGE_DTYPES

    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--dtype", default="float32", choices=list(STORAGE_DTYPES),
                        help="the dtype the model is kept in, in CPU memory (auto: its checkpoint's; default float32); whatever it is, "
                        "every block runs in float32, one at a time on --device")
