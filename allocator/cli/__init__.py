"""``bitalloc`` command line. Bad input gets one line on stderr and exit code 2.

:mod:`allocator.cli.parser` builds the parser, each module of :mod:`allocator.cli.commands` declares
one command's arguments and runs it (thin: the flows live in :mod:`allocator.jobs` and the stages),
and :mod:`allocator.cli.common` holds the steps several commands share. The CLI sits on top of
everything: it is the one part of ``allocator`` that imports ``envs`` and ``policies``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from allocator.cli.common import TRAIN_ACTION_MAPPINGS, quiet_libraries
from allocator.cli.parser import EXIT_BAD_INPUT, OneLineParser


def build_parser() -> argparse.ArgumentParser:
    from allocator.cli.commands import COMMANDS

    parser = OneLineParser(prog="bitalloc", description="Per-layer low-bit allocation, quantization and evaluation of LLMs.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for command in COMMANDS:
        command.add_arguments(commands.add_parser(command.NAME, help=command.HELP))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from allocator.cli.commands import COMMANDS
    from allocator.errors import BitallocError

    args = build_parser().parse_args(argv)
    quiet_libraries()
    handlers = {command.NAME: command.run for command in COMMANDS}
    try:
        return handlers[args.command](args)
    except BitallocError as exc:
        print(f"bitalloc: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        # a file-system failure no check caught first (paths are checked before work starts): one line, no traceback
        from allocator.storage import os_error_line

        print(f"bitalloc: error: {os_error_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("bitalloc: interrupted", file=sys.stderr)
        return 130


__all__ = ["EXIT_BAD_INPUT", "TRAIN_ACTION_MAPPINGS", "build_parser", "main"]
