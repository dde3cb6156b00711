"""Perplexity and KL(reference || quantized) over fixed evaluation windows.

Quantized variants are given as weight overlays (module name -> dequantized weight) and swapped
into the one reference model, so each window's reference logits are computed once and compared
with every variant in the same pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from allocator.model.layers import swapped_weights

REFERENCE = "reference"


@dataclass
class EvalResult:
    perplexity: float
    kl: float
    """Mean per-token KL(reference || model) in nats."""
    tokens: int
    """Predicted tokens the means are taken over."""
    seconds: float
    """Forward time spent on this model (the reference's is shared)."""


@torch.inference_mode()
def evaluate(
    model: PreTrainedModel,
    windows: torch.Tensor,
    variants: Mapping[str, Mapping[str, torch.Tensor]],
    progress: bool = True,
) -> dict[str, EvalResult]:
    """Evaluate the reference (key ``"reference"``) and every overlay in ``variants``."""
    names = [REFERENCE, *variants]
    nll = dict.fromkeys(names, 0.0)
    kl = dict.fromkeys(names, 0.0)
    seconds = dict.fromkeys(names, 0.0)
    tokens = 0
    for window in tqdm(windows, desc="eval windows", disable=not progress):
        ids = window[None]
        targets = ids[0, 1:]
        start = time.perf_counter()
        ref_logprobs = next_token_logprobs(model, ids)
        seconds[REFERENCE] += time.perf_counter() - start
        nll[REFERENCE] += _nll_sum(ref_logprobs, targets)
        for name, overlay in variants.items():
            start = time.perf_counter()
            with swapped_weights(model, overlay):
                logprobs = next_token_logprobs(model, ids)
            seconds[name] += time.perf_counter() - start
            nll[name] += _nll_sum(logprobs, targets)
            kl[name] += F.kl_div(logprobs, ref_logprobs, log_target=True, reduction="sum").item()
            del logprobs
        tokens += targets.numel()
    return {
        name: EvalResult(perplexity=math.exp(nll[name] / tokens), kl=kl[name] / tokens, tokens=tokens, seconds=seconds[name])
        for name in names
    }


def next_token_logprobs(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities at every position but the last (seqlen-1 x vocab, float32)."""
    logits = model(ids, use_cache=False).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def _nll_sum(logprobs: torch.Tensor, targets: torch.Tensor) -> float:
    return -logprobs.gather(1, targets[:, None]).sum().item()
