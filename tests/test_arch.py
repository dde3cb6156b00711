"""allocator.model.arch: the one place that knows module names, tie groups and GGUF names."""

from __future__ import annotations

import gguf

from allocator.model.arch import BLOCK_LINEARS, GGUF_TENSOR_NAMES, gguf_tensor_name, is_block_linear, module_kinds, tie_groups


def test_gguf_names_come_from_gguf_py_and_agree_across_families() -> None:
    for arch in (gguf.MODEL_ARCH.LLAMA, gguf.MODEL_ARCH.GEMMA3, gguf.MODEL_ARCH.QWEN2):
        names = gguf.get_tensor_name_map(arch, 4)
        for local in BLOCK_LINEARS:
            assert names.get_name(f"model.layers.3.{local}") == gguf_tensor_name(f"model.layers.3.{local}")
    assert GGUF_TENSOR_NAMES["self_attn.o_proj"] == "attn_output"


def test_block_linears_kinds_and_ties() -> None:
    names = [f"model.layers.0.{local}" for local in BLOCK_LINEARS]
    assert [module_kinds(n) for n in names] == [("q",), ("k",), ("v",), ("o",), ("gate",), ("up",), ("down",)]
    assert tie_groups(names).tolist() == [0, 0, 0, 1, 2, 2, 3]
    assert all(is_block_linear(n) for n in names) and not is_block_linear("model.layers.0.input_layernorm")
