"""Quantize a model's linear layers by a map of module name -> quantizer (:meth:`allocator.table.assignment.Assignment.quantizers`).

Calibration-aware quantizers run as GPTQ does: block by block in model order, each block fed
the outputs of the already-quantized blocks before it, and inside a block the linears that share
an input (q/k/v, then o, then gate/up, then down) are quantized in execution order so later ones
see the earlier ones' error ("true sequential"). The reference model itself is never modified:
each block is quantized on a copy.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from allocator.errors import BitallocError
from allocator.model.calibration import HessianAccumulator, StopForward, capture_block_inputs, run_block
from allocator.model.layers import decoder_layers, decoder_prefix, layer_linears, quantizable_linears, swapped_weights
from allocator.model.placement import COMPUTE_DTYPE, CPU
from allocator.quantize.scalefold import ScaleFold, ScaleFoldSettings, compute_scale_fold, search_quantizers
from quantizers import QuantizedTensor, Quantizer
from quantizers.formats import decode


class DequantizedView(Mapping[str, torch.Tensor]):
    """Module name -> float weight of a :class:`QuantizedModel`, decoded from the stored form on access when the float
    copy is not held."""

    def __init__(self, quantized: QuantizedModel) -> None:
        self._float = quantized.float_weights
        self._quantized = {**quantized.tensors, **quantized.head}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._quantized:
            qt = self._quantized[name]
            return qt.dequantized if qt.dequantized.numel() else decode(qt)
        return self._float[name]

    def __iter__(self) -> Iterator[str]:
        return iter([*self._float, *(n for n in self._quantized if n not in self._float)])

    def __len__(self) -> int:
        return len(set(self._float) | set(self._quantized))


@dataclass
class QuantizedModel:
    """The quantized linear weights of a model, by qualified module name."""

    tensors: dict[str, QuantizedTensor] = field(default_factory=dict)
    float_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    """Float weights that replace the reference's outside ``tensors`` (module name -> weight): what a
    function-preserving transform (scale folding) changed and is not quantized, e.g. the norms."""
    scale_fold: ScaleFold | None = None
    """The scale fold the quantized weights were made under (:mod:`allocator.quantize.scalefold`), if any."""
    head: dict[str, QuantizedTensor] = field(default_factory=dict)
    """The quantized LM head, if any (:mod:`allocator.quantize.head`): outside the bit map, so not counted in
    :attr:`storage_bits` / :attr:`bits_per_weight` (which describe the decoder linears)."""

    def dequantized_weights(self) -> Mapping[str, torch.Tensor]:
        """Everything to swap into the reference model: the float overrides, the dequantized linears and head (a view
        that decodes a tensor whose float weight was released, :meth:`release_dequantized`, when it is read)."""
        return DequantizedView(self)

    def release_dequantized(self) -> None:
        """Drop every quantized tensor's float copy (keeping its stored form): the model then costs its honest bits in
        memory, and each weight is decoded again where it is used."""
        for qt in (*self.tensors.values(), *self.head.values()):
            qt.dequantized = torch.empty(0)

    @property
    def storage_bits(self) -> int:
        return sum(qt.storage_bits for qt in self.tensors.values())

    @property
    def numel(self) -> int:
        return sum(qt.numel for qt in self.tensors.values())

    @property
    def bits_per_weight(self) -> float:
        return self.storage_bits / max(self.numel, 1)


def quantize_model(
    model: PreTrainedModel,
    quantizers: Mapping[str, Quantizer],
    samples: torch.Tensor | None = None,
    true_sequential: bool = True,
    progress: bool = True,
    device: torch.device = CPU,
    keep_dequantized: bool = True,
) -> QuantizedModel:
    """Quantize every module named in ``quantizers``; ``samples`` (N x seqlen token ids) feed
    the quantizers that need input Hessians. Blocks run on ``device`` in fp32, each on a copy; the quantizers run on
    the CPU. Without ``keep_dequantized`` each tensor's float copy is released as soon as its block no longer needs it
    (:meth:`QuantizedModel.release_dequantized`): the result then holds the stored forms alone."""
    linears = quantizable_linears(model)
    unknown = sorted(set(quantizers) - set(linears))
    if unknown:
        raise BitallocError(f"not a quantizable linear of this model: {unknown[0]}")
    if not any(q.uses_hessian for q in quantizers.values()):
        result = QuantizedModel()
        for name in tqdm(list(quantizers), desc="quantize", disable=not progress):
            result.tensors[name] = quantizers[name].quantize(linears[name].weight.detach().float())
            if not keep_dequantized:
                result.tensors[name].dequantized = torch.empty(0)
        return result
    if samples is None:
        raise BitallocError("calibration samples are needed for Hessian-based quantizers")
    return _quantize_sequential(model, quantizers, samples, true_sequential, progress, device, keep_dequantized)


@torch.inference_mode()
def _quantize_sequential(
    model: PreTrainedModel,
    quantizers: Mapping[str, Quantizer],
    samples: torch.Tensor,
    true_sequential: bool,
    progress: bool,
    device: torch.device,
    keep_dequantized: bool,
) -> QuantizedModel:
    result = QuantizedModel()
    inputs = capture_block_inputs(model, samples, device=device)
    hidden = inputs.hidden_states
    prefix = decoder_prefix(model)
    layers = decoder_layers(model)
    for index in tqdm(range(len(layers)), desc="quantize blocks", disable=not progress):
        block = copy.deepcopy(layers[index]).to(device=device, dtype=COMPUTE_DTYPE)  # quantized in place
        kwargs = inputs.block_kwargs[index]
        wanted = {local: f"{prefix}.{index}.{local}" for local in layer_linears(block) if f"{prefix}.{index}.{local}" in quantizers}
        if wanted:
            groups = _input_groups(block, hidden[0], kwargs) if true_sequential else [list(layer_linears(block))]
            for group in groups:
                members = [local for local in group if local in wanted]
                if members:
                    _quantize_group(block, members, {m: quantizers[wanted[m]] for m in members}, hidden, kwargs, result, wanted)
        hidden = [run_block(block, h, kwargs) for h in hidden]
        del block
        if not keep_dequantized:  # the block's quantized weights live on in its stored forms alone
            for name in wanted.values():
                result.tensors[name].dequantized = torch.empty(0)
    return result


def _input_groups(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> list[list[str]]:
    """Linear modules of ``block`` in call order, grouped by the input tensor they share."""
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [
        module.register_forward_pre_hook(lambda _m, args, name=name: calls.append((name, args[0])))
        for name, module in layer_linears(block).items()
    ]
    try:
        run_block(block, hidden, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    previous = None
    for name, tensor in calls:  # the tensors stay referenced in ``calls``, so identity is safe
        if previous is not None and tensor is previous:
            groups[-1].append(name)
        else:
            groups.append([name])
        previous = tensor
    return groups


def _quantize_group(
    block: nn.Module,
    members: list[str],
    quantizers: dict[str, Quantizer],
    hidden: list[torch.Tensor],
    kwargs: dict[str, Any],
    result: QuantizedModel,
    qualified: dict[str, str],
) -> None:
    modules = layer_linears(block)
    needs_hessian = [m for m in members if quantizers[m].uses_hessian]
    accumulators = {m: HessianAccumulator(modules[m].in_features) for m in needs_hessian}
    if needs_hessian:
        last = needs_hessian[-1]

        def hook(module: nn.Module, args: tuple, name: str) -> None:
            accumulators[name].add(args[0])
            if name == last:
                raise StopForward  # nothing after this module is needed for these Hessians

        handles = [modules[m].register_forward_pre_hook(lambda mod, args, m=m: hook(mod, args, m)) for m in needs_hessian]
        try:
            for h in hidden:
                try:
                    run_block(block, h, kwargs)
                except StopForward:
                    pass
        finally:
            for handle in handles:
                handle.remove()
    for m in members:
        # finished and dropped one by one: the float64 sums of the layers still to quantize are all that stays
        hessian = accumulators.pop(m).finish().cpu() if m in accumulators else None
        qt = quantizers[m].quantize(modules[m].weight.detach().cpu(), hessian)
        modules[m].weight.data.copy_(qt.dequantized.to(modules[m].weight.dtype))
        result.tensors[qualified[m]] = qt


def quantize_with_scale_fold(
    model: PreTrainedModel,
    quantizers: Mapping[str, Quantizer],
    samples: torch.Tensor,
    settings: ScaleFoldSettings = ScaleFoldSettings(),
    true_sequential: bool = True,
    progress: bool = True,
) -> QuantizedModel:
    """Fold scales into a virtual copy of ``model`` (an overlay; the model is unchanged), then
    quantize ``quantizers`` on it (:func:`quantize_model`). The result carries the
    folded float tensors that are not quantized (the norms) and the fold's record, so
    ``dequantized_weights()`` swapped into the reference model runs the folded, quantized model."""
    fold, overlay = compute_scale_fold(model, samples, settings, search_quantizers(quantizers), progress)
    with swapped_weights(model, overlay):
        quantized = quantize_model(model, quantizers, samples, true_sequential, progress)
    quantized.float_weights = {name: weight.detach().float().clone() for name, weight in overlay.items() if name not in quantized.tensors}
    quantized.scale_fold = fold
    return quantized
