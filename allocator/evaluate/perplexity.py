"""Perplexity and KL(reference || quantized) over fixed evaluation windows.

Quantized variants are given as weight overlays (module name -> dequantized weight) and swapped
into the one reference model, so each window's reference logits are computed once and compared
with every variant in the same pass.

The windows run block by block (:class:`allocator.model.blockwise.BlockwiseForward`), :data:`EVAL_CHUNK` windows at a
time: each decoder block an fp32 copy on the device, so neither a model stored in bf16 nor one larger than the device
needs a second copy of itself. A model whose forward that does not reproduce runs whole forwards on the CPU instead.
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

from allocator.model.blockwise import BlockwiseForward
from allocator.model.layers import swapped_weights
from allocator.model.placement import CPU

EVAL_CHUNK = 8
"""Windows run through the blocks together: batched matmuls, while the hidden states stay a few MB per window."""

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
    device: torch.device = CPU,
) -> dict[str, EvalResult]:
    """Evaluate the reference (key ``"reference"``) and every overlay in ``variants``, blocks on ``device``."""
    blockwise = BlockwiseForward(model, device)
    if len(windows) and all(blockwise.handles(overlay) for overlay in variants.values()) and blockwise.check(windows[0]):
        return _evaluate_blockwise(blockwise, windows, variants, progress)
    return _evaluate_whole(model, windows, variants, progress)


class _Totals:
    def __init__(self, names: list[str]) -> None:
        self.nll = dict.fromkeys(names, 0.0)
        self.kl = dict.fromkeys(names, 0.0)
        self.seconds = dict.fromkeys(names, 0.0)
        self.tokens = 0

    def results(self) -> dict[str, EvalResult]:
        tokens = self.tokens
        return {name: EvalResult(perplexity=math.exp(self.nll[name] / tokens), kl=self.kl[name] / tokens, tokens=tokens,
                                 seconds=self.seconds[name]) for name in self.nll}


def _evaluate_blockwise(blockwise: BlockwiseForward, windows: torch.Tensor, variants: Mapping[str, Mapping[str, torch.Tensor]],
                        progress: bool) -> dict[str, EvalResult]:
    overlays = {REFERENCE: {}, **variants}
    totals = _Totals(list(overlays))
    with tqdm(total=len(windows), desc="eval windows", disable=not progress) as bar:
        for chunk in windows.split(EVAL_CHUNK):
            hidden = {}
            for name, overlay in overlays.items():
                start = time.perf_counter()
                hidden[name] = blockwise.final_hidden(chunk, overlay)
                totals.seconds[name] += time.perf_counter() - start
            for index, window in enumerate(chunk):
                targets = window[1:]
                start = time.perf_counter()
                reference = blockwise.logprobs(hidden[REFERENCE][index], {})
                totals.seconds[REFERENCE] += time.perf_counter() - start
                totals.nll[REFERENCE] += _nll_sum(reference, targets)
                for name, overlay in variants.items():
                    start = time.perf_counter()
                    logprobs = blockwise.logprobs(hidden[name][index], overlay)
                    totals.seconds[name] += time.perf_counter() - start
                    totals.nll[name] += _nll_sum(logprobs, targets)
                    totals.kl[name] += F.kl_div(logprobs, reference, log_target=True, reduction="sum").item()
                    del logprobs
                totals.tokens += targets.numel()
                bar.update()
    return totals.results()


def _evaluate_whole(model: PreTrainedModel, windows: torch.Tensor, variants: Mapping[str, Mapping[str, torch.Tensor]],
                    progress: bool) -> dict[str, EvalResult]:
    """Whole forwards on the CPU, one window at a time (models :class:`BlockwiseForward` does not reproduce)."""
    totals = _Totals([REFERENCE, *variants])
    for window in tqdm(windows, desc="eval windows", disable=not progress):
        ids = window[None]
        targets = ids[0, 1:]
        start = time.perf_counter()
        ref_logprobs = next_token_logprobs(model, ids)
        totals.seconds[REFERENCE] += time.perf_counter() - start
        totals.nll[REFERENCE] += _nll_sum(ref_logprobs, targets)
        for name, overlay in variants.items():
            start = time.perf_counter()
            with swapped_weights(model, overlay):
                logprobs = next_token_logprobs(model, ids)
            totals.seconds[name] += time.perf_counter() - start
            totals.nll[name] += _nll_sum(logprobs, targets)
            totals.kl[name] += F.kl_div(logprobs, ref_logprobs, log_target=True, reduction="sum").item()
            del logprobs
        totals.tokens += targets.numel()
    return totals.results()


def next_token_logprobs(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities at every position but the last (seqlen-1 x vocab, float32)."""
    logits = model(ids, use_cache=False).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def _nll_sum(logprobs: torch.Tensor, targets: torch.Tensor) -> float:
    return -logprobs.gather(1, targets[:, None]).sum().item()
