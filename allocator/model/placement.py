"""Where the arithmetic runs: the model stays in CPU memory in its storage dtype; one decoder block at a time is copied to
the compute device in fp32 (the layout of GPTQModel and AutoRound: a 7B model in RAM, one block on the GPU).

:func:`resolve_device` turns ``--device`` into a :class:`torch.device` (refusing one this torch cannot use, before any
work); :func:`working_block` gives the block to run there; :func:`to_compute` moves the tensors a block is called with.
A block that already is on the device in fp32 (the CPU default with an fp32 model) is used as it is: no copy.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from allocator.errors import BitallocError

COMPUTE_DTYPE = torch.float32
"""Every block forward, Hessian and quantizer runs in this dtype, whatever the model is stored in."""
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"
DEVICE_HELP = f"where blocks run ({DEVICE_CHOICES}; auto: the first CUDA GPU when torch sees one, else cpu)"
STORAGE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""``--dtype`` choices: the dtype the model is kept in (``auto``: what its checkpoint holds)."""


def resolve_device(spec: str) -> torch.device:
    """``spec`` as a device this torch can use; anything else is a one-line :class:`BitallocError`."""
    text = spec.strip().lower()
    if text == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise BitallocError(f"--device {spec!r} is not a device; choose from {DEVICE_CHOICES}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BitallocError(f"--device {spec}: this torch sees no CUDA GPU (a CPU-only wheel, or no visible device)")
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise BitallocError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise BitallocError(f"--device {spec}: this torch has no MPS backend here")
        return device
    raise BitallocError(f"--device {spec!r}: bitalloc runs on {DEVICE_CHOICES}, not {device.type}")


def storage_dtype(name: str) -> torch.dtype | None:
    """``--dtype`` as a torch dtype (None: the checkpoint's own)."""
    if name not in STORAGE_DTYPES:
        raise BitallocError(f"--dtype {name!r}: choose from {', '.join(STORAGE_DTYPES)}")
    return STORAGE_DTYPES[name]


def is_placed(module: nn.Module, device: torch.device) -> bool:
    """Whether every floating parameter of ``module`` is already on ``device`` in :data:`COMPUTE_DTYPE`, and every buffer
    on ``device`` (buffers keep their dtype: a packed kernel layer's fp16 scales are its stored form, not a weight)."""
    return all(p.device == device and (p.dtype == COMPUTE_DTYPE or not p.is_floating_point()) for p in module.parameters()) \
        and all(b.device == device for b in module.buffers())


@contextlib.contextmanager
def working_block(block: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """``block`` ready to run on ``device`` in fp32: the block itself when it already is, else a copy that is dropped on
    exit (so at most one block's fp32 copy exists beside the stored model)."""
    if is_placed(block, device):
        yield block
        return
    working = copy.deepcopy(block).to(device=device, dtype=COMPUTE_DTYPE)
    try:
        yield working
    finally:
        del working


def to_compute(value: Any, device: torch.device) -> Any:
    """``value`` (a tensor, or tuples/lists/dicts of them) on ``device``, floating tensors in :data:`COMPUTE_DTYPE`."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=COMPUTE_DTYPE if value.is_floating_point() else value.dtype)
    if isinstance(value, tuple):
        return tuple(to_compute(v, device) for v in value)
    if isinstance(value, list):
        return [to_compute(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_compute(v, device) for k, v in value.items()}
    return value


CPU = torch.device("cpu")
