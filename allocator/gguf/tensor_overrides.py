"""A bit map as llama-quantize's per-tensor overrides (``--tensor-type PATTERN=TYPE``)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from allocator.gguf.ggml_types import ggml_type
from allocator.model.arch import gguf_tensor_name

if TYPE_CHECKING:
    from allocator.table.bitmap import BitMap


def llama_cpp_tensor_types(bitmap: BitMap) -> list[str]:
    """One ``PATTERN=TYPE`` override per module, e.g. ``blk\\.3\\.attn_q\\.weight=q3_k``.

    llama-quantize matches each pattern with ``std::regex_search`` against tensor names (last match
    wins), so the dots are escaped and the ``.weight`` suffix keeps ``blk.1`` from matching
    ``blk.10``. Pass each line after ``--tensor-type`` (:func:`llama_cpp_args`) or write them one per
    line to a ``--tensor-type-file``.
    """
    lines = []
    for module, entry in bitmap.modules.items():
        pattern = re.escape(gguf_tensor_name(module) + ".weight")
        lines.append(f"{pattern}={ggml_type(entry.settings)}")
    return lines

def llama_cpp_args(bitmap: BitMap) -> list[str]:
    """``["--tensor-type", "blk\\.0\\.attn_q\\.weight=q4_k", ...]`` for a llama-quantize argv."""
    args: list[str] = []
    for line in llama_cpp_tensor_types(bitmap):
        args += ["--tensor-type", line]
    return args
