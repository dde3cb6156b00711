"""``QuantLinear``: an inference ``nn.Linear`` whose weight stays packed at 1-4 (or 8) bits.

Three layers, kept apart: the tensor format (:mod:`quantizers.kernels.layout`), the kernels
(:mod:`quantizers.kernels.ops` over the C library), and this module, which only holds buffers and
routes ``forward`` to the kernels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantizers.base import QuantizedTensor
from quantizers.kernels import ops
from quantizers.kernels.build import kernel_library
from quantizers.kernels.layout import ChunkGeometry, KernelWeight, lut_tiles


class QuantLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` on a uniform grid of 1-4 or 8 bit codes (kernel layout buffers).

    Buffers (so ``state_dict``/``load_state_dict`` carry them): ``codes`` (uint8,
    out x row_bytes), ``params`` (float16 (scale, zero) pairs, out x groups x 2) and ``bias``
    (float32 or absent). The input may be any float dtype; the product runs in float32 and is
    returned in the input's dtype.

    Single-token products (decode) round the input to int8 per block of up to 128 columns and use integer dot products,
    like llama.cpp's quantized matmuls (:func:`~quantizers.kernels.ops.round_activations_int8`); set
    ``int8_activations = False`` for the float GEMV, exact to the stored weights. Several tokens
    (prefill, evaluation) always multiply with float activations.

    Inference only: when autograd is recording and the input requires grad, ``forward``
    dequantizes and uses ``F.linear`` so gradients reach the input (the weight gets none).
    """

    codes: torch.Tensor
    params: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None,
                 symmetric: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        geometry = ChunkGeometry(in_features, group_size, bits)
        self.int8_activations = True
        self._prepared: ops.PreparedWeight | None = None
        """The buffers bound to the kernels; rebuilt when a buffer is replaced (``.to()``, assign-loading)
        or loaded into (``load_state_dict``)."""
        self._lut_cache: tuple[tuple[int, int], tuple[torch.Tensor, torch.Tensor] | None] | None = None
        """(buffer pointers, :meth:`lut_tiles`) of the buffers they were built from."""
        self.register_buffer("codes", torch.zeros(out_features, geometry.row_bytes, dtype=torch.uint8))
        self.register_buffer("params", torch.zeros(out_features, geometry.groups, 2, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> QuantLinear:
        """Build from a stored uniform-grid tensor (converted to the kernel layout once, here)."""
        weight = KernelWeight.from_quantized(qt)
        module = cls(qt.shape[1], qt.shape[0], weight.bits, weight.group_size, weight.symmetric, bias=bias is not None)
        module.codes.copy_(weight.codes)
        module.params.copy_(weight.params)
        if bias is not None:
            module.bias.copy_(bias.detach().float())
        return module

    @classmethod
    def concatenate(cls, modules: list[QuantLinear]) -> QuantLinear | None:
        """One module computing every module's output side by side (rows stacked in order), or ``None``
        when their grids differ (bits, group size, symmetry or input width) and no single kernel call can
        serve them. A fused q/k/v or gate/up projection costs one call per token instead of three or two;
        a missing bias becomes zeros."""
        first = modules[0]
        grid = (first.in_features, first.bits, first.group_size, first.symmetric)
        if any((m.in_features, m.bits, m.group_size, m.symmetric) != grid for m in modules):
            return None
        has_bias = any(m.bias is not None for m in modules)
        fused = cls(first.in_features, sum(m.out_features for m in modules), first.bits, first.group_size, first.symmetric,
                    bias=has_bias)
        fused.int8_activations = all(m.int8_activations for m in modules)
        fused.codes.copy_(torch.cat([m.codes for m in modules]))
        fused.params.copy_(torch.cat([m.params for m in modules]))
        if has_bias:
            fused.bias.copy_(torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features) for m in modules]))
        return fused

    @property
    def weight_layout(self) -> KernelWeight:
        """The buffers as a :class:`KernelWeight` (views, no copies)."""
        return KernelWeight(self.codes, self.params, (self.out_features, self.in_features), self.bits, self.group_size, self.symmetric)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (out x in) on the buffers' device, equal to the stored form's dequantized weight."""
        weight = self.weight_layout
        if self.codes.device.type != "cpu":  # the unpackers run on the CPU
            weight = KernelWeight(weight.codes.cpu(), weight.params.cpu(), weight.shape, weight.bits, weight.group_size,
                                  weight.symmetric)
        return ops.dequantize(weight).to(self.codes.device)

    def to_quantized(self) -> QuantizedTensor:
        """The stored form again (what :func:`allocator.runtime.packed.save_quantized` writes)."""
        return self.weight_layout.to_quantized()

    def lut_tiles(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The LUT tiles the 1-bit int8 GEMV reads (:func:`~quantizers.kernels.layout.lut_tiles`), built once
        per set of buffers and shared by the kernel binding and the C decode step; None for other widths."""
        key = (self.codes.data_ptr(), self.params.data_ptr())
        if self._lut_cache is None or self._lut_cache[0] != key:
            self._lut_cache = (key, lut_tiles(self.weight_layout))
        return self._lut_cache[1]

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        # loading copies into the buffers in place (same pointers): what was derived from them is stale
        self._prepared = None
        self._lut_cache = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lib = kernel_library()
        buffers = self._buffers  # direct dict reads: nn.Module.__getattr__ costs ~1 us per buffer
        codes, params, bias = buffers["codes"], buffers["params"], buffers["bias"]
        if lib is None or not x.is_cpu or (x.requires_grad and torch.is_grad_enabled()):
            weight = self.dequantize().to(device=x.device, dtype=x.dtype)
            return F.linear(x, weight, None if bias is None else bias.to(device=x.device, dtype=x.dtype))
        prepared = self._prepared
        if prepared is None or not prepared.matches(lib, codes, params, bias, self.int8_activations):
            prepared = self._prepared = ops.PreparedWeight(lib, self.weight_layout, bias, self.int8_activations,
                                                           lut=self.lut_tiles() if self.int8_activations else None)
        out = prepared(x)
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    def __getstate__(self) -> dict[str, Any]:
        # The kernel binding holds raw pointers (ctypes refuses to copy or pickle it) that would
        # point into the original's buffers anyway: copies and unpickled modules bind their own.
        state = self.__dict__.copy()
        state["_prepared"] = None
        state["_lut_cache"] = None
        return state

    def extra_repr(self) -> str:
        group = "row" if self.group_size is None else str(self.group_size)
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={group}, symmetric={self.symmetric}, bias={self.bias is not None}, "
                f"int8_activations={self.int8_activations}")
