"""Calibration activations, collected one decoder block at a time so memory stays bounded.

:func:`capture_block_inputs` runs the embedding part of the model on every calibration sample
and keeps what enters the first decoder block, plus the keyword arguments (masks, rotary
embeddings) each block receives; blocks are then run one by one on those tensors.
:class:`HessianAccumulator` sums ``X^T X`` of a linear layer's inputs for GPTQ-style methods;
:class:`InputStatistics` adds the per-channel absolute maximum the profile's features need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from allocator.model.layers import decoder_layers

CALIBRATION_BATCH = 8
"""Samples per block forward: batching is about 3x faster per sample on CPU than one at a time."""


class StopForward(Exception):
    """Raised from a hook once the activations needed are captured."""


@dataclass
class BlockInputs:
    hidden_states: list[torch.Tensor]
    """(batch, seqlen, hidden) tensors entering the current block, all samples in batches."""
    block_kwargs: list[dict[str, Any]]
    """Keyword arguments each decoder block is called with, recorded for a batch of one so that
    masks and rotary embeddings broadcast over any batch size."""


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    return value


@torch.inference_mode()
def capture_block_inputs(model: PreTrainedModel, samples: torch.Tensor, batch_size: int = CALIBRATION_BATCH) -> BlockInputs:
    """Inputs of the first decoder block for every sample, and every block's keyword arguments."""
    layers = decoder_layers(model)
    block_kwargs: list[dict[str, Any]] = [{} for _ in layers]
    hidden_states: list[torch.Tensor] = []

    def record_kwargs(index: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            block_kwargs[index] = {k: _detach(v) for k, v in kwargs.items() if k != "hidden_states"}
            if index == len(layers) - 1:
                raise StopForward

        return hook

    def record_hidden(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden_states.append((args[0] if args else kwargs["hidden_states"]).detach().clone())
        raise StopForward

    # One full pass (stopped before the last block runs) records every block's kwargs ...
    handles = [layer.register_forward_pre_hook(record_kwargs(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model(samples[:1], use_cache=False)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    # ... then the samples run, in batches, only up to the first block.
    handle = layers[0].register_forward_pre_hook(record_hidden, with_kwargs=True)
    try:
        for batch in samples.split(batch_size):
            try:
                model(batch, use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return BlockInputs(hidden_states, block_kwargs)


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class HessianAccumulator:
    """Running ``H = 2/n * sum_x x x^T`` over all input rows of one linear layer."""

    def __init__(self, in_features: int) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.rows = 0

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        self.sum += (x.T @ x).double()
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return (2.0 * self.sum / max(self.rows, 1)).float()


class InputStatistics:
    """What profiling keeps of a linear layer's inputs: the Hessian sum and each channel's max ``|x|``.

    The per-channel mean square is ``diag(H) / 2``, so the Hessian also gives the activation RMS.
    """

    def __init__(self, in_features: int) -> None:
        self.hessian = HessianAccumulator(in_features)
        self.absmax = torch.zeros(in_features)

    def add(self, inputs: torch.Tensor) -> None:
        self.hessian.add(inputs)
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        self.absmax = torch.maximum(self.absmax, x.abs().amax(dim=0))

    @property
    def rows(self) -> int:
        """Input rows (tokens) seen."""
        return self.hessian.rows
