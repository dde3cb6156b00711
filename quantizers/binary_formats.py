"""Stored forms of the 1-bit family (BiLLM, PB-LLM, dynamic grouping, W(1+1)) and their decoders.

Every format here is a set of bit planes and small integer streams packed with
:mod:`quantizers.packing`, plus float16 scales. Conventions shared by all of them:

* a **sign bit** is 1 for ``w >= 0`` (decoded as +1) and 0 for ``w < 0`` (decoded as -1);
* scales are float16 on disk and are rounded to float16 before a quantizer uses them, so the
  simulated weight equals what the decoder rebuilds;
* ``numel = rows * cols`` weights are laid out row-major (flat index ``r * cols + c``).

Plain XNOR needs no format of its own: ``sign(w) * alpha`` is the symmetric 1-bit uniform grid
(``(q - 1/2) * s`` with ``s = 2 * alpha``), stored as :data:`quantizers.formats.UNIFORM_GRID`.

This module only knows layouts (encode, decode, exact sizes); the algorithms that choose the codes
live in one module per method. :mod:`quantizers.formats` registers the decoders.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from quantizers.base import GroupLayout
from quantizers.grid import SCALE_DTYPE
from quantizers.packing import MAX_CODE_BITS, pack_codes, packed_nbytes, unpack_codes

BILLM = "billm"
PBLLM = "pbllm"
DYNGROUP = "dyngroup"
W1P1 = "w1p1"

SCALE_BITS = torch.finfo(SCALE_DTYPE).bits
INT8_ZERO = 127
"""PB-LLM int8 salient values ``q`` in [-127, 127] are stored as the 8-bit code ``q + 127``."""

Stored = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- shared helpers


def to_scale(values: torch.Tensor) -> torch.Tensor:
    """Round scales to their stored float16 value and return them as float32."""
    return values.float().to(SCALE_DTYPE).float()


def sign_bits(weight: torch.Tensor) -> torch.Tensor:
    """1 where ``weight >= 0`` else 0 (uint8, same shape)."""
    return (weight >= 0).to(torch.uint8)


def signs_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """+1.0 for bit 1, -1.0 for bit 0."""
    return bits.float() * 2 - 1


def index_bits(count: int) -> int:
    """Bits needed to tell ``count`` alternatives apart: ``ceil(log2(count))`` (0 for one)."""
    return 0 if count <= 1 else math.ceil(math.log2(count))


def pack_wide(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes of any width as one little-endian ``bits``-bit stream.

    Widths up to 8 go through :func:`quantizers.packing.pack_codes`. Wider codes are split into
    their bits, least significant first, and packed as 1-bit codes: that is the same bit stream a
    ``bits``-wide packer writes, so ``n`` codes take exactly ``ceil(n * bits / 8)`` bytes.
    """
    if bits <= MAX_CODE_BITS:
        return pack_codes(codes, bits)
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    planes = (flat[:, None] >> torch.arange(bits)) & 1
    return pack_codes(planes.reshape(-1), 1)


