"""Calibration activations, collected one decoder block at a time so memory stays bounded.

:func:`capture_block_inputs` runs the embedding part of the model on every calibration sample
and keeps what enters the first decoder block, plus the keyword arguments (masks, rotary
embeddings) each block receives; blocks are then run one by one on those tensors.
:class:`HessianAccumulator` sums ``X^T X`` of a linear layer's inputs for GPTQ-style methods;
:class:`InputStatistics` adds the per-channel absolute maximum the profile's features need.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from allocator.model.layers import decoder_layers
from allocator.model.placement import COMPUTE_DTYPE, CPU, to_compute

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
def capture_block_inputs(
    model: PreTrainedModel, samples: torch.Tensor, batch_size: int = CALIBRATION_BATCH, device: torch.device = CPU
) -> BlockInputs:
    """Inputs of the first decoder block for every sample, and every block's keyword arguments, on ``device`` in fp32.

    No decoder block runs here: the embedding's output is taken to fp32 (so the masks and rotary embeddings the model
    derives from it are fp32 too, whatever the model is stored in), and while the keyword arguments are recorded every
    block passes its input through unchanged.
    """
    layers = decoder_layers(model)
    block_kwargs: list[dict[str, Any]] = [{} for _ in layers]
    hidden_states: list[torch.Tensor] = []

    def passthrough(index: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            block_kwargs[index] = to_compute({k: _detach(v) for k, v in kwargs.items() if k != "hidden_states"}, device)
            if index == len(layers) - 1:
                raise StopForward
            return args[0] if args else kwargs["hidden_states"]

        return forward

    def record_hidden(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden_states.append(to_compute((args[0] if args else kwargs["hidden_states"]).detach(), device).clone())
        raise StopForward

    def embed_in_compute_dtype(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.to(COMPUTE_DTYPE)

    embedding = model.get_input_embeddings().register_forward_hook(embed_in_compute_dtype)
    try:
        # One pass of one sample, every block a pass-through, records every block's kwargs ...
        for index, layer in enumerate(layers):
            layer.forward = passthrough(index)
        try:
            model(samples[:1], use_cache=False)
        except StopForward:
            pass
        finally:
            for layer in layers:
                del layer.forward  # the class's forward again
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
    finally:
        embedding.remove()
    return BlockInputs(hidden_states, block_kwargs)


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


HESSIAN_CHUNK_ROWS = 1024
"""Rows of the float64 sum scaled at a time when the Hessian is read."""


class HessianAccumulator:
    """Running ``H = 2/n * sum_x x x^T`` over all input rows of one linear layer, on the device the inputs are on
    (float64 where the device has it)."""

    def __init__(self, in_features: int) -> None:
        self.in_features = in_features
        self.sum: torch.Tensor | None = None
        self.rows = 0
        self._final: torch.Tensor | None = None

    def add(self, inputs: torch.Tensor) -> None:
        if self._final is not None:
            raise RuntimeError("this Hessian is finished; no more inputs can be added")
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        if self.sum is None:
            dtype = torch.float32 if x.device.type == "mps" else torch.float64
            self.sum = torch.zeros(self.in_features, self.in_features, dtype=dtype, device=x.device)
        self.sum += (x.T @ x).to(self.sum.dtype)
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self._final is not None:
            return self._final
        if self.sum is None:
            return torch.zeros(self.in_features, self.in_features)
        # row chunks: the same elementwise float64 arithmetic as on the whole matrix (the same bits), without two
        # whole float64 temporaries beside the sum (2 x 1.6 GB for an 8B model's down_proj)
        out = torch.empty(self.sum.shape, dtype=torch.float32, device=self.sum.device)
        for start in range(0, self.in_features, HESSIAN_CHUNK_ROWS):
            rows = slice(start, start + HESSIAN_CHUNK_ROWS)
            out[rows] = (2.0 * self.sum[rows] / max(self.rows, 1)).float()
        return out

    def finish(self) -> torch.Tensor:
        """:meth:`hessian`, kept, with the float64 sum released (in_features^2 x 8 bytes: 1.6 GB for an 8B model's
        down_proj) before the quantizers need their own memory; no inputs can be added afterwards."""
        self._final = self.hessian()
        self.sum = None
        return self._final


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
        self.absmax = torch.maximum(self.absmax.to(x.device), x.abs().amax(dim=0))

    @property
    def rows(self) -> int:
        """Input rows (tokens) seen."""
        return self.hessian.rows
