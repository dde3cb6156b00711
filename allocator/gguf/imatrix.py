"""Importance matrices for llama.cpp's quantizer: per input column mean of x^2 of each decoder
linear's calibration inputs, computed once and cached, and the rule for when a file needs one."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from allocator.gguf.constants import IMATRIX_PRESETS, IMATRIX_TYPES, IMATRIX_VERSION
from allocator.model.arch import gguf_tensor_name
from allocator.storage import atomic_path, cache_dir

if TYPE_CHECKING:
    import torch

    from allocator.gguf.export import TensorPlan
    from allocator.model.loading import LoadedModel
    from allocator.table.bitmap import BitMap

log = logging.getLogger(__name__)


def needs_imatrix(preset: str | None = None, bitmap: BitMap | None = None, plan: Mapping[str, TensorPlan] | None = None) -> bool:
    """Whether llama.cpp needs (or bitalloc's measurement assumed) an importance matrix: a preset that
    llama.cpp refuses to make without one, a bit map whose plan writes a type that needs one, or a
    GGUF-native bit map (its options were measured on files made with the importance matrix)."""
    from allocator.gguf.ggml_types import is_ggml_native

    if preset is not None:
        return preset.upper() in IMATRIX_PRESETS
    if plan is not None and any(p.written in IMATRIX_TYPES for p in plan.values()):
        return True
    return bitmap is not None and is_ggml_native(bitmap)


def compute_imatrix(loaded: LoadedModel, samples: torch.Tensor, batch_size: int = 4) -> dict[str, np.ndarray]:
    """GGUF tensor name -> per input column mean of x^2 over every calibration token that enters
    that decoder linear (float32), from one forward pass of the float model over ``samples``."""
    import torch

    from allocator.model.layers import quantizable_linears

    linears = quantizable_linears(loaded.model)
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in linears.items()}
    rows = dict.fromkeys(linears, 0)

    def hook_for(name: str):
        def hook(_module: Any, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] += (x * x).sum(dim=0).double()
            rows[name] += x.shape[0]

        return hook

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in linears.items()]
    try:
        with torch.inference_mode():
            for batch in samples.split(batch_size):
                loaded.model(batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {gguf_tensor_name(name) + ".weight": (sums[name] / max(rows[name], 1)).float().numpy() for name in linears}

def cached_imatrix(model: str, loaded: LoadedModel, corpus_name: str, samples: int, seqlen: int, seed: int = 0) -> dict[str, np.ndarray]:
    """:func:`compute_imatrix` on ``samples`` seeded calibration windows, cached as ``.npz``."""
    from allocator.measure.profile import model_fingerprint
    from allocator.model.corpus import load_corpus
    from allocator.model.tokens import calibration_samples

    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(model).stem if model.endswith(".gguf") else model)
    key = f"{safe}-{model_fingerprint(loaded.model)[:12]}-{corpus_name}-{samples}x{seqlen}-s{seed}-v{IMATRIX_VERSION}"
    path = cache_dir("imatrix") / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', key)}.npz"
    if path.is_file():
        with np.load(path) as data:
            return {name: data[name] for name in data.files}
    corpus = load_corpus(corpus_name)
    windows = calibration_samples(loaded.tokenizer, corpus.calibration, samples, seqlen, loaded.add_bos, seed)
    log.info("importance matrix: %d x %d calibration tokens (cached at %s)", samples, seqlen, path)
    matrix = compute_imatrix(loaded, windows)
    with atomic_path(path) as tmp:
        with tmp.open("wb") as handle:
            np.savez(handle, **matrix)
    return matrix
