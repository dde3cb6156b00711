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


CODES_PER_WORD = 8
"""Codes packed per little-endian uint64 word: 8 codes of ``bits`` bits fill exactly ``bits`` bytes (at most 56 bits)."""


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` into a flat uint8 tensor (any input shape).

    Works 8 codes at a time (one uint64 word holds ``8 * bits`` bits, i.e. exactly ``bits`` bytes of the stream), so
    the scratch memory is about two bytes per code: an 8B model's down_proj packs in ~0.2 GB, not the ~4 GB an int64
    bit matrix needed.
    """
    _check_bits(bits)
    flat = codes.reshape(-1)
    # compared as Python numbers: a uint8 tensor compared with 256 would wrap the bound
    if flat.numel() and (flat.amin().item() < 0 or flat.amax().item() >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    small = flat.to(torch.uint8).cpu().numpy()
    if bits == 8:
        return torch.from_numpy(small.copy())
    count = small.size
    words = -(-count // CODES_PER_WORD)
    padded = np.zeros(words * CODES_PER_WORD, dtype=np.uint8)
    padded[:count] = small
    lanes = padded.reshape(words, CODES_PER_WORD)
    stream = np.zeros(words, dtype="<u8")
    for lane in range(CODES_PER_WORD):
        stream |= lanes[:, lane].astype("<u8") << np.uint64(lane * bits)
    packed = stream.view(np.uint8).reshape(words, 8)[:, :bits].reshape(-1)[: packed_nbytes(count, bits)]
    return torch.from_numpy(packed.copy())


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``count`` codes as a flat uint8 tensor."""
    _check_bits(bits)
    data = packed.reshape(-1).cpu().numpy().astype(np.uint8)
    if data.size != packed_nbytes(count, bits):
        raise ValueError(f"expected {packed_nbytes(count, bits)} packed bytes, got {data.size}")
    if bits == 8:
        return torch.from_numpy(data.copy())
    words = -(-count // CODES_PER_WORD)
    stream_bytes = np.zeros(words * bits, dtype=np.uint8)
    stream_bytes[: data.size] = data
    raw = np.zeros((words, 8), dtype=np.uint8)
    raw[:, :bits] = stream_bytes.reshape(words, bits)
    stream = raw.view("<u8").reshape(words)
    mask = np.uint64((1 << bits) - 1)
    codes = np.empty((words, CODES_PER_WORD), dtype=np.uint8)
    for lane in range(CODES_PER_WORD):
        codes[:, lane] = (stream >> np.uint64(lane * bits)) & mask
    return torch.from_numpy(codes.reshape(-1)[:count].copy())


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_CODE_BITS:
        raise ValueError(f"code width must be 1-{MAX_CODE_BITS} bits, got {bits}")
