"""Lean batch-1 generation for llama-architecture models: the decode loop without HF's per-step machinery.

A transformers forward pass at batch 1 spends most of a small model's decode step outside the
matrix products: cache objects, mask construction, rotary modules, output dataclasses, about a
hundred module calls per block. :class:`LlamaDecoder` runs the same arithmetic directly on the
model's own modules and weights (float ``nn.Linear`` or packed :class:`QuantLinear`):

- q/k/v and gate/up are fused into one product each when their grids allow
  (:meth:`QuantLinear.concatenate`, or one concatenated float weight), so a block makes 4 matrix
  calls per token instead of 7;
- the KV cache is two preallocated tensors (layers x kv heads x ``max_length`` x head dim), written
  in place, and attention is one ``scaled_dot_product_attention`` with grouped-query heads;
- rotary cos/sin come from the model's own rotary module, once, for every position;
- the LM head is applied to the last position only.

Single-token steps go further where the C kernels are built and every matrix is packed or float32:
the whole step (norms, projections, rotary, attention over the cache, SiLU MLP, LM head) is one call
into ``quantizers/kernels/llama_step.c`` (:class:`NativeStep`), so a generated token costs one
ctypes call instead of a few hundred torch operations. Prompts (several tokens) run in torch.

The logits equal the HF model's up to float summation order (tested against it, float and packed).
Only the llama family (``model_type == "llama"``; SmolLM2 is one) is built; other models generate
through transformers.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from allocator.errors import BitallocError
from quantizers.kernels import QuantLinear, kernel_library
from quantizers.kernels.build import FLOAT_BITS, MAX_PIECES, KernelLibrary, LlamaBlockDescriptor, LlamaDescriptor, WeightDescriptor
from quantizers.kernels.ops import KernelError, check_weight

SUPPORTED_MODEL_TYPES = ("llama",)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
"""Rotary kinds whose cos/sin depend on the position only (dynamic NTK and longrope rescale with the length)."""


def supports(model: nn.Module) -> bool:
    """Whether :class:`LlamaDecoder` can run this model: a llama with a position-only rotary embedding."""
    config = getattr(model, "config", None)
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    return (getattr(config, "model_type", None) in SUPPORTED_MODEL_TYPES
            and getattr(rotary, "rope_type", "default") in STATIC_ROPE_TYPES)


def fuse_linears(linears: Sequence[nn.Module]) -> list[nn.Module]:
    """``[one module]`` computing all outputs side by side when the linears can share one product, else
    the linears themselves (a packed layer beside a float one, or packed layers on different grids)."""
    if all(isinstance(m, QuantLinear) for m in linears):
        fused = QuantLinear.concatenate(list(linears))
        return list(linears) if fused is None else [fused]
    if all(type(m) is nn.Linear for m in linears):
        has_bias = any(m.bias is not None for m in linears)
        fused_linear = nn.Linear(linears[0].in_features, sum(m.out_features for m in linears), bias=has_bias,
                                 dtype=linears[0].weight.dtype)
        with torch.no_grad():
            fused_linear.weight.copy_(torch.cat([m.weight for m in linears]))
            if has_bias:
                fused_linear.bias.copy_(torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features)
                                                   for m in linears]))
        return [fused_linear.requires_grad_(False)]
    return list(linears)


def _apply(parts: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    return parts[0](x) if len(parts) == 1 else torch.cat([part(x) for part in parts], dim=-1)


class _Block:
    """One decoder block's weights, gathered once: norms, fused projections and activation."""

    def __init__(self, layer: nn.Module) -> None:
        attention, mlp = layer.self_attn, layer.mlp
        self.input_norm = layer.input_layernorm.weight
        self.input_eps = layer.input_layernorm.variance_epsilon
        self.post_norm = layer.post_attention_layernorm.weight
        self.post_eps = layer.post_attention_layernorm.variance_epsilon
        self.qkv = fuse_linears([attention.q_proj, attention.k_proj, attention.v_proj])
        self.o_proj = attention.o_proj
        self.gate_up = fuse_linears([mlp.gate_proj, mlp.up_proj])
        self.down_proj = mlp.down_proj
        self.act: Callable[[torch.Tensor], torch.Tensor] = mlp.act_fn
        self.scaling = float(attention.scaling)


