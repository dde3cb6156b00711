"""The kernel layout of a uniform-grid weight: what :mod:`quantizers.kernels` computes with.

The stored form (:data:`quantizers.formats.UNIFORM_GRID`) is one bit stream of codes for the whole
matrix, which is compact but has rows and groups starting at arbitrary bit offsets. The kernels
want every (row, group) to start on a byte boundary and 8 consecutive columns to unpack into one
SIMD vector, so a weight is converted once, at load time, into:

``codes`` (uint8, rows x row_bytes)
    Each row is its groups in order; each group is ``ceil(len / 32)`` *chunks* of 32 consecutive
    columns (the last chunk of a group whose length is not a multiple of 32 is padded with code 0).
    A chunk takes ``4 * bits`` bytes. Its element ``e`` is split as ``e = 8 * s + l`` (slot ``s``
    in 0..3, lane ``l`` in 0..7) and placed so that slot ``s`` unpacks to the 8 lanes of a vector
    holding columns ``8s .. 8s+7``:

    ====  =====  ==============================================================
    bits  bytes  where element ``8s + l`` lives
    ====  =====  ==============================================================
    4     16     byte ``l + 8 * (s & 1)``, nibble ``s >> 1``
    2     8      byte ``l``, bits ``2s .. 2s+1``
    1     4      byte ``e % 4``, bit ``e // 4`` (``e = 8s + l``: a word broadcast to every
                 lane puts element ``e``'s byte at vector byte ``e``)
    3     12     chunks pair up inside a group (below); a group's odd last chunk is *single*:
                 the 2-bit chunk of ``q & 3``, then the 1-bit chunk of ``q >> 2``
    8     32     byte ``8s + l`` (column order)
    ====  =====  ==============================================================

    3-bit chunks ``2i`` and ``2i + 1`` of a group (``A`` and ``B``) share 24 bytes: first 16 bytes of
    nibbles, nibble ``e`` (byte ``e % 16``, low nibble for ``e < 16``) = ``A[e] | (B[e] >> 2) << 3``,
    then the 2-bit chunk of ``B & 3``. One shift and mask give ``A``'s 32 codes, as for 4 bits, and
    the spare nibble bit is ``B``'s high bit, so a pair decodes in 7 vector operations where two single
    chunks take 12. So 3-bit weights cost exactly 3 bits each, like the stored form.
    8 bits serve the LM head, whose fp32 product is the largest single read of a decode step
    (:mod:`allocator.quantize.head`), and any 8-bit uniform-grid layer.

``params`` (float16, rows x groups x 2)
    ``(scale, zero)`` per (row, group). The zero is an integer code (or 1/2 for the symmetric
    1-bit grid), exact in float16, so ``(q - zero) * scale`` in float32 reproduces the stored
    form's dequantized weight bit for bit.

1-bit weights whose rows are a multiple of 32 also get :func:`lut_tiles`, the same codes and pairs
arranged 32 rows side by side for the lookup-table GEMV of the int8 decode path.

Only groups that are not a multiple of 32 columns cost padding; SmolLM2's and Gemma3's shapes
with group sizes 32/64/128 have none. The conversion is exact both ways
(:meth:`KernelWeight.to_quantized` rebuilds the stored tensors byte for byte).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from quantizers.base import GroupLayout, QuantizedTensor
from quantizers.formats import UNIFORM_GRID, encode_uniform_grid
from quantizers.grid import SCALE_DTYPE, GridSpec
from quantizers.packing import unpack_codes

CHUNK = 32
"""Columns per chunk: 4 slots of one 8-lane float vector."""
KERNEL_BITS = (1, 2, 3, 4, 8)
ACTIVATION_BLOCK_CHUNKS = 4
"""Chunks (128 columns) per int8 activation block of the decode GEMV, inside one group; ``BQ_ACT_BLOCK``
in lowbit.c."""
SINGLE, PAIR_FIRST, PAIR_SECOND = 0, 1, 2
"""Roles of a 3-bit chunk (:attr:`ChunkGeometry.pair_roles`); ``pair_role`` in lowbit.c."""


@dataclass(frozen=True)
class ChunkGeometry:
    """Where each column of a row lives in the chunk layout (the same for every row)."""

    cols: int
    group_size: int | None
    bits: int

    def __post_init__(self) -> None:
        if self.bits not in KERNEL_BITS:
            raise ValueError(f"the kernel layout holds 1-4 or 8 bit codes, not {self.bits}")
        if self.cols <= 0:
            raise ValueError(f"in_features must be positive, got {self.cols}")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or None, got {self.group_size}")

    @property
    def size(self) -> int:
        """Columns per group (all but possibly the last)."""
        return self.cols if self.group_size is None else min(self.group_size, self.cols)

    @property
    def groups(self) -> int:
        return -(-self.cols // self.size)

    @property
    def last_len(self) -> int:
        return self.cols - (self.groups - 1) * self.size

    @property
    def chunks_full(self) -> int:
        return -(-self.size // CHUNK)

    @property
    def chunks(self) -> int:
        """Chunks per row."""
        return (self.groups - 1) * self.chunks_full + -(-self.last_len // CHUNK)

    @property
    def chunk_bytes(self) -> int:
        return 4 * self.bits

    @property
    def row_bytes(self) -> int:
        return self.chunks * self.chunk_bytes

    @property
    def padded_cols(self) -> int:
        return self.chunks * CHUNK

    @property
    def kernel_group_size(self) -> int:
        """The group size argument of the C kernels (0 = one group per row)."""
        return 0 if self.group_size is None else self.group_size

    @property
    def group_chunks(self) -> list[int]:
        """Chunks in each group of a row (all ``chunks_full`` but possibly the last)."""
        return [self.chunks_full] * (self.groups - 1) + [self.chunks - (self.groups - 1) * self.chunks_full]

    @cached_property
    def activation_blocks(self) -> np.ndarray:
        """The int8 activation block of every chunk of a row: a group's chunks taken
        :data:`ACTIVATION_BLOCK_CHUNKS` at a time (the C kernels' ``BQ_ACT_BLOCK``), numbered in order."""
        blocks, first = [], 0
        for count in self.group_chunks:
            per_group = np.arange(count) // ACTIVATION_BLOCK_CHUNKS
            blocks.append(first + per_group)
            first += int(per_group[-1]) + 1
        return np.concatenate(blocks)

    @cached_property
    def pair_roles(self) -> np.ndarray:
        """Per chunk of a row, its part in a 3-bit pair (module docstring): :data:`SINGLE`,
        :data:`PAIR_FIRST` or :data:`PAIR_SECOND`; chunks pair up inside each group."""
        roles = []
        for count in self.group_chunks:
            c = np.arange(count)
            roles.append(np.where((c | 1) < count, PAIR_FIRST + (c & 1), SINGLE))
        return np.concatenate(roles)

    @cached_property
    def column_positions(self) -> np.ndarray:
        """Position of every real column in the padded row of ``chunks * 32`` columns."""
        cols = np.arange(self.cols)
        return (cols // self.size) * (self.chunks_full * CHUNK) + cols % self.size


def pack_chunks(codes: np.ndarray, geometry: ChunkGeometry) -> np.ndarray:
    """Codes (rows x cols, values < 2**bits) -> the kernel layout (uint8, rows x row_bytes)."""
    rows = codes.shape[0]
    padded = np.zeros((rows, geometry.padded_cols), dtype=np.uint8)
    padded[:, geometry.column_positions] = codes
    slots = padded.reshape(rows, geometry.chunks, 4, 8)  # [row, chunk, slot s, lane l]
    if geometry.bits == 3:
        chunk = np.concatenate([_pack_slots(slots & 3, 2), _pack_slots(slots >> 2, 1)], axis=-1)
        first = np.flatnonzero(geometry.pair_roles == PAIR_FIRST)
        by_chunk = padded.reshape(rows, geometry.chunks, CHUNK)
        a, b = by_chunk[:, first], by_chunk[:, first + 1]
        nibbles = (a & 7) | ((b >> 2) << 3)
        pair = np.concatenate([nibbles[..., :16] | (nibbles[..., 16:] << 4), _pack_slots(slots[:, first + 1] & 3, 2)], axis=-1)
        chunk[:, first] = pair[..., :12]
        chunk[:, first + 1] = pair[..., 12:]
    else:
        chunk = _pack_slots(slots, geometry.bits)
    return np.ascontiguousarray(chunk.reshape(rows, geometry.row_bytes))


def unpack_chunks(packed: np.ndarray, geometry: ChunkGeometry) -> np.ndarray:
    """Inverse of :func:`pack_chunks`: codes (uint8, rows x cols)."""
    return np.ascontiguousarray(_padded_codes(packed, geometry)[:, geometry.column_positions])


def _padded_codes(packed: np.ndarray, geometry: ChunkGeometry) -> np.ndarray:
    """Codes of the padded rows (uint8, rows x padded_cols; pads hold code 0)."""
    rows = packed.shape[0]
    chunk = packed.reshape(rows, geometry.chunks, geometry.chunk_bytes)
    if geometry.bits == 3:
        slots = _unpack_slots(chunk[..., :8], 2) | (_unpack_slots(chunk[..., 8:], 1) << 2)
        first = np.flatnonzero(geometry.pair_roles == PAIR_FIRST)
        pair = np.concatenate([chunk[:, first], chunk[:, first + 1]], axis=-1)  # 24 bytes
        nibbles = np.concatenate([pair[..., :16] & 15, pair[..., :16] >> 4], axis=-1)  # [row, pair, element]
        slots[:, first] = (nibbles & 7).reshape(rows, -1, 4, 8)
        slots[:, first + 1] = _unpack_slots(pair[..., 16:], 2) | ((nibbles >> 3) << 2).reshape(rows, -1, 4, 8)
    else:
        slots = _unpack_slots(chunk, geometry.bits)
    return slots.reshape(rows, geometry.padded_cols)


def _pack_slots(slots: np.ndarray, bits: int) -> np.ndarray:
    """[..., 4 slots, 8 lanes] codes -> [..., 4 * bits] bytes of one chunk (bits 1, 2, 4 or 8)."""
    s = slots.astype(np.uint8)
    if bits == 8:
        return s.reshape(*s.shape[:-2], 32)
    if bits == 4:
        return np.concatenate([s[..., 0, :] | (s[..., 2, :] << 4), s[..., 1, :] | (s[..., 3, :] << 4)], axis=-1)
    if bits == 2:
        return s[..., 0, :] | (s[..., 1, :] << 2) | (s[..., 2, :] << 4) | (s[..., 3, :] << 6)
    elements = s.reshape(*s.shape[:-2], 8, 4)  # element e = 4 * i + j -> [i, j]: byte j, bit i
    bit = (1 << np.arange(8, dtype=np.uint8))[:, None]
    return (elements * bit).sum(axis=-2, dtype=np.uint8)


def _unpack_slots(chunk: np.ndarray, bits: int) -> np.ndarray:
    """[..., 4 * bits] bytes of one chunk -> [..., 4 slots, 8 lanes] codes (bits 1, 2, 4 or 8)."""
    if bits == 8:
        return chunk.reshape(*chunk.shape[:-1], 4, 8)
    if bits == 4:
        lo, hi = chunk[..., :8], chunk[..., 8:]
        return np.stack([lo & 15, hi & 15, lo >> 4, hi >> 4], axis=-2)
    if bits == 2:
        return np.stack([(chunk >> (2 * s)) & 3 for s in range(4)], axis=-2)
    elements = (chunk[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # [bit i, byte j] = element 4i + j
    return elements.reshape(*chunk.shape[:-1], 4, 8)


@dataclass
class KernelWeight:
    """A uniform-grid weight in the kernel layout (module docstring) plus what reads it."""

    codes: torch.Tensor
    """uint8, out_features x row_bytes."""
    params: torch.Tensor
    """float16, out_features x groups x 2: (scale, zero) per (row, group)."""
    shape: tuple[int, int]
    bits: int
    group_size: int | None
    symmetric: bool

    @property
    def geometry(self) -> ChunkGeometry:
        return ChunkGeometry(self.shape[1], self.group_size, self.bits)

    @property
    def nbytes(self) -> int:
        """Bytes the kernels read per product: codes plus (scale, zero) pairs."""
        return self.codes.numel() * self.codes.element_size() + self.params.numel() * self.params.element_size()

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor) -> KernelWeight:
        """Convert a stored uniform-grid tensor (1-4 or 8 bits) into the kernel layout."""
        if qt.format != UNIFORM_GRID:
            raise ValueError(f"the kernels run the {UNIFORM_GRID!r} format, not {qt.format!r}")
        rows, cols = qt.shape
        spec = GridSpec(int(qt.meta["bits"]), bool(qt.meta["symmetric"]))
        expected = {"codes", "scales"} if spec.symmetric else {"codes", "scales", "zeros"}
        if set(qt.stored) != expected:  # e.g. a future variant with a column permutation: not this layout
            raise ValueError(f"uniform-grid tensor with stored {sorted(qt.stored)}, the kernels read {sorted(expected)}")
        geometry = ChunkGeometry(cols, qt.meta["group_size"], spec.bits)
        codes = unpack_codes(qt.stored["codes"], spec.bits, rows * cols).reshape(rows, cols).numpy()
        scales = qt.stored["scales"].reshape(rows, geometry.groups).to(SCALE_DTYPE)
        if spec.symmetric:
            zeros = torch.full_like(scales, spec.symmetric_zero())
        else:
            zeros = unpack_codes(qt.stored["zeros"], spec.bits, rows * geometry.groups).reshape(rows, geometry.groups).to(SCALE_DTYPE)
        return cls(
            codes=torch.from_numpy(pack_chunks(codes, geometry)),
            params=torch.stack([scales, zeros], dim=-1).contiguous(),
            shape=(rows, cols),
            bits=spec.bits,
            group_size=qt.meta["group_size"],
            symmetric=spec.symmetric,
        )

    def unpacked_codes(self) -> torch.Tensor:
        """The integer codes (uint8, rows x cols)."""
        return torch.from_numpy(unpack_chunks(self.codes.numpy(), self.geometry))

    def to_quantized(self) -> QuantizedTensor:
        """Back to the stored form, byte for byte what :meth:`from_quantized` was given."""
        spec = GridSpec(self.bits, self.symmetric)
        layout = GroupLayout(self.shape[1], self.group_size)
        scales = self.params[..., 0].float()
        zeros = self.params[..., 1].float()
        return encode_uniform_grid(self.unpacked_codes(), scales, zeros, spec, layout)


LUT_TILE_ROWS = 32
"""Rows per LUT tile of the 1-bit int8 GEMV (two 16-byte pshufb lanes)."""


def lut_tiles(weight: KernelWeight) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A 1-bit weight's codes and (scale, zero) pairs as the LUT tiles of the int8 GEMV (lowbit.c), or
    None when the weight is not 1-bit or its rows are not a multiple of :data:`LUT_TILE_ROWS`.

    Tile ``t`` holds rows ``32t .. 32t+31``. Codes (uint8, tiles x pairs x 32): for each pair ``p`` of
    quads (8 padded columns), byte ``j`` is row ``j`` with the 4-bit index of quad ``2p`` in its low nibble
    and of quad ``2p+1`` in its high nibble (bit ``i`` of an index = the code of the quad's column
    ``i``). Pairs (float16, tiles x groups x 2 x 32): per group the 32 rows' scales, then their zeros.
    The same bytes as the chunk layout, arranged so that one pshufb looks up 32 rows at once; the
    decode path keeps them beside the chunk layout, which prefill and the float GEMV read.
    """
    rows = weight.shape[0]
    if weight.bits != 1 or rows % LUT_TILE_ROWS:
        return None
    geometry = weight.geometry
    codes = _padded_codes(weight.codes.numpy(), geometry).reshape(rows, -1, 4)
    index = (codes << np.arange(4, dtype=np.uint8)).sum(axis=-1, dtype=np.uint8)  # rows x quads
    pairs = index[:, 0::2] | (index[:, 1::2] << 4)  # rows x pairs
    tiles = rows // LUT_TILE_ROWS
    tile_codes = np.ascontiguousarray(pairs.reshape(tiles, LUT_TILE_ROWS, -1).transpose(0, 2, 1))
    tile_params = weight.params.reshape(tiles, LUT_TILE_ROWS, geometry.groups, 2).permute(0, 2, 3, 1).contiguous()
    return torch.from_numpy(tile_codes), tile_params


def dequantize_reference(weight: KernelWeight) -> torch.Tensor:
    """The float32 weight from the kernel layout in plain torch: ``(q - zero) * scale``.

    The same arithmetic as :func:`quantizers.formats.decode_uniform_grid`, so it matches the
    simulated model's weight exactly; it is the reference the C kernels are tested against.
    """
    layout = GroupLayout(weight.shape[1], weight.group_size)
    columns = layout.column_groups()
    scales = weight.params[..., 0].float()[:, columns]
    zeros = weight.params[..., 1].float()[:, columns]
    return (weight.unpacked_codes().float() - zeros) * scales
