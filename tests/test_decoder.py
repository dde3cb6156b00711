"""The lean llama decoder computes what the HF model computes (float and packed weights)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from allocator.errors import BitallocError
from allocator.model.layers import quantizable_linears
from allocator.quantize.apply import quantize_model
from allocator.runtime.decode_loops import teacher_forced_logits, timed_greedy, timed_lean_greedy
from allocator.runtime.decoder import LlamaDecoder, fuse_linears
from allocator.runtime.packed import install_quantized
from quantizers import RTNQuantizer
from quantizers.kernels import QuantLinear
from quantizers.kernels.layout import lut_tiles
from tests.conftest import tiny_llama


def hf_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids[None]).logits[0]


def stepwise_logits(decoder: LlamaDecoder, ids: torch.Tensor, splits: list[int]) -> torch.Tensor:
    """All logits of ``ids`` fed to the decoder in pieces (a prefill, single steps, another prefill)."""
    decoder.reset()
    bounds = [0, *splits, len(ids)]
    return torch.cat([decoder.forward(ids[a:b], all_logits=True) for a, b in zip(bounds, bounds[1:])])


def packed_llama(bits_of: dict[str, int] | None = None, seed: int = 0) -> nn.Module:
    """The tiny llama with every decoder linear packed (RTN, float decode activations for exact checks)."""
    model = tiny_llama(seed)
    names = quantizable_linears(model)
    assignment = {name: RTNQuantizer((bits_of or {}).get(name.rsplit(".", 1)[-1], 3), 32) for name in names}
    install_quantized(model, quantize_model(model, assignment, progress=False))
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.int8_activations = False
    return model


@pytest.mark.parametrize("native", [True, False])
def test_float_decoder_equals_the_hf_model(native: bool) -> None:
    model = tiny_llama()
    ids = torch.randint(0, 30, (20,), generator=torch.Generator().manual_seed(0))
    decoder = LlamaDecoder(model, max_length=32, native=native)
    assert (decoder.native_step is not None) == native
    expected = hf_logits(model, ids)
    got = stepwise_logits(decoder, ids, [7, 8, 9])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # only the last position by default, and a reset sequence starts again at position 0
    decoder.reset()
    torch.testing.assert_close(decoder.forward(ids[:5]), expected[4], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("bits_of", [None, {"q_proj": 2, "k_proj": 4, "v_proj": 3, "gate_proj": 2, "up_proj": 4}])
def test_packed_decoder_equals_the_hf_model_fused_or_not(bits_of: dict[str, int] | None, native: bool) -> None:
    model = packed_llama(bits_of)
    decoder = LlamaDecoder(model, max_length=24, native=native)
    fused = len(decoder.blocks[0].qkv) == 1
    assert fused == (bits_of is None) and len(decoder.blocks[0].gate_up) == (1 if fused else 2)
    ids = torch.randint(0, 30, (16,), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(stepwise_logits(decoder, ids, [10, 11]), hf_logits(model, ids), rtol=1e-4, atol=1e-4)


def test_greedy_generation_equals_transformers_generate() -> None:
    model = packed_llama()
    prompt = torch.randint(0, 30, (6,), generator=torch.Generator().manual_seed(2))
    hf_model = copy.deepcopy(model)
    hf_model.config.use_cache = True
    with torch.inference_mode():
        expected = hf_model.generate(prompt[None], max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 6:].tolist()
    decoder = LlamaDecoder(model, max_length=32)
    assert decoder.native_step is not None  # single steps in C
    streamed: list[int] = []
    assert decoder.generate(prompt.tolist(), 12, on_token=streamed.append) == expected == streamed
    stop = expected[3]
    assert decoder.generate(prompt.tolist(), 12, stop=[stop]) == expected[: expected.index(stop) + 1]


def test_timed_greedy_decodes_what_generate_decodes_through_either_engine() -> None:
    """Both timed loops: the prefill's token, then one per step (new_tokens steps), equal to greedy
    generate's tokens, with positive times; a decode of no steps is refused."""
    model = packed_llama()
    prompt = torch.randint(0, 30, (1, 6), generator=torch.Generator().manual_seed(6))
    hf_model = copy.deepcopy(model)
    hf_model.config.use_cache = True
    with torch.inference_mode():
        expected = hf_model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, 6:].tolist()
    decoder = LlamaDecoder(model, max_length=16)
    for timing in (timed_greedy(model, prompt, 5), timed_lean_greedy(decoder, prompt[0].tolist(), 5),
                   timed_lean_greedy(decoder, prompt[0].tolist(), 5)):  # again: the lean decoder starts from an empty cache
        assert timing.tokens == expected
        assert timing.prefill_seconds > 0 and timing.seconds_per_token > 0
    with pytest.raises(BitallocError, match="at least one decode step"):
        timed_lean_greedy(decoder, prompt[0].tolist(), 0)
    with pytest.raises(BitallocError, match="at least one decode step"):
        timed_greedy(model, prompt, 0)