def _describe(module: nn.Module, keep: list[torch.Tensor]) -> WeightDescriptor | None:
    """The C descriptor of a packed or float32 linear (tensors it points into appended to ``keep``), or
    ``None`` for anything else."""
    if isinstance(module, QuantLinear):
        try:
            check_weight(module.weight_layout)  # the dtypes, shapes and memory the C kernels read
        except ValueError:
            return None
        bias = module.bias
        if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous() or not bias.is_cpu):
            return None
        geometry = module.weight_layout.geometry
        lut = module.lut_tiles()  # what the 1-bit int8 GEMV reads (None for other widths)
        tensors = [module.codes, module.params] + ([] if module.bias is None else [module.bias]) + list(lut or ())
        keep.extend(tensors)
        return WeightDescriptor(module.codes.data_ptr(), module.params.data_ptr(), None if module.bias is None else module.bias.data_ptr(),
                                module.out_features, module.in_features, geometry.kernel_group_size, module.bits,
                                *((t.data_ptr() for t in lut) if lut else (None, None)))
    if type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.weight.is_cpu:
        weight = module.weight.detach().contiguous()
        bias = None if module.bias is None else module.bias.detach().float().contiguous()
        keep.extend([weight] + ([] if bias is None else [bias]))
        return WeightDescriptor(weight.data_ptr(), None, None if bias is None else bias.data_ptr(), module.out_features,
                                module.in_features, 0, FLOAT_BITS)
    return None


class NativeStep:
    """A decoder's single-token step bound to ``bq_llama_step``: the descriptors of every block, the
    head, the rotary tables and the decoder's own KV cache tensors (so torch prefills and C steps share it).

    Int8 decode activations are used when every packed module asks for them (``int8_activations``).
    """

    def __init__(self, lib: KernelLibrary, decoder: LlamaDecoder, config: object) -> None:
        self.lib = lib
        self.keep: list[torch.Tensor] = [decoder.keys, decoder.values, decoder.cos, decoder.sin]
        blocks = (LlamaBlockDescriptor * len(decoder.blocks))()
        packed: list[QuantLinear] = []
        for target, block in zip(blocks, decoder.blocks):
            for field, parts in (("qkv", block.qkv), ("gate_up", block.gate_up)):
                for index, part in enumerate(parts):
                    getattr(target, field)[index] = self._weight(part, packed)
                setattr(target, field + "_pieces", len(parts))
            target.o = self._weight(block.o_proj, packed)
            target.down = self._weight(block.down_proj, packed)
            norms = [block.input_norm.detach().float().contiguous(), block.post_norm.detach().float().contiguous()]
            self.keep.extend(norms)
            target.input_norm, target.post_norm = norms[0].data_ptr(), norms[1].data_ptr()
        final_norm = decoder.final_norm.detach().float().contiguous()
        self.keep.append(final_norm)
        self.blocks = blocks
        self.vocab = int(decoder.head.out_features)
        self.descriptor = LlamaDescriptor(
            layers=len(decoder.blocks), hidden=decoder.hidden, heads=decoder.heads, kv_heads=decoder.kv_heads,
            head_dim=decoder.head_dim, intermediate=int(config.intermediate_size), max_length=decoder.max_length, vocab=self.vocab,
            int8_activations=int(bool(packed) and all(m.int8_activations for m in packed)),
            norm_eps=decoder.blocks[0].input_eps, attention_scale=decoder.blocks[0].scaling,
            blocks=ctypes.addressof(blocks), final_norm=final_norm.data_ptr(), head=self._weight(decoder.head, packed),
            cos=decoder.cos.data_ptr(), sin=decoder.sin.data_ptr(), keys=decoder.keys.data_ptr(), values=decoder.values.data_ptr())
        self.address = ctypes.addressof(self.descriptor)

    def _weight(self, module: nn.Module, packed: list[QuantLinear]) -> WeightDescriptor:
        described = _describe(module, self.keep)
        if described is None:
            raise TypeError(f"{type(module).__name__} has no C descriptor")
        if isinstance(module, QuantLinear):
            packed.append(module)
        return described

    @staticmethod
    def eligible(decoder: LlamaDecoder, config: object) -> bool:
        """Whether the C step computes this decoder exactly as the torch path does."""
        modules = [m for block in decoder.blocks for m in (*block.qkv, block.o_proj, *block.gate_up, block.down_proj)] + [decoder.head]
        tensors = [decoder.final_norm, decoder.keys] + [t for b in decoder.blocks for t in (b.input_norm, b.post_norm)]
        return (getattr(config, "hidden_act", None) == "silu" and all(t.dtype == torch.float32 and t.is_cpu for t in tensors)
                and all(len(block.qkv) <= MAX_PIECES and len(block.gate_up) <= MAX_PIECES for block in decoder.blocks)
                and len({(b.input_eps, b.post_eps, b.scaling) for b in decoder.blocks}) == 1
                and decoder.blocks[0].input_eps == decoder.blocks[0].post_eps == decoder.final_eps
                and all(_describe(m, []) is not None for m in modules))

    def __call__(self, x: torch.Tensor, position: int) -> torch.Tensor:
        """Logits (vocab,) of one token whose embedding is ``x`` (hidden,), at ``position``."""
        state = x.detach().float().contiguous().clone()
        logits = torch.empty(self.vocab)
        code = self.lib.lib.bq_llama_step(self.address, state.data_ptr(), position, logits.data_ptr())
        if code != 0:
            raise KernelError(f"bq_llama_step failed with code {code}")
        return logits


