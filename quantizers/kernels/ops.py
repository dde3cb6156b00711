"""``y = x @ W^T`` for a :class:`~quantizers.kernels.layout.KernelWeight`, through the C kernels.

Batch 1 (decode) runs a GEMV kernel: by default (``int8_activations``) the one that first rounds the
activations to int8 per block of up to 128 columns inside a weight group (llama.cpp rounds per 256 for
its K-quants, Q8_K) and multiplies with integer dot products (:func:`round_activations_int8` is its
reference), else the float one, exact to the stored weights.
Batches up to :data:`GEMM_MAX_BATCH` run the small-batch GEMM kernel; larger batches (long prefills) dequantize the weight with the C unpacker and hand the
product to torch's BLAS, which is faster there than anything written here. Without a compiler
everything goes through :func:`reference_matmul`.
"""

from __future__ import annotations

import ctypes

import torch

from quantizers.kernels.build import KernelLibrary, WeightDescriptor, kernel_library
from quantizers.kernels.layout import CHUNK, ChunkGeometry, KernelWeight, dequantize_reference, lut_tiles

GEMM_MAX_BATCH = 64
"""Largest number of tokens the GEMM kernel takes; above it, dequantize + torch matmul."""


class KernelError(RuntimeError):
    """The C kernel rejected its arguments (a bug in the caller, never expected in use)."""


def check_weight(weight: KernelWeight) -> None:
    """Raise ``ValueError`` unless the buffers have the dtype, shape and memory the C kernels read."""
    rows, _ = weight.shape
    geometry = weight.geometry
    if weight.codes.dtype != torch.uint8 or tuple(weight.codes.shape) != (rows, geometry.row_bytes):
        raise ValueError(f"codes must be uint8 {rows}x{geometry.row_bytes}, got {weight.codes.dtype} {tuple(weight.codes.shape)}")
    if weight.params.dtype != torch.float16 or tuple(weight.params.shape) != (rows, geometry.groups, 2):
        raise ValueError(f"params must be float16 {rows}x{geometry.groups}x2, got {weight.params.dtype} {tuple(weight.params.shape)}")
    if not (weight.codes.is_contiguous() and weight.params.is_contiguous()) or weight.codes.device.type != "cpu":
        raise ValueError("kernel weights must be contiguous CPU tensors")


