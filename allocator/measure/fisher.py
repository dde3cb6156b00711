"""Fisher diagonals of every quantizable linear weight, from one gradient pass over calibration windows.

Why they price quantization in KL units: around the reference weights θ, the mean per-token
KL(reference || model) of a small weight change δ is, to second order,

    KL(δ) = 1/N Σ_t KL(p_θ(.|x_<t) || p_θ+δ(.|x_<t)) ≈ ½ δᵀ F̄ δ,   F̄ = 1/N Σ_t F_t,
    F_t = E_{y ~ p_θ(.|x_<t)} [∇ log p_θ(y|x_<t) ∇ log p_θ(y|x_<t)ᵀ],

with t running over the N predicted positions of the windows (every position but each window's last,
as :mod:`allocator.evaluate.perplexity` and :class:`allocator.measure.profile.KLProbe` count them). So
``½ Σ diag(F̄) ⊙ δ²`` is in the units of bitalloc's mean per-token KL, additive over layers (the
off-diagonal terms, between weights and between layers, are dropped). This module computes diag(F̄),
the Fisher of the per-token average, for every weight of :func:`allocator.model.layers.quantizable_linears`.

The estimator: per window, one forward and one backward of the summed NLL of labels ``y_t`` drawn from
the reference's own predictive distribution at every position (a torch.Generator seeded per window).
Its gradient ``G = Σ_t ∇ log p(y_t|x_<t)`` has ``E[G ⊙ G] = Σ_t diag(F_t)``: the inputs are the fixed
text, each ``y_t`` is drawn independently, and a score has mean zero under its own distribution, so the
cross terms between positions vanish in expectation. Hence ``diag(F̄) ≈ Σ_windows G ⊙ G / N`` with one
backward per window, not per token: the "sampled" (true) Fisher, :data:`SAMPLED`.

The "empirical" variant (:data:`EMPIRICAL`) takes the text's own next tokens as labels, same
normalization. Its cross terms do not vanish (the text's scores need not have mean zero), so it is the
squared window gradient that gradient-based allocators score with, in KL units only as far as the text
resembles the model's own samples. The variants share each window's forward; each costs one backward.

Chunks: the windows run in chunks of :data:`allocator.measure.fisher_gradients.CHUNK_WINDOWS`, each summed
from zero and added to the total in chunk order, so a chunk can run anywhere (here, or on a Ray worker with
``ray=``: :mod:`allocator.measure.distributed_fisher`) and the float sums come out the same.

Memory: only the linear weights require grad; a post-accumulate hook adds each weight's squared
gradient into its chunk's float32 accumulator and frees the gradient at once. Windows run one at a time
(batch 1), so the peak is about

    model + 2 x V x (linear weights, float32) accumulators (the total and the chunk's) + the largest linear's gradient
    + one window's autograd graph (each block's saved activations, ~seqlen x (a few x hidden + intermediate
      + heads x seqlen) floats per block, and ~3 x seqlen x vocab floats of logits, softmax and NLL),

with V the number of variants; writing the cache adds one variant's bytes while a file is serialized. On
SmolLM2-135M (fp32 model 0.54 GB, 0.42 GB of linear weights) with both variants on 256-token windows the
process peaked at 2.6 GB before chunks (one set of accumulators; chunks add 0.84 GB).

Cache and resume: each variant's diagonals are one safetensors file under ``$BITALLOC_CACHE/fisher``,
keyed by the model's fingerprint (:func:`allocator.measure.profile.model_fingerprint`), corpus, windows,
seqlen, label seed, a digest of the token ids and the variant. While a pass runs, its float32 sums and
window count are saved after every chunk; a rerun continues from there and, since
the labels of window ``i`` depend only on ``(seed, i)`` and the sums are restored exactly, ends with the
same bytes as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from allocator.errors import BitallocError
from allocator.measure.distributed import RaySettings
from allocator.measure.fisher_gradients import CHUNK_WINDOWS, VARIANTS, Sums, add_sums, chunk_starts, chunk_sums, zero_sums
from allocator.measure.profile import model_fingerprint
from allocator.model.layers import quantizable_linears
from allocator.storage import atomic_path, cache_dir

log = logging.getLogger(__name__)

FISHER_VERSION = 2
"""Bump when what a pass computes changes (invalidates cached diagonals). 2: sums added chunk by chunk."""
FISHER_CACHE = "fisher"


@dataclass
class FisherDiagonal:
    """One variant's diag(F̄) (layer name -> float32 tensor shaped like its weight) and how it was made."""

    variant: str
    diagonal: dict[str, torch.Tensor]
    windows: int
    tokens: int
    """Predicted positions the Fisher is averaged over (``N`` in the module doc)."""
    seconds: float
    """Wall seconds of the pass that made it (shared by the variants computed together; summed over resumed sessions)."""
    forward_passes: int
    backward_passes: int
    """Of the whole pass (one backward per variant per window)."""
    key: dict[str, Any] = field(default_factory=dict)

    def info(self) -> dict[str, Any]:
        """JSON-able description (no tensors)."""
        return {"variant": self.variant, "windows": self.windows, "tokens": self.tokens, "seconds": self.seconds,
                "forward_passes": self.forward_passes, "backward_passes": self.backward_passes}


