"""Bit packing of small unsigned integer codes: the on-disk layout of every quantized tensor.

Codes of width ``bits`` (1-8) are written as one little-endian bit stream: code ``i`` occupies
bits ``[i*bits, (i+1)*bits)`` of the stream, least significant bit first, and the stream is cut
into bytes. ``n`` codes therefore take exactly ``ceil(n * bits / 8)`` bytes, which is what the
bit accounting counts.
"""

from __future__ import annotations

import math

import numpy as np
import torch

MAX_CODE_BITS = 8


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits occupy once packed."""
    return math.ceil(count * bits / 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` into a flat uint8 tensor (any input shape)."""
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.int64).cpu().numpy()
    if flat.size and (flat.min() < 0 or flat.max() >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    if bits == 8:
        return torch.from_numpy(flat.astype(np.uint8))
    # (n, bits) matrix of the codes' bits, least significant first, then one bit stream.
    bit_matrix = ((flat[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return torch.from_numpy(np.packbits(bit_matrix.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``count`` codes as a flat uint8 tensor."""
    _check_bits(bits)
    data = packed.reshape(-1).cpu().numpy().astype(np.uint8)
    if data.size != packed_nbytes(count, bits):
        raise ValueError(f"expected {packed_nbytes(count, bits)} packed bytes, got {data.size}")
    if bits == 8:
        return torch.from_numpy(data.copy())
    stream = np.unpackbits(data, bitorder="little")[: count * bits].reshape(count, bits)
    weights = (1 << np.arange(bits)).astype(np.uint16)
    return torch.from_numpy((stream.astype(np.uint16) @ weights).astype(np.uint8))


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_CODE_BITS:
        raise ValueError(f"code width must be 1-{MAX_CODE_BITS} bits, got {bits}")
