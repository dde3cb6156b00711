"""One module per ``bitalloc`` command, each with ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> exit code``; :data:`COMMANDS` is the order ``bitalloc --help`` lists them in."""

from __future__ import annotations

from types import ModuleType

from allocator.cli.commands import evaluate, export, features, generate, models, pareto, profile, quantize, run, solve, train

COMMANDS: tuple[ModuleType, ...] = (evaluate, profile, features, solve, train, quantize, pareto, run, export, generate, models)
