"""Scale folding in GGUF coordinates: a :class:`~allocator.quantize.scalefold.ScaleFold` applied to the F32
reference GGUF, so llama.cpp quantizes the folded model.

A fold record names HF modules; each of its scale vectors ``s`` becomes, on GGUF tensors:

- every target linear (``attn_q/k/v``, ``attn_output``, ``ffn_gate/up``, ``ffn_down``): input
  columns multiplied by ``s``. llama.cpp's q/k tensors have their *rows* permuted for rotary
  (convert_hf_to_gguf); column scaling commutes with that, so no un-permuting is needed. For
  ``v -> o`` with grouped-query attention the ``attn_output`` columns take ``s`` repeated over the
  query heads of each kv head (:class:`~allocator.quantize.scalefold.HeadLayout`, from the GGUF's
  ``attention.head_count_kv``);
- a producer linear (``attn_v``, ``ffn_up``): rows divided by ``s`` (neither is permuted);
- a producer norm (``attn_norm``, ``ffn_norm``): divided by ``s``. A GGUF norm holds the norm's
  whole multiplier: ``w`` for llama, ``1 + w`` for Gemma (convert_hf_to_gguf adds the 1 and
  transformers' GGUF loader subtracts it), so ``multiplier / s`` is the folded norm for both.

Norm names come from gguf-py's own HF -> GGUF tensor map for the file's architecture.

The importance matrix of a folded linear is the reference one divided by ``s^2`` per column
(:meth:`GGUFFold.imatrix`): its inputs are the reference inputs divided by ``s``.

Sites whose consumers llama.cpp writes as a lattice-codebook type (:data:`CODEBOOK_TYPES`: iq1/iq2/iq3,
which snap groups of 8 weights to a fixed set of points under one block scale) are left unfolded
(:func:`without_codebook_sites`). The fold's alpha is scored with a scalar grid, and spreading column
magnitudes is what a codebook cannot follow: on SmolLM2, folding every site took IQ2_XXS's perplexity
from 23.77 to 47.57 (results/gguf_scalefold/smollm2-135m.all-sites.json; a diagnostic run traced it to
the up -> down sites feeding its iq2_xxs ``ffn_down``), while the scalar-type presets gained
(results/gguf_scalefold.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from allocator.errors import BitallocError
from allocator.gguf.constants import CODEBOOK_TYPES
from allocator.gguf.files import gguf_field, rewrite_gguf
from allocator.model.arch import gguf_tensor_name, is_block_linear
from allocator.quantize.scalefold import HeadLayout, ScaleFold


def without_codebook_sites(fold: ScaleFold, written: Mapping[str, str]) -> tuple[ScaleFold, int]:
    """``fold`` with every site left unfolded (``s = 1``) whose targets include a tensor that
    ``written`` (GGUF tensor -> type llama.cpp writes) puts in a :data:`CODEBOOK_TYPES` type; and
    how many folded sites that unfolded."""
    groups, dropped = [], 0
    for group in fold.groups:
        if group.alpha is not None and any(written.get(gguf_tensor_name(t) + ".weight") in CODEBOOK_TYPES for t in group.targets):
            groups.append(replace(group, alpha=None, scales=torch.ones_like(group.scales)))
            dropped += 1
        else:
            groups.append(group)
    return ScaleFold(fold.settings, groups), dropped


@dataclass
class GGUFFold:
    """Per GGUF tensor, the factors a scale fold puts on it (float64)."""

    column_scales: dict[str, np.ndarray] = field(default_factory=dict)
    """Tensor -> per input column factor (multiplied)."""
    row_divisors: dict[str, np.ndarray] = field(default_factory=dict)
    """Tensor -> per output row (a norm: per element) divisor."""

    @classmethod
    def from_record(cls, fold: ScaleFold, reader: Any) -> GGUFFold:
        """Map ``fold`` onto the tensors of the GGUF that ``reader`` (a ``gguf.GGUFReader``) reads."""
        import gguf

        arch_name = str(gguf_field(reader, "general.architecture"))
        arch = {name: enum for enum, name in gguf.MODEL_ARCH_NAMES.items()}.get(arch_name)
        if arch is None:
            raise BitallocError(f"gguf-py does not know the architecture {arch_name!r}")
        blocks = int(gguf_field(reader, f"{arch_name}.block_count"))
        names = gguf.get_tensor_name_map(arch, blocks)
        shapes = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}  # (rows, cols)
        plan = cls()
        for group in fold.groups:
            if group.alpha is None:  # the search kept s = 1
                continue
            scales = group.scales.double()
            if is_block_linear(group.source):
                producer = gguf_tensor_name(group.source) + ".weight"
            else:
                producer = names.get_name(group.source + ".weight", try_suffixes=(".weight",))
                if producer is None:
                    raise BitallocError(f"the scale fold names {group.source}, which this {arch_name} GGUF does not have (another model?)")
            plan._add(plan.row_divisors, producer, scales.numpy(), shapes, axis=0)
            for target in group.targets:
                tensor = gguf_tensor_name(target) + ".weight"
                columns = shapes.get(tensor, (0, 0))[-1]
                per_column = scales
                if group.source.endswith("v_proj") and columns != scales.numel():
                    # v -> o: each value row feeds one column per query head of its kv head
                    kv_heads = int(gguf_field(reader, f"{arch_name}.attention.head_count_kv"))
                    if columns % scales.numel() or scales.numel() % kv_heads:
                        raise BitallocError(f"scale fold: {scales.numel()} value scales do not fit {tensor}'s {columns} columns")
                    per_column = HeadLayout(kv_heads, columns // scales.numel(), scales.numel() // kv_heads).expand(scales)
                plan._add(plan.column_scales, tensor, per_column.numpy(), shapes, axis=1)
        return plan

    @staticmethod
    def _add(into: dict[str, np.ndarray], tensor: str, factors: np.ndarray, shapes: Mapping[str, tuple[int, ...]], axis: int) -> None:
        if tensor not in shapes:
            raise BitallocError(f"the scale fold names {tensor}, which this GGUF does not have (another model?)")
        shape = shapes[tensor]
        length = shape[axis] if len(shape) > 1 else shape[0]
        if factors.shape != (length,):
            raise BitallocError(f"scale fold: {factors.shape[0]} scales for {tensor} of shape {list(shape)}")
        if tensor in into:
            raise BitallocError(f"scale fold: {tensor} is scaled twice on the same axis")
        into[tensor] = factors

    @property
    def tensors(self) -> set[str]:
        """Every GGUF tensor the fold changes."""
        return set(self.column_scales) | set(self.row_divisors)

    def apply(self, name: str, array: np.ndarray) -> np.ndarray:
        """The folded float32 tensor ``name`` (``array``: rows x columns, or a 1-d norm)."""
        columns, rows = self.column_scales.get(name), self.row_divisors.get(name)
        if columns is None and rows is None:
            return array
        folded = array.astype(np.float64)
        if columns is not None:
            folded = folded * columns[None, :]
        if rows is not None:
            folded = folded / (rows[:, None] if folded.ndim == 2 else rows)
        return folded.astype(np.float32)

    def imatrix(self, imatrix: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The importance matrix of the folded model: a folded linear's inputs are the reference's / s."""
        out = {}
        for name, values in imatrix.items():
            scales = self.column_scales.get(name)
            out[name] = values if scales is None else (values.astype(np.float64) / scales**2).astype(np.float32)
        return out


def write_folded_gguf(source: Path, fold: ScaleFold, target: Path) -> GGUFFold:
    """Write the F32 GGUF ``source`` folded by ``fold`` to ``target`` (atomically); returns the mapping."""
    import gguf


    plan = GGUFFold.from_record(fold, gguf.GGUFReader(source))
    rewrite_gguf(source, target, plan.apply)
    return plan


__all__ = ["CODEBOOK_TYPES", "GGUFFold", "without_codebook_sites", "write_folded_gguf"]
