"""``bitalloc models``: list the built-in models."""

from __future__ import annotations

import argparse

NAME = "models"
HELP = "list the built-in models"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    from allocator.model.loading import BUILTIN_MODELS

    for model in BUILTIN_MODELS.values():
        print(f"{model.name:16s} {model.description}")
    return 0