class LlamaDecoder:
    """Greedy/stepwise decoding of one sequence with a static KV cache of ``max_length`` positions.

    ``forward(tokens)`` appends tokens at the current position and returns the logits of the last
    one; :meth:`generate` is greedy decoding on top. The decoder reads the model's parameters (no
    copies except the fused projections), so it must be rebuilt if the model's weights change.
    """

    def __init__(self, model: nn.Module, max_length: int, native: bool | None = None) -> None:
        if not supports(model):
            kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            rope = getattr(getattr(getattr(model, "model", None), "rotary_emb", None), "rope_type", "default")
            what = kind if kind not in SUPPORTED_MODEL_TYPES else f"{kind} with {rope} rotary scaling"
            raise BitallocError(f"the lean decoder runs llama-architecture models with static rotary embeddings, not {what}; "
                                "use transformers' generate")
        if max_length < 1:
            raise BitallocError(f"max_length must be positive, got {max_length}")
        config = model.config
        inner = model.model
        self.embed = inner.embed_tokens
        self.blocks = [_Block(layer) for layer in inner.layers]
        self.final_norm = inner.norm.weight
        self.final_eps = inner.norm.variance_epsilon
        self.head = model.get_output_embeddings()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.hidden = config.hidden_size
        self.max_length = max_length
        dtype = self.final_norm.dtype
        shape = (len(self.blocks), self.kv_heads, max_length, self.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype)
        self.values = torch.zeros(shape, dtype=dtype)
        with torch.inference_mode():
            positions = torch.arange(max_length)[None]
            cos, sin = inner.rotary_emb(torch.zeros(1, dtype=dtype), positions)
        half = self.head_dim // 2
        self.cos = cos[0].to(dtype).contiguous()  # (max_length, head_dim)
        self.sin = sin[0].to(dtype).contiguous()
        # rotate_half(x) * sin == roll(x, half) * [-sin_first_half, sin_second_half]
        self.signed_sin = torch.cat([-self.sin[:, :half], self.sin[:, half:]], dim=-1)
        self.length = 0
        lib = kernel_library()
        if native and (lib is None or not NativeStep.eligible(self, config)):
            raise BitallocError("the C decode step needs the compiled kernels, SiLU, float32 norms and packed or float32 linears")
        use_native = native if native is not None else lib is not None and NativeStep.eligible(self, config)
        self.native_step = NativeStep(lib, self, config) if use_native else None
        """The C single-token step, or ``None`` (every step in torch)."""

    def reset(self) -> None:
        """Forget the sequence (the cache is overwritten, not cleared)."""
        self.length = 0

    def _rotate(self, x: torch.Tensor, start: int, count: int) -> torch.Tensor:
        """Rotary embedding of ``x`` (count x heads x head_dim) at positions start .. start+count-1."""
        cos = self.cos[start:start + count, None]
        sin = self.signed_sin[start:start + count, None]
        return torch.addcmul(x * cos, x.roll(self.head_dim // 2, dims=-1), sin)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor | Sequence[int], all_logits: bool = False) -> torch.Tensor:
        """Append ``tokens`` (1-D) to the sequence; the logits of the last one (vocab,), or of every one
        (count x vocab) with ``all_logits``."""
        ids = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        count, start = ids.numel(), self.length
        if count == 0:
            raise BitallocError("no tokens to decode")
        end = start + count
        if end > self.max_length:
            raise BitallocError(f"sequence of {end} tokens exceeds the decoder's max_length {self.max_length}")
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if count == 1 and self.native_step is not None:
            logits = self.native_step(self.embed(ids)[0], start)
            self.length = end
            return logits[None] if all_logits else logits
        mask = None
        if count > 1:  # position start+t sees keys 0 .. start+t
            mask = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
        x = self.embed(ids)
        norm_shape = (self.hidden,)
        for index, block in enumerate(self.blocks):
            h = F.rms_norm(x, norm_shape, block.input_norm, block.input_eps)
            qkv = _apply(block.qkv, h)
            qk = self._rotate(qkv[:, :q_width + kv_width].view(count, self.heads + self.kv_heads, self.head_dim), start, count)
            self.keys[index, :, start:end] = qk[:, self.heads:].transpose(0, 1)
            self.values[index, :, start:end] = qkv[:, q_width + kv_width:].view(count, self.kv_heads, self.head_dim).transpose(0, 1)
            attended = F.scaled_dot_product_attention(
                qk[:, :self.heads].transpose(0, 1)[None], self.keys[index, :, :end][None], self.values[index, :, :end][None],
                attn_mask=mask, scale=block.scaling, enable_gqa=self.heads != self.kv_heads)
            x = x + block.o_proj(attended[0].transpose(0, 1).reshape(count, q_width))
            h = F.rms_norm(x, norm_shape, block.post_norm, block.post_eps)
            gate_up = _apply(block.gate_up, h)
            gate, up = gate_up.chunk(2, dim=-1)
            x = x + block.down_proj(block.act(gate) * up)
        self.length = end
        x = x if all_logits else x[-1:]
        logits = self.head(F.rms_norm(x, norm_shape, self.final_norm, self.final_eps))
        return logits if all_logits else logits[0]

    __call__ = forward

    def generate(self, prompt: Sequence[int], new_tokens: int, stop: Sequence[int] = (),
                 on_token: Callable[[int], None] | None = None) -> list[int]:
        """Greedy continuation of ``prompt`` (from an empty cache): up to ``new_tokens`` tokens, ending
        early after a token in ``stop``. ``on_token`` sees each token as it is chosen (streaming)."""
        self.reset()
        logits = self.forward(list(prompt))
        generated: list[int] = []
        for step in range(new_tokens):
            token = int(logits.argmax())
            generated.append(token)
            if on_token is not None:
                on_token(token)
            if token in stop or step == new_tokens - 1:
                break
            logits = self.forward([token])
        return generated