class PreparedWeight:
    """A validated weight bound to the C library: the hot path of every product with it.

    Holds the buffers (so the pointers in the descriptor stay valid) and a ``bq_weight``
    descriptor, so a call converts 4 ctypes arguments instead of 10 and runs a handful of Python
    operations: a decoder calls this for every linear of every generated token, where
    microseconds per call add up to milliseconds per token. Bias is added in C and the output is
    allocated in its final shape for the same reason.
    """

    __slots__ = ("lib", "codes", "params", "bias", "rows", "cols", "bits", "group_arg", "int8_activations", "_descriptor",
                 "_address", "_key", "_lut")

    def __init__(self, lib: KernelLibrary, weight: KernelWeight, bias: torch.Tensor | None = None,
                 int8_activations: bool = False, lut: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        check_weight(weight)
        rows, cols = weight.shape
        if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (rows,) or not bias.is_contiguous()
                                 or bias.device.type != "cpu"):
            raise ValueError(f"bias must be a contiguous float32 CPU vector of {rows}")
        self.lib, self.codes, self.params, self.bias = lib, weight.codes, weight.params, bias
        self.rows, self.cols, self.bits = rows, cols, weight.bits
        self.group_arg = weight.geometry.kernel_group_size
        self.int8_activations = int8_activations
        self._key = self.pointers(weight.codes, weight.params, bias)
        # 1-bit int8 decode reads LUT tiles kept beside the chunk layout (layout.lut_tiles; ``lut``: already built)
        self._lut = (lut if lut is not None else lut_tiles(weight)) if int8_activations else None
        self._descriptor = WeightDescriptor(self._key[0], self._key[1], self._key[2] or None, rows, cols, self.group_arg, self.bits,
                                            *((t.data_ptr() for t in self._lut) if self._lut else (None, None)))
        self._address = ctypes.addressof(self._descriptor)

    @staticmethod
    def pointers(codes: torch.Tensor, params: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int, int]:
        return codes.data_ptr(), params.data_ptr(), 0 if bias is None else bias.data_ptr()

    def matches(self, lib: KernelLibrary, codes: torch.Tensor, params: torch.Tensor, bias: torch.Tensor | None,
                int8_activations: bool) -> bool:
        """Whether this binding still describes these buffers and mode (a replaced buffer needs a new one)."""
        return (lib is self.lib and self._key == self.pointers(codes, params, bias)
                and self.int8_activations == int8_activations)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (CPU, (..., cols)) -> float32 (..., rows)."""
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.to(torch.float32).contiguous()
        tokens = x.numel() // self.cols
        if tokens > GEMM_MAX_BATCH:
            weight = torch.empty(self.rows, self.cols, dtype=torch.float32)
            code = self.lib.lib.bq_dequantize(self.codes.data_ptr(), self.params.data_ptr(), self.rows, self.cols, self.bits,
                                              self.group_arg, weight.data_ptr())
            if code != 0:
                raise KernelError(f"bq_dequantize failed with code {code}")
            return torch.nn.functional.linear(x, weight, self.bias)
        out = torch.empty(x.shape[:-1] + (self.rows,), dtype=torch.float32)
        if tokens == 1 and self.int8_activations:
            code = self.lib.lib.bq_gemv_i8_desc(self._address, x.data_ptr(), out.data_ptr())
        else:
            code = self.lib.lib.bq_matmul_desc(self._address, x.data_ptr(), tokens, out.data_ptr())
        if code != 0:
            raise KernelError(f"bq_matmul failed with code {code} for a {self.rows}x{self.cols} {self.bits}-bit weight")
        return out


def matmul(x: torch.Tensor, weight: KernelWeight, bias: torch.Tensor | None = None,
           library: KernelLibrary | None = None, int8_activations: bool = False) -> torch.Tensor:
    """``x @ W^T + bias`` for ``x`` of shape (..., in_features), any float dtype -> float32 (..., out).

    ``library`` defaults to :func:`~quantizers.kernels.build.kernel_library`; without one this is
    :func:`reference_matmul`. ``int8_activations``: a single token is computed with x
    rounded by :func:`round_activations_int8`, as the decode path of :class:`QuantLinear` does.
    """
    rows, cols = weight.shape
    if x.dim() == 0 or x.shape[-1] != cols:
        raise ValueError(f"expected input of shape (..., {cols}), got {tuple(x.shape)}")
    lib = library if library is not None else kernel_library()
    if lib is None:
        out = reference_matmul(x, weight)
        return out if bias is None else out + bias.to(out)
    return PreparedWeight(lib, weight, bias, int8_activations)(x.detach().cpu())


def dequantize(weight: KernelWeight, library: KernelLibrary | None = None) -> torch.Tensor:
    """The float32 weight (out x in), unpacked by the C kernel when it is available."""
    lib = library if library is not None else kernel_library()
    if lib is None:
        return dequantize_reference(weight)
    check_weight(weight)
    rows, cols = weight.shape
    out = torch.empty(rows, cols, dtype=torch.float32)
    code = lib.lib.bq_dequantize(weight.codes.data_ptr(), weight.params.data_ptr(), rows, cols, weight.bits,
                                 weight.geometry.kernel_group_size, out.data_ptr())
    if code != 0:
        raise KernelError(f"bq_dequantize failed with code {code}")
    return out


def reference_matmul(x: torch.Tensor, weight: KernelWeight) -> torch.Tensor:
    """Dequantize in plain torch, then matmul: what the kernels must agree with (float32 result)."""
    return x.float() @ dequantize_reference(weight).to(x.device).T


def round_activations_int8(x: torch.Tensor, geometry: ChunkGeometry) -> torch.Tensor:
    """``x`` (..., cols) as the int8-activation GEMV sees it: per activation block of the weight's layout
    (:attr:`ChunkGeometry.activation_blocks`: up to 128 columns, never straddling a group),
    ``d = max|x| / 127`` and ``x -> round(x * (127 / max|x|)) * d`` (ties to even), in float32. The
    kernel's result is the exact product of this with the weight."""
    x = x.float()
    padded = x.new_zeros(x.shape[:-1] + (geometry.padded_cols,))
    positions = torch.from_numpy(geometry.column_positions)
    padded[..., positions] = x
    chunks = padded.reshape(x.shape[:-1] + (geometry.chunks, CHUNK))
    blocks = torch.from_numpy(geometry.activation_blocks)
    chunk_amax = chunks.abs().amax(dim=-1)
    block_amax = chunk_amax.new_zeros(chunk_amax.shape[:-1] + (int(blocks.max()) + 1,))
    block_amax = block_amax.index_reduce(-1, blocks, chunk_amax, "amax")
    amax = block_amax[..., blocks].unsqueeze(-1)
    inverse = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    rounded = torch.round(chunks * inverse) * (amax / 127.0)
    return rounded.reshape(padded.shape)[..., positions]
