"""Token windows cut from corpus text: fixed evaluation windows and seeded calibration samples."""

from __future__ import annotations

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from allocator.errors import BitallocError


def _token_stream(tokenizer: PreTrainedTokenizerBase, text: str) -> np.ndarray:
    return np.asarray(tokenizer(text, add_special_tokens=False).input_ids, dtype=np.int64)


def _with_bos(body: np.ndarray, tokenizer: PreTrainedTokenizerBase, add_bos: bool) -> np.ndarray:
    if not add_bos:
        return body
    bos = np.full((body.shape[0], 1), tokenizer.bos_token_id, dtype=np.int64)
    return np.concatenate([bos, body], axis=1)


def evaluation_windows(
    tokenizer: PreTrainedTokenizerBase, text: str, seqlen: int, max_tokens: int, add_bos: bool
) -> torch.Tensor:
    """Consecutive non-overlapping windows from the start of ``text``: ``max_tokens // seqlen`` rows.

    With ``add_bos`` each window is BOS followed by ``seqlen - 1`` text tokens.
    """
    if seqlen < 2:
        raise BitallocError(f"seqlen must be at least 2, got {seqlen}")
    count = max_tokens // seqlen
    if count < 1:
        raise BitallocError(f"--tokens {max_tokens} is less than one window of seqlen {seqlen}")
    stream = _token_stream(tokenizer, text)
    body = seqlen - int(add_bos)
    available = len(stream) // body
    if available < count:
        raise BitallocError(f"the evaluation text has {len(stream)} tokens: at most {available * seqlen} tokens at seqlen {seqlen}")
    windows = stream[: count * body].reshape(count, body)
    return torch.from_numpy(_with_bos(windows, tokenizer, add_bos))


MAX_CALIBRATION_TOKENS = 2**24
"""Calibration draws beyond this (16.8M tokens, far past the 32-128 x 512 that calibration needs) are typos
that would otherwise try to allocate the windows."""


def calibration_samples(
    tokenizer: PreTrainedTokenizerBase, text: str, count: int, seqlen: int, add_bos: bool, seed: int = 0
) -> torch.Tensor:
    """``count`` windows of ``seqlen`` tokens starting at seeded random offsets (as GPTQ samples C4)."""
    if count < 1 or seqlen < 2:
        raise BitallocError(f"need at least one calibration sample of at least 2 tokens (got {count} x {seqlen})")
    if count * seqlen > MAX_CALIBRATION_TOKENS:
        raise BitallocError(f"{count} x {seqlen} calibration tokens is more than the {MAX_CALIBRATION_TOKENS} bitalloc takes")
    stream = _token_stream(tokenizer, text)
    body = seqlen - int(add_bos)
    if len(stream) <= body:
        raise BitallocError(f"the calibration text has only {len(stream)} tokens, fewer than seqlen {seqlen}")
    starts = np.random.default_rng(seed).integers(0, len(stream) - body, size=count)
    windows = np.stack([stream[s : s + body] for s in starts])
    return torch.from_numpy(_with_bos(windows, tokenizer, add_bos))
