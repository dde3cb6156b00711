"""Bit accounting: bits per weight of the quantized linears and the whole-model size.

bpw counts everything stored for the quantized linear layers (codes, scales, zero points, ...)
over their weight count. The whole-model size adds every other tensor (embeddings, LM head,
norms) at ``OTHER_TENSOR_BITS``, the float16 they are stored with in bitalloc's packed files,
except a quantized LM head (:mod:`allocator.quantize.head`), counted at its packed size; tied tensors are
counted once.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from allocator.quantize.apply import QuantizedModel

OTHER_TENSOR_BITS = 16


def model_size_bytes(model: PreTrainedModel, quantized: QuantizedModel | None = None) -> int:
    """Stored size of ``model`` with the linears in ``quantized`` replaced by their packed form.

    With ``quantized=None`` this is the float16 size of the whole reference model.
    """
    packed = {**quantized.tensors, **quantized.head} if quantized else {}
    quantized_names = {f"{name}.weight" for name in packed}
    seen: set[int] = set()
    bits = sum(qt.storage_bits for qt in packed.values())
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in quantized_names or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        bits += tensor.numel() * OTHER_TENSOR_BITS
    return bits // 8
