"""Packed 1-4 bit weights and CPU kernels for them (GEMV for decode, small-batch GEMM for prefill).

- :mod:`~quantizers.kernels.layout`: the kernel layout of a uniform-grid weight and the exact
  conversion from/to the stored bit stream;
- :mod:`~quantizers.kernels.build`: compiles ``lowbit.c`` (C, OpenMP, AVX2 with a portable
  fallback) on first use into the bitalloc cache and loads it with ctypes;
- :mod:`~quantizers.kernels.ops`: ``matmul``/``dequantize`` through the kernels, the
  dequantize-then-matmul reference, and the int8 rounding of decode activations;
- :mod:`~quantizers.kernels.linear`: :class:`QuantLinear`, the ``nn.Linear`` replacement.
"""

from quantizers.kernels.build import kernel_library
from quantizers.kernels.layout import KERNEL_BITS, ChunkGeometry, KernelWeight, dequantize_reference
from quantizers.kernels.linear import QuantLinear
from quantizers.kernels.ops import GEMM_MAX_BATCH, dequantize, matmul, reference_matmul, round_activations_int8

__all__ = [
    "GEMM_MAX_BATCH",
    "KERNEL_BITS",
    "ChunkGeometry",
    "KernelWeight",
    "QuantLinear",
    "dequantize",
    "dequantize_reference",
    "kernel_library",
    "matmul",
    "reference_matmul",
    "round_activations_int8",
]
