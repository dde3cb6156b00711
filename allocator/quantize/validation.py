"""Checks of user settings against a concrete model, with one-line explanations."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from allocator.errors import BitallocError
from quantizers import Quantizer


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


def check_assignment_fits(
    quantizers: Mapping[str, Quantizer],
    linears: Mapping[str, nn.Linear],
    source: str,
    numel: Mapping[str, int] | None = None,
) -> None:
    """Refuse, before anything is quantized, an assignment (a bit map's, a packed model's) that does not
    fit the model: a module that is not one of its quantizable linears, a weight count other than the
    model's (``numel``: what the bit map recorded; a map made for another model's sizes), or a group
    size that neither divides the module's input width nor is a power of two
    (:func:`validate_group_size`, as ``eval --group-size`` checks it)."""
    for name, quantizer in quantizers.items():
        linear = linears.get(name)
        if linear is None:
            raise BitallocError(f"{source}: {name} is not a quantizable linear of this model (a bit map for another model?)")
        expected = (numel or {}).get(name)
        if expected is not None and expected != linear.weight.numel():
            raise BitallocError(f"{source}: {name} has {expected} weights in the bit map, {linear.weight.numel()} in this model "
                                f"({tuple(linear.weight.shape)}; a bit map for another model?)")
        try:
            validate_group_size(getattr(quantizer, "group_size", None), {name: linear})
        except BitallocError as exc:
            raise BitallocError(f"{source}: {exc}") from None
