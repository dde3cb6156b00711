"""The one interface every weight quantizer implements.

A quantizer maps a float weight matrix ``W`` (out_features x in_features), and for
calibration-aware methods the layer's input Hessian ``H = 2 X X^T / n``, to a
:class:`QuantizedTensor`: the dequantized float weight the simulated model runs with, and
``stored``, exactly the tensors a file holds. Bits are never estimated from a formula alone:
``storage_bits`` is the byte size of ``stored`` times eight, and every format can rebuild the
dequantized weight from ``stored`` and ``meta`` (tests check both for every quantizer).
"""

from __future__ import annotations

import abc
import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any, ClassVar

import torch


@dataclass
class QuantizedTensor:
    """A quantized weight: what is stored, how to read it, and what it decodes to."""

    format: str
    """Name of the storage format in :mod:`quantizers.formats` that decodes ``stored``."""
    shape: tuple[int, int]
    stored: dict[str, torch.Tensor]
    """Every tensor a file must hold to reconstruct the weight (packed codes, scales, ...)."""
    meta: dict[str, Any]
    """Small JSON-able settings the decoder needs (bit width, group size, ...)."""
    dequantized: torch.Tensor = field(repr=False)
    """float32 weight of ``shape``: what a dequantize-then-matmul model computes with."""

    @property
    def storage_bits(self) -> int:
        return 8 * sum(t.numel() * t.element_size() for t in self.stored.values())

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def bits_per_weight(self) -> float:
        return self.storage_bits / self.numel


@dataclass(frozen=True)
class GroupLayout:
    """Consecutive input columns that share one scale (and zero point).

    ``group_size=None`` means one group per output row. When the group size does not divide
    ``in_features`` the last group is shorter, as in the GPTQ reference implementation.
    """

    in_features: int
    group_size: int | None

    def __post_init__(self) -> None:
        # a zero or fractional size would divide by zero or index by floats deep inside a quantizer
        checked_group_size(self.group_size)
    @property
    def size(self) -> int:
        return self.in_features if self.group_size is None else self.group_size

    @property
    def count(self) -> int:
        return math.ceil(self.in_features / self.size)

    def bounds(self, group: int) -> tuple[int, int]:
        start = group * self.size
        return start, min(start + self.size, self.in_features)

    def column_groups(self) -> torch.Tensor:
        """Group index of every input column (int64, length ``in_features``)."""
        return torch.arange(self.in_features) // self.size


def checked_group_size(group_size: int | None) -> int | None:
    """A quantizer's ``group_size`` setting: positive, or one group per row, written None here and -1 in GPTQ and
    GPTQModel (accepted as such). Anything else raises ValueError."""
    group_size = None if group_size == -1 and not isinstance(group_size, bool) else group_size
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, Integral) or group_size < 1):
        raise ValueError(f"group_size must be a positive number of columns, -1 or None (one group per row), got {group_size!r}")
    return group_size


def checked_count(value: int, name: str, low: int = 1) -> int:
    """An integer setting of at least ``low`` (block sizes, iteration counts); anything else (0, 2.5,
    "128", true) raises ValueError, before it could stall or crash a quantization midway."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise ValueError(f"{name} must be an integer of at least {low}, got {value!r}")
    return int(value)


def checked_flag(value: bool, name: str) -> bool:
    """A true/false setting (a JSON string "false" would otherwise count as true)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def checked_damping(value: float) -> float:
    """The Hessian damping ratio: a finite number of at least 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"damp_ratio must be a finite number of at least 0, got {value!r}")
    return float(value)


class Quantizer(abc.ABC):
    """Base class: one subclass per algorithm, configured in ``__init__``."""

    name: ClassVar[str]
    uses_hessian: ClassVar[bool] = False
    """True when :meth:`quantize` takes the layer's input Hessian (see :meth:`needs_hessian`)."""
    one_bit: ClassVar[bool] = False
    """Whether this is a 1-bit format (its ``bits`` setting, if any, is not a uniform grid width)."""

    @abc.abstractmethod
    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> QuantizedTensor:
        """Quantize ``weight`` (out x in, any float dtype)."""

    @abc.abstractmethod
    def storage_bits(self, out_features: int, in_features: int) -> int:
        """Exact stored bits for a weight of this shape, without quantizing it."""

    @abc.abstractmethod
    def settings(self) -> dict[str, Any]:
        """JSON-able settings that reproduce this quantizer via :func:`quantizers.build_quantizer`."""

    def label(self) -> str:
        """Short human-readable name, e.g. ``gptq-w3g128``."""
        return self.name

    def needs_hessian(self) -> bool:
        """Whether :meth:`quantize` with these settings fails without the input Hessian (some quantizers that take one
        can do without it in some settings)."""
        return self.uses_hessian


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch on one thread: column-by-column loops issue thousands of tiny ops, where
    intra-op threading only adds synchronization (2x slower on a busy 2-core machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
