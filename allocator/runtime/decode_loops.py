"""Decode loops that measurements drive: greedy decoding timed per phase, and teacher-forced stepping.

- :func:`timed_greedy` / :func:`timed_lean_greedy`: greedy decoding of a prompt with the KV cache,
  through a transformers model or :class:`~allocator.runtime.decoder.LlamaDecoder`, timing the prompt
  (prefill) apart from the single-token steps after it (:class:`DecodeTiming`);
- :func:`teacher_forced_logits`: a sequence fed to a lean decoder one token per step, as generation
  feeds it (every product a single-token GEMV), yielding each step's next-token logits.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from allocator.errors import BitallocError
from allocator.runtime.decoder import LlamaDecoder


@dataclass(frozen=True)
class DecodeTiming:
    """One timed greedy decode."""

    prefill_seconds: float
    """The prompt's forward pass."""
    seconds_per_token: float
    """Mean wall time of a single-token decode step (forward and argmax)."""
    tokens: list[int]
    """The greedy tokens: the prompt's continuation, then one per decode step."""


def _check_steps(new_tokens: int) -> None:
    if new_tokens < 1:
        raise BitallocError(f"a timed decode needs at least one decode step, got {new_tokens}")


@torch.inference_mode()
def timed_greedy(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> DecodeTiming:
    """Greedy decoding of ``prompt`` (1 x n ids) through a transformers causal LM with its KV cache:
    the prefill, then ``new_tokens`` single-token steps."""
    _check_steps(new_tokens)
    start = time.perf_counter()
    out = model(prompt, use_cache=True)
    prefill = time.perf_counter() - start
    cache = out.past_key_values
    token = out.logits[:, -1:].argmax(-1)
    generated = [int(token)]
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        generated.append(int(token))
    return DecodeTiming(prefill, (time.perf_counter() - start) / new_tokens, generated)


def timed_lean_greedy(decoder: LlamaDecoder, prompt: Sequence[int], new_tokens: int) -> DecodeTiming:
    """:func:`timed_greedy` through the lean decoder (its own :meth:`~LlamaDecoder.generate` loop, from
    an empty cache): each token is timed as generate hands it on."""
    _check_steps(new_tokens)
    chosen_at: list[float] = []
    start = time.perf_counter()
    # one token from the prompt, then one per step: new_tokens + 1 tokens in all, never stopping early
    tokens = decoder.generate(prompt, new_tokens + 1, on_token=lambda _: chosen_at.append(time.perf_counter()))
    return DecodeTiming(chosen_at[0] - start, (chosen_at[-1] - chosen_at[0]) / new_tokens, tokens)


def teacher_forced_logits(decoder: LlamaDecoder, tokens: torch.Tensor | Sequence[int]) -> Iterator[torch.Tensor]:
    """From an empty cache, feed ``tokens`` one per step; after each, yield the logits (vocab,) for
    the token that follows it."""
    ids = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    decoder.reset()
    for position in range(ids.numel()):
        yield decoder.forward(ids[position:position + 1])
