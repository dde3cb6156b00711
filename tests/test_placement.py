"""Placement: the model kept in its storage dtype, blocks run one at a time in fp32 on a device (tiny models, mechanics)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from allocator.errors import BitallocError
from allocator.measure.profile import profile_model
from allocator.model.calibration import capture_block_inputs
from allocator.model.layers import quantizable_linears
from allocator.model.loading import LoadedModel
from allocator.model.placement import CPU, resolve_device, storage_dtype, to_compute, working_block
from allocator.quantize.apply import quantize_model
from allocator.table.options import parse_options
from quantizers.gptq import GPTQQuantizer
from tests.cli_helpers import assert_one_line_error, run
from tests.conftest import tiny_llama, tiny_tokenizer

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def stored_pair(family: str = "llama") -> tuple[torch.nn.Module, torch.nn.Module]:
    """The tiny model stored in bf16, and an fp32 model holding exactly the same (bf16-rounded) weights."""
    if family == "gemma3":
        from tests.test_scalefold import tiny_gemma3

        model = tiny_gemma3()
    else:
        model = tiny_llama(seed=3)
    stored = model.to(torch.bfloat16)
    return stored, copy.deepcopy(stored).float()


def test_resolve_device() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else CPU)
    for bad in ("banana", "tpu", "cuda:x", ""):
        with pytest.raises(BitallocError, match="--device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(BitallocError, match="sees no CUDA GPU"):
            resolve_device("cuda:0")
    with pytest.raises(BitallocError, match="--dtype"):
        storage_dtype("int8")
    assert storage_dtype("auto") is None and storage_dtype("bfloat16") == torch.bfloat16


@pytest.mark.parametrize("command", ["profile", "run"])
def test_bad_device_is_one_line_before_work(capsys: pytest.CaptureFixture, isolated_cache, command: str) -> None:
    code, _, err = run(capsys, command, "--model", "no-such-model-anywhere", "--device", "tpu")
    assert_one_line_error(code, err, "--device 'tpu'")  # before the model is looked up
    code, _, err = run(capsys, command, "--dtype", "int8")
    assert_one_line_error(code, err, "--dtype")


def test_working_block_copies_only_what_is_not_placed() -> None:
    stored, reference = stored_pair()
    with working_block(reference.model.layers[0], CPU) as block:
        assert block is reference.model.layers[0]  # fp32 on the CPU already: no copy
    with working_block(stored.model.layers[0], CPU) as block:
        assert block is not stored.model.layers[0]
        assert all(p.dtype == torch.float32 for p in block.parameters())
    assert all(p.dtype == torch.bfloat16 for p in stored.model.layers[0].parameters())  # the stored model is untouched
    value = to_compute({"a": (torch.ones(2, dtype=torch.bfloat16), torch.arange(3))}, CPU)
    assert value["a"][0].dtype == torch.float32 and value["a"][1].dtype == torch.int64


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_capture_runs_no_block_and_gives_fp32(family: str) -> None:
    stored, reference = stored_pair(family)
    calls = []
    handles = [layer.register_forward_pre_hook(lambda *_: calls.append(1)) for layer in stored.model.layers]
    samples = torch.randint(2, 30, (3, 16), generator=torch.Generator().manual_seed(0))
    captured = capture_block_inputs(stored, samples, batch_size=2)
    for handle in handles:
        handle.remove()
    expected = capture_block_inputs(reference, samples, batch_size=2)
    # the pass-through blocks are called (their hooks fire) but none computes; forward is the class's again after
    assert all(not hasattr(layer, "__dict__") or "forward" not in layer.__dict__ for layer in stored.model.layers)
    assert [h.dtype for h in captured.hidden_states] == [torch.float32] * 2
    for got, want in zip(captured.hidden_states, expected.hidden_states):
        torch.testing.assert_close(got, want)
    for got, want in zip(captured.block_kwargs, expected.block_kwargs):
        assert got.keys() == want.keys()
        torch.testing.assert_close(to_compute(got, CPU), want)
    assert len(calls) == len(stored.model.layers) + 2  # one pass-through pass, then each batch stops at block 0


def test_bf16_stored_model_profiles_like_its_fp32_copy(isolated_cache, corpus) -> None:
    stored, reference = stored_pair()
    tokenizer = tiny_tokenizer()
    options = parse_options(["rtn2", "gptq3"])
    tables = [profile_model(LoadedModel(f"tiny-{i}", m, tokenizer, add_bos=False), corpus, options, samples=4, seqlen=32,
                            cache=False, progress=False) for i, m in enumerate((stored, reference))]
    for loss in ("hessian_err", "weight_err"):
        np.testing.assert_allclose(tables[0].losses[loss], tables[1].losses[loss], rtol=1e-5)
    np.testing.assert_array_equal(tables[0].bits, tables[1].bits)
    assert all(p.dtype == torch.bfloat16 for p in stored.parameters())


def test_bf16_stored_model_quantizes_like_its_fp32_copy() -> None:
    stored, reference = stored_pair()
    samples = torch.randint(2, 30, (4, 32), generator=torch.Generator().manual_seed(1))
    names = list(quantizable_linears(reference))
    quantizers = {n: GPTQQuantizer(3, 32) for n in names}
    got = quantize_model(stored, quantizers, samples, progress=False)
    want = quantize_model(reference, quantizers, samples, progress=False)
    for name in names:
        torch.testing.assert_close(got.tensors[name].dequantized, want.tensors[name].dequantized, rtol=1e-5, atol=1e-6)


@CUDA
def test_cuda_profile_and_quantize_match_cpu(isolated_cache, corpus) -> None:
    cuda = resolve_device("cuda")
    stored, _ = stored_pair()
    loaded = LoadedModel("tiny-cuda", stored, tiny_tokenizer(), add_bos=False)
    options = parse_options(["rtn2", "gptq3"])
    on_cpu = profile_model(loaded, corpus, options, samples=4, seqlen=32, cache=False, progress=False)
    on_cuda = profile_model(loaded, corpus, options, samples=4, seqlen=32, cache=False, progress=False, device=cuda)
    np.testing.assert_allclose(on_cuda.losses["hessian_err"], on_cpu.losses["hessian_err"], rtol=1e-3)
    assert next(stored.parameters()).device == CPU  # the model stays where it is stored


def test_bf16_stored_model_measures_kl_like_its_fp32_copy() -> None:
    from allocator.measure.profile import KLProbe

    stored, reference = stored_pair()
    windows = torch.randint(2, 30, (2, 24), generator=torch.Generator().manual_seed(2))
    name = "model.layers.1.mlp.down_proj"
    overlay = {name: (reference.get_submodule(name).weight.detach() * 1.05).bfloat16().float()}  # as the bf16 model stores it
    probes = [KLProbe(m, windows) for m in (stored, reference)]
    assert probes[0]._block_inputs is not None  # the fp32 block-wise path, not the bf16 whole forward
    for got, want in zip(probes[0].reference, probes[1].reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert probes[0].mean_kl(overlay) == pytest.approx(probes[1].mean_kl(overlay), rel=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_blockwise_evaluation_matches_whole_forwards(family: str) -> None:
    from allocator.evaluate.perplexity import _evaluate_whole, evaluate
    from allocator.model.blockwise import BlockwiseForward

    stored, reference = stored_pair(family)
    windows = torch.randint(2, 30, (10, 24), generator=torch.Generator().manual_seed(4))  # two chunks, the second partial
    name = "model.layers.0.self_attn.o_proj"
    overlay = {name: (reference.get_submodule(name).weight.detach() * 0.9).bfloat16().float()}
    assert BlockwiseForward(reference).check(windows[0])
    whole = _evaluate_whole(reference, windows, {"v": overlay}, progress=False)
    blockwise = evaluate(reference, windows, {"v": overlay}, progress=False)
    from_bf16 = evaluate(stored, windows, {"v": overlay}, progress=False)  # blocks in fp32: as the fp32 copy computes
    for results in (blockwise, from_bf16):
        for key in ("reference", "v"):
            assert results[key].tokens == whole[key].tokens
            assert results[key].perplexity == pytest.approx(whole[key].perplexity, rel=1e-5)
            assert results[key].kl == pytest.approx(whole[key].kl, rel=1e-3, abs=1e-9)
    assert whole["v"].kl > 0


def test_evaluation_falls_back_to_whole_forwards_outside_the_blocks() -> None:
    from allocator.evaluate.perplexity import evaluate
    from allocator.model.blockwise import BlockwiseForward

    _, reference = stored_pair()
    embeddings = {"model.embed_tokens": reference.model.embed_tokens.weight.detach() * 1.1}
    assert not BlockwiseForward(reference).handles(embeddings)
    windows = torch.randint(2, 30, (2, 16), generator=torch.Generator().manual_seed(5))
    results = evaluate(reference, windows, {"emb": embeddings}, progress=False)
    assert results["emb"].kl > 0


def test_released_float_copies_decode_to_the_same_weights() -> None:
    _, reference = stored_pair()
    samples = torch.randint(2, 30, (4, 32), generator=torch.Generator().manual_seed(6))
    names = list(quantizable_linears(reference))
    quantizers = {n: GPTQQuantizer(2, 32) for n in names}
    kept = quantize_model(reference, quantizers, samples, progress=False)
    lean = quantize_model(reference, quantizers, samples, progress=False, keep_dequantized=False)
    assert all(qt.dequantized.numel() == 0 for qt in lean.tensors.values())  # the stored forms alone
    view = lean.dequantized_weights()
    assert sorted(view) == sorted(names) and len(view) == len(names)
    for name in names:
        assert torch.equal(view[name], kept.tensors[name].dequantized)
    assert lean.storage_bits == kept.storage_bits