@pytest.mark.parametrize("native", [True, False])
def test_teacher_forced_logits_are_the_models_next_token_logits(native: bool) -> None:
    model = packed_llama()
    ids = torch.randint(0, 30, (10,), generator=torch.Generator().manual_seed(7))
    decoder = LlamaDecoder(model, max_length=16, native=native)
    decoder.forward([3, 4, 5])  # a sequence already under way is forgotten
    steps = list(teacher_forced_logits(decoder, ids))
    assert len(steps) == 10 and decoder.length == 10
    torch.testing.assert_close(torch.stack(steps), hf_logits(model, ids), rtol=1e-4, atol=1e-4)


def test_fuse_linears_stacks_outputs_or_declines() -> None:
    model = packed_llama({"q_proj": 2, "k_proj": 2, "v_proj": 4})
    attention = model.model.layers[0].self_attn
    x = torch.randn(3, 96)
    [qk] = fuse_linears([attention.q_proj, attention.k_proj])
    torch.testing.assert_close(qk(x), torch.cat([attention.q_proj(x), attention.k_proj(x)], dim=-1), rtol=0, atol=0)
    assert fuse_linears([attention.q_proj, attention.v_proj]) == [attention.q_proj, attention.v_proj]  # 2 vs 4 bits
    float_model = tiny_llama()
    mlp = float_model.model.layers[0].mlp
    mlp.up_proj.bias = nn.Parameter(torch.randn(192))
    [gate_up] = fuse_linears([mlp.gate_proj, mlp.up_proj])
    torch.testing.assert_close(gate_up(x), torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], dim=-1))


def test_decoder_refuses_other_architectures_and_overlong_sequences() -> None:
    other = nn.Module()
    other.config = SimpleNamespace(model_type="gemma3_text")
    with pytest.raises(BitallocError, match="static rotary embeddings, not gemma3_text"):
        LlamaDecoder(other, max_length=8)
    decoder = LlamaDecoder(tiny_llama(), max_length=8)
    decoder.forward(list(range(6)))
    with pytest.raises(BitallocError, match="exceeds the decoder's max_length 8"):
        decoder.forward([1, 2, 3])
    with pytest.raises(BitallocError, match="no tokens"):
        decoder.forward([])


def test_native_step_runs_float_layers_and_a_packed_head_beside_packed_ones() -> None:
    """A layer kept in float (a dequantized format) and an 8-bit head take the C step as well."""
    from allocator.quantize.apply import QuantizedModel
    from allocator.quantize.head import quantize_head

    model = packed_llama()
    float_model = tiny_llama()
    layer = model.model.layers[1]
    layer.mlp.down_proj = float_model.model.layers[1].mlp.down_proj  # float32 nn.Linear among QuantLinears
    install_quantized(model, QuantizedModel(head=quantize_head(float_model, 8)))
    ids = torch.randint(0, 30, (12,), generator=torch.Generator().manual_seed(3))
    native = LlamaDecoder(model, max_length=16)
    assert native.native_step is not None and isinstance(model.get_output_embeddings(), QuantLinear)
    torch.testing.assert_close(stepwise_logits(native, ids, [4, 5, 6, 7]), hf_logits(model, ids), rtol=1e-4, atol=1e-4)


