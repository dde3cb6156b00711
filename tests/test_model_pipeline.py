"""Mechanics of calibration capture, sequential quantization and evaluation on a tiny llama."""

import copy

import pytest
import torch

from allocator.errors import BitallocError
from allocator.evaluate.accounting import model_size_bytes
from allocator.evaluate.perplexity import REFERENCE, evaluate
from allocator.model.calibration import capture_block_inputs, run_block
from allocator.model.layers import decoder_layers, quantizable_linears, swapped_weights
from allocator.quantize.apply import _input_groups, quantize_model
from quantizers import GPTQQuantizer, RTNQuantizer
from tests.conftest import WORDS, tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def token_batch(count: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, len(WORDS) + 2, (count, seqlen), generator=torch.Generator().manual_seed(seed))


def test_quantizable_linears_are_the_decoder_linears(model) -> None:
    names = list(quantizable_linears(model))
    assert len(names) == 2 * 7
    assert names[0] == "model.layers.0.self_attn.q_proj"
    assert "lm_head" not in names


def test_blocks_run_one_by_one_reproduce_the_model(model) -> None:
    samples = token_batch(5, 16)
    inputs = capture_block_inputs(model, samples, batch_size=3)
    assert [h.shape[0] for h in inputs.hidden_states] == [3, 2]
    with torch.inference_mode():
        expected = model(samples[3:], output_hidden_states=True).hidden_states
        hidden = inputs.hidden_states[1]
        for block, kwargs in zip(decoder_layers(model), inputs.block_kwargs):
            hidden = run_block(block, hidden, kwargs)
        final = model.model.norm(hidden)
    assert torch.allclose(final, expected[-1], atol=1e-5)


def test_llama_block_groups_follow_shared_inputs(model) -> None:
    samples = token_batch(1, 8)
    inputs = capture_block_inputs(model, samples)
    with torch.inference_mode():
        groups = _input_groups(decoder_layers(model)[0], inputs.hidden_states[0], inputs.block_kwargs[0])
    assert groups == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


@pytest.mark.parametrize("true_sequential", [True, False])
def test_gptq_model_quantization_leaves_reference_untouched_and_beats_rtn(model, true_sequential) -> None:
    before = copy.deepcopy(model.state_dict())
    samples = token_batch(8, 32)
    linears = quantizable_linears(model)
    gptq = quantize_model(model, {n: GPTQQuantizer(2, 32) for n in linears}, samples, true_sequential, progress=False)
    rtn = quantize_model(model, {n: RTNQuantizer(2, 32) for n in linears}, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(gptq.tensors) == set(linears)
    windows = token_batch(4, 32, seed=1)
    results = evaluate(model, windows, {"gptq": gptq.dequantized_weights(), "rtn": rtn.dequantized_weights()}, progress=False)
    assert results[REFERENCE].kl == 0
    assert results["gptq"].kl < results["rtn"].kl
    assert results["gptq"].tokens == 4 * 31


def test_partial_assignment_and_errors(model) -> None:
    name = "model.layers.1.mlp.down_proj"
    result = quantize_model(model, {name: GPTQQuantizer(3, None)}, token_batch(2, 16), progress=False)
    assert list(result.tensors) == [name]
    with pytest.raises(BitallocError):
        quantize_model(model, {"lm_head": RTNQuantizer(3)}, progress=False)
    with pytest.raises(BitallocError):
        quantize_model(model, {name: GPTQQuantizer(3)}, samples=None, progress=False)


def test_evaluate_reference_matches_direct_loss_and_swaps_back(model) -> None:
    windows = token_batch(3, 24, seed=2)
    with torch.inference_mode():
        loss = sum(model(w[None], labels=w[None]).loss.item() for w in windows) / 3
    result = evaluate(model, windows, {}, progress=False)[REFERENCE]
    assert result.perplexity == pytest.approx(torch.tensor(loss).exp().item(), rel=1e-4)
    original = model.model.layers[0].mlp.up_proj.weight
    with swapped_weights(model, {"model.layers.0.mlp.up_proj": torch.zeros_like(original)}):
        assert model.model.layers[0].mlp.up_proj.weight.abs().sum() == 0
    assert model.model.layers[0].mlp.up_proj.weight is original


def test_model_size_counts_packed_linears_and_fp16_rest_once(model) -> None:
    linears = quantizable_linears(model)
    quantized = quantize_model(model, {n: RTNQuantizer(4, 32) for n in linears}, progress=False)
    linear_params = sum(m.weight.numel() for m in linears.values())
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    float_bytes = 2 * sum(unique.values())
    assert model_size_bytes(model) == float_bytes
    assert model_size_bytes(model, quantized) == float_bytes - 2 * linear_params + quantized.storage_bits // 8
