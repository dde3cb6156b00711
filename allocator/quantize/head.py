"""The LM head, quantized apart from the bit map (like llama.cpp's ``--output-tensor-type``).

A decode step of a small model reads its LM head once per token: SmolLM2's 49152 x 576 head is
113 MB in float32, more than all its decoder linears together at 2-3 bits, so at batch 1 it is the
largest single read. It is not an allocation option (its loss is not additive with the decoder
layers' and bpw counts the decoder linears), but it can be stored as an 8-bit (or 4-bit) uniform
grid that the packed-weight kernels run: round to nearest, asymmetric, per group of
``HEAD_GROUP_SIZE`` columns. Tied input embeddings stay as they are (the lookup needs the float
rows); the head is then stored on its own.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from allocator.errors import BitallocError
from quantizers import QuantizedTensor
from quantizers.rtn import RTNQuantizer

HEAD_BITS = (4, 8)
HEAD_GROUP_SIZE = 128


def head_name(model: PreTrainedModel) -> str:
    """Qualified name of the model's output projection (``lm_head`` for llama/gemma)."""
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is head:
            return name
    raise BitallocError(f"{type(model).__name__} has no output projection module to quantize")


def head_quantizer(bits: int) -> RTNQuantizer:
    if bits not in HEAD_BITS:
        raise BitallocError(f"the LM head can be stored at {' or '.join(map(str, HEAD_BITS))} bits, not {bits}")
    return RTNQuantizer(bits, HEAD_GROUP_SIZE)


def quantize_head(model: PreTrainedModel, bits: int) -> dict[str, QuantizedTensor]:
    """``{head name: its RTN uniform grid at bits}``, for :attr:`allocator.quantize.apply.QuantizedModel.head`."""
    quantizer = head_quantizer(bits)
    name = head_name(model)
    return {name: quantizer.quantize(model.get_output_embeddings().weight.detach().float())}
