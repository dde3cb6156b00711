"""What bitalloc knows of model architectures, in one place: the decoder linears of a block and
what kind each is, which of them share an input (tie groups), the norm -> linear and linear ->
linear sites a scale fold can use, and the GGUF tensor name of each linear.

Names are HF's llama-family spelling (llama, mistral, qwen, gemma), which every supported model
uses; :data:`KIND_OF_LEAF` also reads other common spellings so features of other families are
still meaningful. GGUF names come from gguf-py's own tensor name map, not a copy of it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from allocator.errors import BitallocError

ATTENTION = "self_attn"
MLP = "mlp"

BLOCK_LINEARS: tuple[str, ...] = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
"""The quantizable linears of a llama-family decoder block, in execution order."""

KIND_OF_LEAF: dict[str, tuple[str, ...]] = {
    # llama / mistral / qwen / gemma naming
    "q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "o_proj": ("o",),
    "gate_proj": ("gate",), "up_proj": ("up",), "down_proj": ("down",),
    # fused projections (phi-3 style)
    "qkv_proj": ("q", "k", "v"), "gate_up_proj": ("gate", "up"),
    # other common spellings
    "wq": ("q",), "wk": ("k",), "wv": ("v",), "wo": ("o",),
    "query": ("q",), "key": ("k",), "value": ("v",), "dense": ("o",), "out_proj": ("o",),
    "w1": ("gate",), "w3": ("up",), "w2": ("down",),
    "fc1": ("up",), "fc2": ("down",),
}
"""Last component of a module name -> the kinds it stands for."""

TIED_LINEARS: dict[str, str] = {
    "q_proj": "qkv",
    "k_proj": "qkv",
    "v_proj": "qkv",
    "gate_proj": "gate_up",
    "up_proj": "gate_up",
    "w1": "gate_up",  # Mixtral-style expert naming: w1 = gate, w3 = up, w2 = down
    "w3": "gate_up",
}
"""Last name component -> the fused group it belongs to within its parent module."""


def module_kinds(name: str) -> tuple[str, ...]:
    """Kinds of a module by its qualified name (``...self_attn.q_proj`` -> ``("q",)``); ``()`` if unknown."""
    return KIND_OF_LEAF.get(name.rpartition(".")[2], ())


def tie_groups(names: Sequence[str], tied: Mapping[str, str] = TIED_LINEARS) -> np.ndarray:
    """Tie-group id of every layer: layers under the same parent whose last name component falls in
    the same class of ``tied`` share an id (``...3.self_attn.{q,k,v}_proj``; ``...3.mlp.{gate,up}_proj``);
    every other layer gets an id of its own. Ids are 0, 1, ... in order of first appearance."""
    ids: dict[tuple[str, str], int] = {}
    out = np.empty(len(names), dtype=np.int64)
    for i, name in enumerate(names):
        parent, _, leaf = name.rpartition(".")
        key = (parent, tied[leaf]) if leaf in tied else ("", name)
        out[i] = ids.setdefault(key, len(ids))
    return out


# -- scale-fold sites -----------------------------------------------------------------------


@dataclass(frozen=True)
class FoldSiteNames:
    """Where a block's fold sites are: the norm before attention and its q/k/v, the v -> o pair, the
    norm before the MLP (Gemma3 has a pre-feedforward norm, llama uses the post-attention one) and its
    gate/up, and the up -> down pair."""

    attention_norm: str = "input_layernorm"
    qkv: tuple[str, str, str] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    value: str = "self_attn.v_proj"
    output: str = "self_attn.o_proj"
    value_norm: str = "self_attn.v_norm"
    """A norm on v (Gemma3n-style) makes v -> o inexact; such blocks skip that site."""
    mlp_norms: tuple[str, ...] = ("pre_feedforward_layernorm", "post_attention_layernorm")
    """Candidates, first present wins."""
    gate_up: tuple[str, str] = ("mlp.gate_proj", "mlp.up_proj")
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"


FOLD_SITES = FoldSiteNames()


# -- GGUF tensor names ----------------------------------------------------------------------

_BLOCK_MODULE = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.+)$")


def _gguf_linear_names() -> dict[str, str]:
    """Block-local HF linear name -> GGUF tensor name, from gguf-py's map for llama (the same for
    every supported family; tests check gemma3's map agrees)."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 1)
    out: dict[str, str] = {}
    for local in BLOCK_LINEARS:
        mapped = names.get_name(f"model.layers.0.{local}")
        if mapped is None:  # pragma: no cover - gguf-py always maps the llama linears
            raise BitallocError(f"gguf-py has no tensor name for {local}")
        out[local] = mapped.removeprefix("blk.0.")
    return out


GGUF_TENSOR_NAMES: dict[str, str] = _gguf_linear_names()
"""Module path inside a decoder block (HF llama/qwen/gemma naming) -> GGUF tensor name."""


def gguf_tensor_name(module: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q``."""
    match = _BLOCK_MODULE.match(module)
    if not match or match.group(2) not in GGUF_TENSOR_NAMES:
        raise BitallocError(f"no GGUF tensor name for module {module}")
    return f"blk.{match.group(1)}.{GGUF_TENSOR_NAMES[match.group(2)]}"


def is_block_linear(module: str) -> bool:
    """Whether ``module`` names one of a block's linears (any prefix)."""
    return any(module.endswith("." + local) for local in GGUF_TENSOR_NAMES)
