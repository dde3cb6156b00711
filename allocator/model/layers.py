"""Where the quantizable linear layers of a causal LM are, and swapping their weights.

bitalloc quantizes the ``nn.Linear`` modules inside the decoder blocks; embeddings, the LM head
and norms stay at their stored dtype and are counted in the whole-model size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn
from transformers import PreTrainedModel

from allocator.errors import BitallocError


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The list of decoder blocks (``model.model.layers`` for llama/gemma/qwen/mistral)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    expected = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == expected:
            return module
    raise BitallocError(f"cannot find the decoder blocks of {type(model).__name__}")


def decoder_prefix(model: PreTrainedModel) -> str:
    """Qualified name of the decoder block list, e.g. ``model.layers``."""
    layers = decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise BitallocError("decoder blocks are not registered in the model")


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The linear modules of one decoder block by their name inside the block."""
    return {name: module for name, module in layer.named_modules() if isinstance(module, nn.Linear)}


def quantizable_linears(model: PreTrainedModel) -> dict[str, nn.Linear]:
    """Every linear module in the decoder blocks by qualified name, in block order."""
    prefix = decoder_prefix(model)
    found = {}
    for index, layer in enumerate(decoder_layers(model)):
        for name, module in layer_linears(layer).items():
            found[f"{prefix}.{index}.{name}"] = module
    return found


@contextlib.contextmanager
def swapped_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily run ``model`` (a model or one block) with some weights replaced (no copies of the model); each weight
    takes the device and dtype of the one it replaces."""
    modules = dict(model.named_modules())
    originals = {}
    try:
        for name, weight in weights.items():
            module = modules[name]
            originals[name] = module.weight
            module.weight = nn.Parameter(weight.to(device=module.weight.device, dtype=module.weight.dtype), requires_grad=False)
        yield
    finally:
        for name, weight in originals.items():
            modules[name].weight = weight
