"""llama.cpp / GGUF constants bitalloc uses, in one module (as gguf-py keeps its own): presets,
type sets, fallbacks, defaults and cache versions. Type arithmetic lives in
:mod:`allocator.gguf.ggml_types`."""

from __future__ import annotations

FLOAT_GGUF_VERSION = 1

IMATRIX_VERSION = 1

GGML_PROFILE_VERSION = 1

PRESETS: tuple[str, ...] = (
    "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_1",
    "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M",
    "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "IQ4_NL", "IQ4_XS",
)
"""llama.cpp file types ``bitalloc export --preset`` accepts (``LLAMA_FTYPE_MOSTLY_<name>``)."""

IMATRIX_PRESETS = frozenset({"Q2_K_S", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS"})
"""Presets llama.cpp refuses to make without an importance matrix (some of their tensors need one)."""

IMATRIX_TYPES = frozenset({"iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs"})
"""Tensor types llama.cpp refuses to quantize to without an importance matrix."""

CODEBOOK_TYPES = frozenset({"iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s"})
"""llama.cpp types that quantize to lattice codebooks (grids of 8-weight points), not per-weight scalar levels."""

ROW_FALLBACK: dict[str, str] = {
    **dict.fromkeys(("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_xs"), "iq4_nl"),
    **dict.fromkeys(("q2_k", "q3_k", "tq1_0", "tq2_0"), "q4_0"),
    "q4_k": "q5_0",
    "q5_k": "q5_1",
    "q6_k": "q8_0",
}
"""llama.cpp's replacement for a 256-block type on rows whose length is not a multiple of 256
(llama-quant.cpp ``tensor_type_fallback``); a row that the replacement's block does not divide
either becomes f16."""

DEFAULT_EMBEDDING_TYPE = "q8_0"
"""Type of ``token_embd`` (and an untied ``output``) in bit-map exports; presets choose their own."""

DEFAULT_GGML_TYPES: tuple[str, ...] = ("iq2_xxs", "iq2_xs", "q2_k", "iq3_xxs", "q3_k", "iq4_nl", "q4_k", "q5_0", "q5_k", "q6_k", "q8_0")
"""Candidate types: the K- and IQ-types from 2 to 6.6 bpw (rows a multiple of 256), the 32-block
types llama.cpp falls back to on other rows (iq4_nl 4.5, q5_0 5.5, q8_0 8.5)."""

IMATRIX_SAMPLES = 32
"""Calibration windows of the importance matrix the types are quantized with (as ``bitalloc export`` makes it)."""

GGML_TYPES: dict[str, str] = {
    "1bit": "iq1_s",
    "2": "q2_k",
    "3": "q3_k",
    "4": "q4_k",
    "5": "q5_k",
    "6": "q6_k",
    "8": "q8_0",
    "16": "f16",
}
"""Option -> llama.cpp ggml type, by the option's code width: the 1-bit family
(a quantizer whose ``one_bit`` is set, or ``bits == 1``) -> ``iq1_s``; a uniform grid of ``bits`` -> the K-quant
of that width (8 -> ``q8_0``); float (:data:`allocator.table.options.FLOAT_QUANTIZERS`) -> ``f16``. The mapping is by width,
not by exact format: llama.cpp requantizes with its own block layout, and for rows that are not a
multiple of 256 (SmolLM2, Gemma3) it falls back to 32-block types and ignores the override."""

GGML_QUANTIZER = "ggml"
"""Quantizer name of GGUF-native options (:mod:`allocator.gguf.native_profile`): ``{"quantizer": "ggml", "type": "q3_k"}``."""

GGML_LOG_LEVEL_ERROR = 4
"""``enum ggml_log_level`` in ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5."""
