"""The Fisher pass's unit of work: one chunk of windows, its squared linear-weight gradients summed from zero.

A chunk is :data:`CHUNK_WINDOWS` consecutive windows (fewer for the last); :func:`chunk_sums` returns, per
variant and per quantizable linear, ``Σ_windows G ⊙ G`` over the chunk in window order, starting from zeros
(the estimator itself is described in :mod:`allocator.measure.fisher`). The pass adds the chunks' sums in chunk
order, so the float sums it ends with do not depend on where a chunk ran: in this process, after a resume, or on
a Ray worker (:mod:`allocator.measure.distributed_fisher`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from allocator.model.layers import quantizable_linears

SAMPLED = "sampled"
"""Labels drawn from the reference's own predictive distribution: the true Fisher."""
EMPIRICAL = "empirical"
"""Labels = the text's next tokens: the empirical Fisher (squared NLL gradient)."""
VARIANTS = (SAMPLED, EMPIRICAL)
CHUNK_WINDOWS = 4
"""Windows per chunk: the unit a Ray worker runs and a checkpoint ends on. It fixes the order of the float sums,
so it belongs to what a pass computes (its cache key)."""

Sums = dict[str, dict[str, torch.Tensor]]
"""variant -> layer name -> float32 tensor shaped like the layer's weight."""


def window_generator(seed: int, index: int) -> torch.Generator:
    """The label sampler of window ``index``: seeded by ``(seed, index)`` alone, so a resumed pass draws the same labels."""
    state = int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(state)


def chunk_starts(windows: int, done: int = 0) -> range:
    """First window of every chunk of a pass over ``windows`` windows that is not done (``done``: a chunk boundary)."""
    return range(done, windows, CHUNK_WINDOWS)


def zero_sums(model: PreTrainedModel, variants: Sequence[str]) -> Sums:
    """Float32 zeros for every variant and quantizable linear of ``model``."""
    linears = quantizable_linears(model)
    return {v: {name: torch.zeros_like(m.weight, dtype=torch.float32) for name, m in linears.items()} for v in variants}


@contextlib.contextmanager
def _squared_gradients_into(model: PreTrainedModel, sums: Sums, active: list[str]) -> Iterator[None]:
    """While open, every backward adds each linear weight's squared gradient into ``sums[active[0]]`` and frees the
    gradient at once (one layer's gradient alive at a time). Every other parameter is frozen (no gradient, no
    graph for it) and the model is in eval mode; all restored on exit."""
    linears = quantizable_linears(model)
    weights = [m.weight for m in linears.values()]
    flags = {id(p): (p, p.requires_grad) for p in model.parameters()}
    grads = [(w, w.grad) for w in weights]
    training = model.training

    def make_hook(name: str) -> Callable[[torch.Tensor], None]:
        def hook(weight: torch.Tensor) -> None:
            assert weight.grad is not None
            grad = weight.grad.float()  # a bf16/fp16 model's gradient, squared and summed in float32
            sums[active[0]][name].addcmul_(grad, grad)
            weight.grad = None

        return hook

    handles = []
    try:
        model.eval()
        for parameter, _ in flags.values():
            parameter.requires_grad_(False)
        for weight in weights:
            weight.grad = None
            weight.requires_grad_(True)
        handles = [m.weight.register_post_accumulate_grad_hook(make_hook(name)) for name, m in linears.items()]
        with torch.enable_grad():
            yield
    finally:
        for handle in handles:
            handle.remove()
        for parameter, flag in flags.values():
            parameter.requires_grad_(flag)
        for weight, grad in grads:
            weight.grad = grad
        model.train(training)


def accumulate_window(
    model: PreTrainedModel,
    window: torch.Tensor,
    variants: Sequence[str],
    generator: torch.Generator,
    active: list[str],
) -> int:
    """One forward of ``window`` (1-D token ids) and one backward per variant, ``active[0]`` set to the variant
    whose sums the hooks fill. Returns the predicted positions (``len(window) - 1``)."""
    logits = model(window[None], use_cache=False).logits[0, :-1].float()
    losses = {}
    if SAMPLED in variants:
        with torch.no_grad():
            labels = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
        losses[SAMPLED] = F.cross_entropy(logits, labels, reduction="sum")
    if EMPIRICAL in variants:
        losses[EMPIRICAL] = F.cross_entropy(logits, window[1:], reduction="sum")
    for number, variant in enumerate(variants, start=1):
        active[0] = variant
        losses[variant].backward(retain_graph=number < len(variants))
    return int(logits.shape[0])


@torch.inference_mode(False)  # a caller's inference mode would make the sums unwritable and the graph impossible
def chunk_sums(
    model: PreTrainedModel,
    chunk: torch.Tensor,
    start: int,
    variants: Sequence[str],
    seed: int,
    into: Sums | None = None,
) -> tuple[Sums, int]:
    """``Σ G ⊙ G`` per variant and linear over the windows of ``chunk`` (rows of token ids; row ``k`` is window
    ``start + k`` of the pass, whose labels it seeds), from zero, and the positions predicted. ``into``: sums of
    the right shapes to zero and reuse (saves allocating them per chunk)."""
    sums = into if into is not None else zero_sums(model, variants)
    for per_layer in sums.values():
        for tensor in per_layer.values():
            tensor.zero_()
    active = [variants[0]]
    tokens = 0
    with _squared_gradients_into(model, sums, active):
        for offset, window in enumerate(chunk):
            tokens += accumulate_window(model, window, variants, window_generator(seed, start + offset), active)
    return sums, tokens


def add_sums(total: Sums, chunk: Sums) -> None:
    """``total += chunk``, variant by variant and layer by layer (the pass's one order of float additions)."""
    for variant, per_layer in total.items():
        for name, tensor in per_layer.items():
            tensor.add_(chunk[variant][name])


__all__ = [
    "CHUNK_WINDOWS",
    "EMPIRICAL",
    "SAMPLED",
    "VARIANTS",
    "Sums",
    "accumulate_window",
    "add_sums",
    "chunk_starts",
    "chunk_sums",
    "window_generator",
    "zero_sums",
]