def test_int8_decode_activations_stay_close_to_float_ones() -> None:
    """int8 activations (the default) change single-token logits by the rounding of x only."""
    model = packed_llama()
    ids = torch.randint(0, 30, (12,), generator=torch.Generator().manual_seed(4))
    exact = stepwise_logits(LlamaDecoder(model, max_length=16), ids, list(range(4, 12)))
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.int8_activations = True
    for native in (True, False):
        rounded = stepwise_logits(LlamaDecoder(model, max_length=16, native=native), ids, list(range(4, 12)))
        assert torch.equal(rounded[:4], exact[:4])  # the prompt runs with float activations
        difference = (rounded[4:] - exact[4:]).abs().max() / exact.abs().max()
        assert 0 < difference < 0.05, (native, difference)


def test_native_step_needs_silu_and_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()
    model.config.hidden_act = "gelu"
    assert LlamaDecoder(model, max_length=8).native_step is None  # falls back to torch
    with pytest.raises(BitallocError, match="C decode step needs"):
        LlamaDecoder(model, max_length=8, native=True)
    monkeypatch.setattr("allocator.runtime.decoder.kernel_library", lambda: None)
    assert LlamaDecoder(tiny_llama(), max_length=8).native_step is None


def test_c_step_refuses_buffers_it_cannot_read_and_dynamic_rotary() -> None:
    """float32 params (model.float() converts QuantLinear's fp16 buffers) would be misread by C: torch path instead."""
    model = packed_llama().float()
    assert LlamaDecoder(model, max_length=8).native_step is None
    dynamic = tiny_llama()
    dynamic.model.rotary_emb.rope_type = "dynamic"
    with pytest.raises(BitallocError, match="static rotary embeddings, not llama with dynamic rotary scaling"):
        LlamaDecoder(dynamic, max_length=8)


def test_c_step_rejects_a_descriptor_whose_sizes_disagree() -> None:
    from quantizers.kernels.ops import KernelError

    decoder = LlamaDecoder(packed_llama(), max_length=8)
    decoder.forward([1, 2])
    decoder.native_step.descriptor.vocab += 1  # the head would write past the logits
    with pytest.raises(KernelError, match="code -1"):
        decoder.forward([3])
    decoder.native_step.descriptor.vocab -= 1
    decoder.native_step.blocks[1].qkv_pieces = 4
    with pytest.raises(KernelError, match="code -1"):
        decoder.forward([3])


def test_one_bit_layers_decode_through_the_lookup_tables() -> None:
    """1-bit layers with rows in multiples of 32 take the LUT GEMV in both steps, close to float activations."""
    model = packed_llama({kind: 1 for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")})
    packed = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert any(lut_tiles(m.weight_layout) is not None for m in packed)
    ids = torch.randint(0, 30, (12,), generator=torch.Generator().manual_seed(5))
    exact = stepwise_logits(LlamaDecoder(model, max_length=16), ids, list(range(4, 12)))
    for module in packed:
        module.int8_activations = True
    native = stepwise_logits(LlamaDecoder(model, max_length=16, native=True), ids, list(range(4, 12)))
    torch_step = stepwise_logits(LlamaDecoder(model, max_length=16, native=False), ids, list(range(4, 12)))
    torch.testing.assert_close(native, torch_step, rtol=1e-4, atol=1e-4 * float(exact.abs().max()))
    difference = (native[4:] - exact[4:]).abs().max() / exact.abs().max()
    assert 0 < difference < 0.05, difference