# ----------------------------------------------------------------------------- the gradient pass


@dataclass
class _PassState:
    """The running sums of a pass: what a checkpoint holds."""

    sums: Sums
    windows_done: int = 0
    tokens: int = 0
    seconds: float = 0.0


def _save_state(path: Path, state: _PassState, key: Mapping[str, Any]) -> None:
    tensors = {f"{variant}/{name}": tensor for variant, sums in state.sums.items() for name, tensor in sums.items()}
    header = {"key": dict(key), "windows_done": state.windows_done, "tokens": state.tokens, "seconds": state.seconds}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"state": json.dumps(header, sort_keys=True)})


def _load_state(path: Path, state: _PassState, key: Mapping[str, Any]) -> bool:
    """Fill ``state`` from the checkpoint at ``path`` if it was made for ``key`` and the same shapes."""
    try:
        saved = json.loads(_metadata(path).get("state", "{}"))
        if saved.get("key") != json.loads(json.dumps(dict(key))):
            log.warning("ignoring the Fisher checkpoint %s: made for other settings", path)
            return False
        tensors = load_file(str(path))
    except (OSError, ValueError, SafetensorError) as exc:
        log.warning("ignoring the unreadable Fisher checkpoint %s: %s", path, exc)
        return False
    for variant, sums in state.sums.items():
        for name, tensor in sums.items():
            loaded = tensors.get(f"{variant}/{name}")
            if loaded is None or loaded.shape != tensor.shape or loaded.dtype != tensor.dtype:
                log.warning("ignoring the Fisher checkpoint %s: it lacks %s/%s", path, variant, name)
                return False
    for variant, sums in state.sums.items():
        for name, tensor in sums.items():
            tensor.copy_(tensors[f"{variant}/{name}"])
    state.windows_done, state.tokens, state.seconds = int(saved["windows_done"]), int(saved["tokens"]), float(saved["seconds"])
    return True


def _metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file (read without loading its tensors)."""
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


@torch.inference_mode(False)  # a caller's inference mode would make the sums unwritable and the graph impossible
def fisher_diagonals(
    model: PreTrainedModel,
    windows: torch.Tensor,
    variants: Sequence[str] = VARIANTS,
    seed: int = 0,
    checkpoint: Path | None = None,
    checkpoint_key: Mapping[str, Any] | None = None,
    progress: bool = True,
    ray: RaySettings | None = None,
) -> dict[str, FisherDiagonal]:
    """diag(F̄) of every quantizable linear weight of ``model`` on ``windows`` (W x seqlen token ids), for
    each of ``variants`` (:data:`SAMPLED`, :data:`EMPIRICAL`), in one pass (see the module doc).

    The windows run in chunks of :data:`CHUNK_WINDOWS`, here or (``ray``) on a Ray cluster's workers
    (:mod:`allocator.measure.distributed_fisher`); the chunks' sums are added in chunk order either way. With
    ``checkpoint`` the float32 sums are saved there after every chunk (with ``checkpoint_key``, which a resumed
    pass must match) and a rerun resumes from them; the caller removes it.
    """
    variants = [v for v in VARIANTS if v in variants]
    if not variants:
        raise BitallocError(f"no Fisher variant to compute (choose from {', '.join(VARIANTS)})")
    if windows.ndim != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise BitallocError(f"the Fisher needs at least one window of at least 2 tokens, got shape {tuple(windows.shape)}")
    if not quantizable_linears(model):
        raise BitallocError(f"{type(model).__name__} has no linear layers in its decoder blocks")
    state = _PassState(zero_sums(model, variants))
    key = {**dict(checkpoint_key or {}), "variants": variants, "seed": seed, "chunk": CHUNK_WINDOWS}
    if checkpoint is not None and checkpoint.is_file() and _load_state(checkpoint, state, key):
        log.info("resuming the Fisher pass from %s: %d of %d windows done", checkpoint, state.windows_done, len(windows))
    starts = chunk_starts(len(windows), state.windows_done)
    start_time = time.perf_counter()
    seconds_before = state.seconds
    bar = tqdm(desc="fisher windows", disable=not progress, total=len(windows), initial=state.windows_done)
    with contextlib.ExitStack() as stack:
        if ray is not None:
            from allocator.measure.distributed_fisher import RayFisherPass  # imports Ray only when asked for

            on_ray = stack.enter_context(RayFisherPass(model, variants, seed, ray))
            results = on_ray.run((start, windows[start:start + CHUNK_WINDOWS]) for start in starts)
        else:
            scratch = zero_sums(model, variants)
            results = ((start, *chunk_sums(model, windows[start:start + CHUNK_WINDOWS], start, variants, seed, scratch))
                       for start in starts)
        for start, sums, tokens in results:
            add_sums(state.sums, sums)
            state.tokens += tokens
            state.windows_done = min(start + CHUNK_WINDOWS, len(windows))
            state.seconds = seconds_before + time.perf_counter() - start_time
            bar.update(state.windows_done - bar.n)
            if checkpoint is not None and state.windows_done < len(windows):
                _save_state(checkpoint, state, key)
    bar.close()
    return {
        variant: FisherDiagonal(
            variant=variant,
            diagonal={name: total.div_(state.tokens) for name, total in state.sums[variant].items()},  # in place: no second copy
            windows=len(windows),
            tokens=state.tokens,
            seconds=state.seconds,
            forward_passes=len(windows),
            backward_passes=len(windows) * len(variants),
        )
        for variant in variants
    }


# ----------------------------------------------------------------------------- the cache


def fisher_key(model: PreTrainedModel, corpus: str, windows: torch.Tensor, seed: int) -> dict[str, Any]:
    """What a Fisher diagonal depends on, but the variant (JSON-able)."""
    return {
        "version": FISHER_VERSION,
        "fingerprint": model_fingerprint(model),
        "corpus": corpus,
        "windows": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "seed": seed,
        "chunk": CHUNK_WINDOWS,
        "tokens": hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()[:16],
    }


def _digest(data: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(data), sort_keys=True).encode()).hexdigest()[:16]


def fisher_cache_path(model_name: str, key: Mapping[str, Any], variant: str) -> Path:
    """``$BITALLOC_CACHE/fisher/<model>-<variant>-<digest of key and variant>.safetensors``."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model_name).name or model_name).strip("._")[:48] or "model"
    return cache_dir(FISHER_CACHE) / f"{slug}-{variant}-{_digest({**key, 'variant': variant})}.safetensors"


