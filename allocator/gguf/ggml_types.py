"""ggml tensor types: their block sizes and bits, the type llama.cpp really writes on a given row
length, which type an option maps to, and checks of user-given type names."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from allocator.errors import BitallocError
from allocator.gguf.constants import GGML_QUANTIZER, GGML_TYPES, ROW_FALLBACK
from allocator.table.options import FLOAT_QUANTIZERS, is_one_bit

if TYPE_CHECKING:
    from allocator.table.bitmap import BitMap


def quant_type(name: str):  # -> gguf.GGMLQuantizationType
    import gguf

    try:
        return gguf.GGMLQuantizationType[name.upper()]
    except KeyError:
        raise BitallocError(f"unknown ggml type {name!r}") from None

def block_size(name: str) -> int:
    """Weights per block of the ggml type ``name``: rows must be a multiple of it."""
    import gguf

    return int(gguf.GGML_QUANT_SIZES[quant_type(name)][0])

def type_bpw(name: str) -> float:
    """Stored bits per weight of ggml type ``name`` (block bytes x 8 / block size)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[quant_type(name)]
    return size * 8 / block

def effective_type(requested: str, row_length: int) -> str:
    """The type llama.cpp really writes for ``requested`` on rows of ``row_length`` weights."""
    import gguf

    requested = requested.lower()
    block = gguf.GGML_QUANT_SIZES[quant_type(requested)][0]
    if row_length % block == 0:
        return requested
    fallback = ROW_FALLBACK.get(requested, requested)
    if row_length % gguf.GGML_QUANT_SIZES[quant_type(fallback)][0] != 0:
        return "f16"
    return fallback

def type_fits(type_name: str, row_length: int) -> bool:
    """Whether llama.cpp can store rows of ``row_length`` in ``type_name`` blocks."""
    return row_length % block_size(type_name) == 0

def check_ggml_types(types: Sequence[str]) -> list[str]:
    """Lower-cased, de-duplicated ``types``; an unknown or unsized type is a :class:`BitallocError`."""
    import gguf

    known = {q.name.lower() for q in gguf.GGMLQuantizationType if q in gguf.GGML_QUANT_SIZES}
    out: list[str] = []
    for name in types:
        lowered = name.lower()
        if lowered not in known or lowered in ("f32", "f64", "i8", "i16", "i32", "i64"):
            raise BitallocError(f"unknown llama.cpp tensor type {name!r}")
        if lowered not in out:
            out.append(lowered)
    return out

def is_ggml_native(bitmap: BitMap) -> bool:
    """Whether ``bitmap`` names llama.cpp types (a GGUF-native map) rather than bitalloc quantizers."""
    return any(e.settings.get("quantizer") == GGML_QUANTIZER for e in bitmap.modules.values())

def ggml_type(settings: Mapping[str, Any]) -> str:
    """The llama.cpp type for an option (see :data:`GGML_TYPES`)."""
    quantizer = str(settings.get("quantizer", ""))
    if quantizer == GGML_QUANTIZER:  # a GGUF-native option names its type
        return str(settings["type"])
    bits = settings.get("bits")
    if is_one_bit(quantizer) or bits == 1:
        return GGML_TYPES["1bit"]
    if quantizer in FLOAT_QUANTIZERS and bits in (None, 16):
        return GGML_TYPES["16"]
    if str(bits) not in GGML_TYPES:
        raise BitallocError(f"no llama.cpp type for option settings {dict(settings)}")
    return GGML_TYPES[str(bits)]