def unpack_wide(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_wide`: the first ``count`` codes as int64."""
    if bits <= MAX_CODE_BITS:
        return unpack_codes(packed, bits, count).to(torch.int64)
    planes = unpack_codes(packed, 1, count * bits).to(torch.int64).reshape(count, bits)
    return (planes << torch.arange(bits)).sum(dim=1)


def _unpack_plane(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    rows, cols = shape
    return unpack_codes(packed, 1, rows * cols).reshape(rows, cols)


# ----------------------------------------------------------------------------- BiLLM


def billm_storage_bits(shape: tuple[int, int], block_size: int) -> int:
    """Sign plane + second plane (numel bits each) + salient-column bitmap + 4 fp16 scales per (row, block).

    Every weight costs exactly two bits whatever the salient-column count: salient columns use the
    second plane for the residual sign, the others for the break-point group bit.
    """
    rows, cols = shape
    blocks = math.ceil(cols / block_size)
    return 8 * (2 * packed_nbytes(rows * cols, 1) + packed_nbytes(cols, 1)) + SCALE_BITS * 4 * rows * blocks


def encode_billm(
    signs: torch.Tensor, second: torch.Tensor, salient_columns: torch.Tensor, scales: torch.Tensor, block_size: int
) -> tuple[Stored, dict[str, Any]]:
    """``signs``/``second``: rows x cols bits; ``salient_columns``: cols bools; ``scales``: rows x blocks x 4.

    Scale slots per (row, block): 0/1 = first and residual scale of salient columns (order-2
    residual binarization), 2/3 = concentrated (``|w| <= p``) and sparse (``|w| > p``) scale of the
    other columns.
    """
    stored = {
        "signs": pack_codes(signs, 1),
        "second": pack_codes(second, 1),
        "salient_columns": pack_codes(salient_columns.to(torch.uint8), 1),
        "scales": scales.to(SCALE_DTYPE).contiguous(),
    }
    return stored, {"block_size": block_size}


def decode_billm(stored: Stored, meta: dict[str, Any], shape: tuple[int, int]) -> torch.Tensor:
    """``w = s*a1 + t*a2`` in salient columns, ``w = s * (a_sparse if t else a_conc)`` elsewhere (s, t = +-1 / bits)."""
    rows, cols = shape
    sign = signs_from_bits(_unpack_plane(stored["signs"], shape))
    second_bit = _unpack_plane(stored["second"], shape).bool()
    salient = unpack_codes(stored["salient_columns"], 1, cols).bool()
    scales = stored["scales"].float()[:, GroupLayout(cols, meta["block_size"]).column_groups()]  # rows x cols x 4
    residual = sign * scales[..., 0] + signs_from_bits(second_bit) * scales[..., 1]
    split = sign * torch.where(second_bit, scales[..., 3], scales[..., 2])
    return torch.where(salient[None, :], residual, split)


# ----------------------------------------------------------------------------- PB-LLM


def pbllm_position_bits(numel: int, salient_count: int) -> tuple[str, int]:
    """The cheaper way to store which weights are salient: ``("bitmap", 1)`` or ``("index", width)``."""
    width = index_bits(numel)
    return ("index", width) if salient_count * width < numel else ("bitmap", 1)


def pbllm_storage_bits(
    shape: tuple[int, int], salient_count: int, salient_format: str, layout: GroupLayout
) -> int:
    """Positions + signs of the binarized weights + fp16 binary scales + salient values (+ int8 row scales)."""
    rows, cols = shape
    numel = rows * cols
    kind, width = pbllm_position_bits(numel, salient_count)
    positions = packed_nbytes(numel, 1) if kind == "bitmap" else packed_nbytes(salient_count, width)
    total = 8 * (positions + packed_nbytes(numel - salient_count, 1)) + SCALE_BITS * rows * layout.count
    if salient_format == "int8":
        return total + 8 * salient_count + SCALE_BITS * rows
    return total + SCALE_BITS * salient_count


def encode_pbllm(
    salient: torch.Tensor,
    signs: torch.Tensor,
    binary_scales: torch.Tensor,
    salient_values: torch.Tensor,
    salient_scales: torch.Tensor | None,
    layout: GroupLayout,
) -> tuple[Stored, dict[str, Any]]:
    """Stored form and position meta of a PB-LLM weight.

    ``salient``: rows x cols bools; ``signs``: rows x cols bits (only the non-salient ones are
    kept); ``binary_scales``: rows x groups; ``salient_values``: the salient weights in row-major
    order, int8 codes ``q`` in [-127, 127] when ``salient_scales`` (rows) is given, else float.
    """
    numel = salient.numel()
    flat = salient.reshape(-1)
    count = int(flat.sum())
    kind, width = pbllm_position_bits(numel, count)
    stored: Stored = {}
    if kind == "bitmap":
        stored["mask"] = pack_codes(flat.to(torch.uint8), 1)
    else:
        stored["positions"] = pack_wide(torch.nonzero(flat).reshape(-1), width)
    stored["signs"] = pack_codes(signs.reshape(-1)[~flat], 1)
    stored["binary_scales"] = binary_scales.to(SCALE_DTYPE).contiguous()
    if salient_scales is None:
        stored["salient_values"] = salient_values.to(SCALE_DTYPE).contiguous()
    else:
        stored["salient_codes"] = pack_codes(salient_values.to(torch.int64) + INT8_ZERO, 8)
        stored["salient_scales"] = salient_scales.to(SCALE_DTYPE).contiguous()
    meta = {"positions": kind, "position_bits": width, "salient_count": count, "group_size": layout.group_size}
    return stored, meta


def decode_pbllm(stored: Stored, meta: dict[str, Any], shape: tuple[int, int]) -> torch.Tensor:
    rows, cols = shape
    numel = rows * cols
    count = meta["salient_count"]
    if meta["positions"] == "bitmap":
        flat_mask = unpack_codes(stored["mask"], 1, numel).bool()
    else:
        flat_mask = torch.zeros(numel, dtype=torch.bool)
        flat_mask[unpack_wide(stored["positions"], meta["position_bits"], count)] = True
    mask = flat_mask.reshape(rows, cols)
    out = torch.zeros(rows, cols)
    # Binarized weights: sign * scale of their (row, column group).
    scales = stored["binary_scales"].float()[:, GroupLayout(cols, meta["group_size"]).column_groups()]
    signs = signs_from_bits(unpack_codes(stored["signs"], 1, numel - count))
    out[~mask] = signs * scales[~mask]
    # Salient weights, in row-major order.
    if "salient_codes" in stored:
        codes = unpack_codes(stored["salient_codes"], 8, count).float() - INT8_ZERO
        row_of = torch.nonzero(mask)[:, 0]
        out[mask] = codes * stored["salient_scales"].float()[row_of]
    else:
        out[mask] = stored["salient_values"].float()
    return out


# ----------------------------------------------------------------------------- dynamic grouping


def dyngroup_storage_bits(shape: tuple[int, int], group_counts: list[int], structure: str, block_size: int | None = None) -> int:
    """Signs + group indices + one fp16 scale per group (+ per-row group counts for ``row``).

    ``group_counts`` is ``[G]`` for ``structure="matrix"`` and ``"block"`` and the per-row counts for
    ``"row"``; the index width is ``ceil(log2(max G))``, and each row's count ``G_r - 1`` is stored at
    that width. ``matrix``/``row`` store an index per weight, ``block`` one per (row, column block of
    ``block_size``).
    """
    rows, cols = shape
    numel = rows * cols
    width = index_bits(max(group_counts))
    indexed = rows * GroupLayout(cols, block_size).count if structure == "block" else numel
    total = 8 * (packed_nbytes(numel, 1) + packed_nbytes(indexed, width)) + SCALE_BITS * sum(group_counts)
    if structure == "row" and width:
        total += 8 * packed_nbytes(rows, width)
    return total


def encode_dyngroup(
    signs: torch.Tensor,
    groups: torch.Tensor,
    scales: torch.Tensor,
    group_counts: list[int],
    structure: str,
    block_size: int | None = None,
) -> tuple[Stored, dict[str, Any]]:
    """``signs``: rows x cols; ``groups``: rows x cols (rows x column blocks for ``"block"``), the
    index into the matrix's or the row's scale list; ``scales``: all groups' scales, row after row
    for ``structure="row"``."""
    width = index_bits(max(group_counts))
    stored: Stored = {"signs": pack_codes(signs, 1)}
    if width:
        stored["groups"] = pack_codes(groups, width)
        if structure == "row":
            stored["group_counts"] = pack_codes(torch.tensor(group_counts) - 1, width)
    stored["scales"] = scales.to(SCALE_DTYPE).contiguous()
    meta: dict[str, Any] = {"structure": structure, "index_bits": width}
    if block_size is not None:
        meta["block_size"] = block_size
    return stored, meta


def decode_dyngroup(stored: Stored, meta: dict[str, Any], shape: tuple[int, int]) -> torch.Tensor:
    rows, cols = shape
    sign = signs_from_bits(_unpack_plane(stored["signs"], shape))
    width = meta["index_bits"]
    groups = torch.zeros(rows, cols, dtype=torch.int64)
    if meta["structure"] == "block":
        layout = GroupLayout(cols, meta["block_size"])
        if width:
            units = unpack_codes(stored["groups"], width, rows * layout.count).to(torch.int64).reshape(rows, layout.count)
            groups = units[:, layout.column_groups()]
    elif width:
        groups = unpack_codes(stored["groups"], width, rows * cols).to(torch.int64).reshape(rows, cols)
    if meta["structure"] == "row":
        counts = torch.ones(rows, dtype=torch.int64)
        if width:
            counts = unpack_codes(stored["group_counts"], width, rows).to(torch.int64) + 1
        offsets = torch.cumsum(counts, 0) - counts
        groups = groups + offsets[:, None]
    return sign * stored["scales"].float()[groups]


# ----------------------------------------------------------------------------- W(1+1)


def w1p1_storage_bits(shape: tuple[int, int], layout: GroupLayout) -> int:
    """Sign plane + membership plane + two fp16 scales per (row, group)."""
    rows, cols = shape
    return 8 * 2 * packed_nbytes(rows * cols, 1) + SCALE_BITS * 2 * rows * layout.count


def encode_w1p1(
    signs: torch.Tensor, members: torch.Tensor, scales: torch.Tensor, layout: GroupLayout
) -> tuple[Stored, dict[str, Any]]:
    """``signs``/``members``: rows x cols bits; ``scales``: rows x groups x 2 (slot = membership bit)."""
    stored = {
        "signs": pack_codes(signs, 1),
        "members": pack_codes(members, 1),
        "scales": scales.to(SCALE_DTYPE).contiguous(),
    }
    return stored, {"group_size": layout.group_size}


def decode_w1p1(stored: Stored, meta: dict[str, Any], shape: tuple[int, int]) -> torch.Tensor:
    rows, cols = shape
    sign = signs_from_bits(_unpack_plane(stored["signs"], shape))
    member = _unpack_plane(stored["members"], shape).to(torch.int64)
    scales = stored["scales"].float()[:, GroupLayout(cols, meta["group_size"]).column_groups()]  # rows x cols x 2
    return sign * torch.gather(scales, 2, member[..., None])[..., 0]


__all__ = [
    "BILLM",
    "DYNGROUP",
    "PBLLM",
    "W1P1",
    "billm_storage_bits",
    "decode_billm",
    "decode_dyngroup",
    "decode_pbllm",
    "decode_w1p1",
    "dyngroup_storage_bits",
    "encode_billm",
    "encode_dyngroup",
    "encode_pbllm",
    "encode_w1p1",
    "index_bits",
    "pack_wide",
    "pbllm_storage_bits",
    "sign_bits",
    "signs_from_bits",
    "to_scale",
    "unpack_wide",
    "w1p1_storage_bits",
]