def save_fisher(path: Path, fisher: FisherDiagonal, key: Mapping[str, Any]) -> None:
    """Write one variant's diagonals and their description atomically."""
    metadata = {"fisher": json.dumps({**fisher.info(), "key": {**key, "variant": fisher.variant}}, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file({name: t.contiguous() for name, t in fisher.diagonal.items()}, str(tmp), metadata=metadata)


def load_fisher(path: Path, key: Mapping[str, Any], variant: str, shapes: Mapping[str, torch.Size]) -> FisherDiagonal | None:
    """The cached diagonals at ``path`` if they were made for ``key`` and ``variant`` and hold ``shapes``; else None."""
    if not path.is_file():
        return None
    try:
        info = json.loads(_metadata(path).get("fisher", "{}"))
        if info.get("key") != json.loads(json.dumps({**key, "variant": variant})):
            return None
        diagonal = load_file(str(path))
    except (OSError, ValueError, SafetensorError) as exc:
        log.warning("recomputing the Fisher: unreadable cache %s (%s)", path, exc)
        return None
    if {n: t.shape for n, t in diagonal.items()} != dict(shapes):
        return None
    return FisherDiagonal(variant, {n: diagonal[n] for n in shapes}, int(info["windows"]), int(info["tokens"]), float(info["seconds"]),
                          int(info["forward_passes"]), int(info["backward_passes"]), dict(info["key"]))


def cached_fisher(
    model: PreTrainedModel,
    model_name: str,
    corpus: str,
    windows: torch.Tensor,
    variants: Sequence[str] = VARIANTS,
    seed: int = 0,
    recompute: bool = False,
    progress: bool = True,
    ray: RaySettings | None = None,
) -> dict[str, FisherDiagonal]:
    """:func:`fisher_diagonals`, each variant loaded from the cache where it is there (``recompute``: never),
    the missing ones computed together in one resumable pass (on ``ray``'s cluster if given) and cached."""
    key = fisher_key(model, corpus, windows, seed)
    shapes = {name: m.weight.shape for name, m in quantizable_linears(model).items()}
    found: dict[str, FisherDiagonal] = {}
    for variant in variants:
        cached = None if recompute else load_fisher(fisher_cache_path(model_name, key, variant), key, variant, shapes)
        if cached is not None:
            log.info("using the cached %s Fisher %s", variant, fisher_cache_path(model_name, key, variant))
            found[variant] = cached
    missing = [v for v in VARIANTS if v in variants and v not in found]
    if missing:
        pass_key = {**key, "variants": missing}
        checkpoint = cache_dir(FISHER_CACHE) / f"{fisher_cache_path(model_name, key, 'pass').stem}-{_digest(pass_key)}.partial.safetensors"
        if recompute:
            checkpoint.unlink(missing_ok=True)
        computed = fisher_diagonals(model, windows, missing, seed, checkpoint, pass_key, progress, ray)
        for variant, fisher in computed.items():
            fisher.key = {**key, "variant": variant}
            save_fisher(fisher_cache_path(model_name, key, variant), fisher, key)
        checkpoint.unlink(missing_ok=True)
        found.update(computed)
    return {v: found[v] for v in variants}


__all__ = [
    "FisherDiagonal",
    "cached_fisher",
    "fisher_cache_path",
    "fisher_diagonals",
    "fisher_key",
]
