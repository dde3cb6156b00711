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

The logits equal the HF model's up to float summation order (tested against it, float and packed).
Only the llama family (``model_type == "llama"``; SmolLM2 is one) is built; other models generate
through transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from allocator.errors import BitallocError
from quantizers.kernels import QuantLinear

SUPPORTED_MODEL_TYPES = ("llama",)


def supports(model: nn.Module) -> bool:
    """Whether :class:`LlamaDecoder` can run this model."""
    return getattr(getattr(model, "config", None), "model_type", None) in SUPPORTED_MODEL_TYPES


def fuse_linears(linears: Sequence[nn.Module]) -> list[nn.Module]:
    """``[one module]`` computing all outputs side by side when the linears can share one product, else
    the linears themselves (a packed layer beside a float one, or packed layers on different grids)."""
    if all(isinstance(m, QuantLinear) for m in linears):
        fused = QuantLinear.concatenate(list(linears))
        return list(linears) if fused is None else [fused]
    if all(type(m) is nn.Linear for m in linears):
        has_bias = any(m.bias is not None for m in linears)
        fused_linear = nn.Linear(linears[0].in_features, sum(m.out_features for m in linears), bias=has_bias)
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


class LlamaDecoder:
    """Greedy/stepwise decoding of one sequence with a static KV cache of ``max_length`` positions.

    ``forward(tokens)`` appends tokens at the current position and returns the logits of the last
    one; :meth:`generate` is greedy decoding on top. The decoder reads the model's parameters (no
    copies except the fused projections), so it must be rebuilt if the model's weights change.
    """

    def __init__(self, model: nn.Module, max_length: int) -> None:
        if not supports(model):
            kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            raise BitallocError(f"the lean decoder runs llama-architecture models, not {kind}; use transformers' generate")
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
        self.cos = cos[0].to(dtype)  # (max_length, head_dim)
        # rotate_half(x) * sin == roll(x, half) * [-sin_first_half, sin_second_half]
        self.signed_sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1).to(dtype)
        self.length = 0

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
