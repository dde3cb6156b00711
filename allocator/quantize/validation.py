"""Checks of user settings against a concrete model, with one-line explanations."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from allocator.errors import BitallocError


def validate_group_size(group_size: int | None, linears: Mapping[str, nn.Linear]) -> None:
    """A group size must divide every layer's input width, or be a power of two.

    Power-of-two group sizes are the standard ones (32, 64, 128); where such a size does not
    divide a width (SmolLM2's 576 with 128) the last group of each row is shorter, as in the
    GPTQ reference implementation, and is counted honestly. Any other size must divide exactly.
    """
    if group_size is None:
        return
    if group_size < 1:
        raise BitallocError(f"group size must be positive, got {group_size}")
    power_of_two = group_size & (group_size - 1) == 0
    for name, module in linears.items():
        if module.in_features % group_size and not power_of_two:
            raise BitallocError(
                f"group size {group_size} does not divide in_features {module.in_features} of {name}; "
                "use a divisor of every width or a power of two"
            )
