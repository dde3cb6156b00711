"""Integration on the real SmolLM2-135M (dequantized from its shipped GGUF), on few tokens."""

import pytest

from allocator.jobs.compare import EvalSettings, compare_variants
from allocator.model.corpus import load_corpus
from allocator.model.loading import load_model
from quantizers import GPTQQuantizer, RTNQuantizer

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_smollm2_loads_as_llama_with_30_blocks(smollm2) -> None:
    config = smollm2.model.config
    assert config.model_type == "llama" and config.num_hidden_layers == 30 and config.hidden_size == 576
    assert not smollm2.add_bos  # SmolLM2 windows start with text, not <|im_start|>


def test_gguf_dequantizes_once_into_a_bfloat16_cache_half_the_size(smollm2, isolated_cache) -> None:
    """--dtype bfloat16 makes its own float cache in bf16 (each tensor cast as it is dequantized): the fp32 reference's
    weights rounded to bf16, in half the bytes on disk; a second load reads that cache."""
    import torch

    loaded = load_model("smollm2-135m", torch.bfloat16)
    (directory,) = (isolated_cache / "models").iterdir()
    assert directory.name.endswith("-bfloat16")
    params = dict(loaded.model.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    reference = dict(smollm2.model.named_parameters())
    assert all(torch.equal(params[name], reference[name].to(torch.bfloat16)) for name in params)
    stored = (directory / "model.safetensors").stat().st_size
    numel = sum(p.numel() for p in params.values())
    assert 2 * numel <= stored < 2 * numel + (1 << 20)
    again = load_model("smollm2-135m", torch.bfloat16)
    assert [d.name for d in (isolated_cache / "models").iterdir()] == [directory.name]
    assert torch.equal(again.model.lm_head.weight, loaded.model.lm_head.weight)


def test_gptq_beats_rtn_at_3_bits_on_real_text(smollm2) -> None:
    # GPTQ needs a few thousand calibration tokens per Hessian (down_proj's is 1536 x 1536).
    settings = EvalSettings(seqlen=512, tokens=2048, samples=16)
    variants = {"rtn": RTNQuantizer(3, 128), "gptq": GPTQQuantizer(3, 128)}
    reference, rtn, gptq = compare_variants(smollm2, load_corpus("enwiki"), variants, settings, progress=False)
    assert 5 < reference.perplexity < 40  # a 135M model on Wikipedia prose
    assert reference.eval_tokens == 4 * 511
    # width 576 = 4 groups of 128 + 1 of 64 per row: 3 + 5 * (16 + 3) / 576 bits, down_proj (1536) fewer
    assert 3.14 < rtn.bpw == gptq.bpw < 3.17
    assert rtn.ppl_ratio > 2  # plain 3-bit RTN hurts this small model badly
    assert gptq.perplexity < 0.85 * rtn.perplexity and gptq.kl < rtn.kl
    assert gptq.model_mb < 0.4 * reference.model_mb


def test_lean_decoder_on_packed_smollm2_matches_transformers(smollm2) -> None:
    """The C decode step on the real model: logits of packed RTN-4 layers + an 8-bit head equal the HF
    model's, and greedy text equals transformers' generate (float decode activations)."""
    import copy

    import torch

    from allocator.model.layers import quantizable_linears
    from allocator.quantize.apply import QuantizedModel, quantize_model
    from allocator.quantize.head import quantize_head
    from allocator.runtime.decoder import LlamaDecoder
    from allocator.runtime.packed import install_quantized
    from quantizers.kernels import QuantLinear

    model = copy.deepcopy(smollm2.model)
    linears = quantizable_linears(model)
    install_quantized(model, quantize_model(model, {name: RTNQuantizer(4, 128) for name in linears}, progress=False))
    install_quantized(model, QuantizedModel(head=quantize_head(smollm2.model, 8)))
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.int8_activations = False
    prompt = smollm2.tokenizer("The river flows through the old city and", return_tensors="pt").input_ids
    decoder = LlamaDecoder(model, prompt.shape[1] + 12)
    assert decoder.native_step is not None
    with torch.inference_mode():
        reference = model(prompt).logits[0]
        model.config.use_cache = True
        expected = model.generate(prompt, max_new_tokens=8, do_sample=False)[0, prompt.shape[1]:].tolist()
    steps = torch.cat([decoder.forward(prompt[0, :4], all_logits=True)]
                      + [decoder.forward(prompt[0, i:i + 1], all_logits=True) for i in range(4, prompt.shape[1])])
    torch.testing.assert_close(steps, reference, rtol=1e-3, atol=1e-3 * float(reference.abs().max()))
    assert decoder.generate(prompt[0].tolist(), 8) == expected


def test_cli_export_of_scale_folded_smollm2_runs_in_llama_cpp(smollm2, tmp_path, capsys) -> None:
    """The folded model written as GGUF and quantized by llama.cpp still computes SmolLM2: its KL to
    the HF reference (which is not folded) stays at Q8_0's level; a wrong fold (a norm or a GQA
    column mapping off) would put it far above."""
    pytest.importorskip("llama_cpp")
    from tests.cli_helpers import run

    out = tmp_path / "sf-q8.gguf"
    code, stdout, err = run(capsys, "export", "--preset", "Q8_0", "--model", "smollm2-135m", "--out", str(out), "--scale-fold",
                            "--samples", "2", "--seqlen", "128", "--eval", "--tokens", "256", "--no-progress")
    assert code == 0, err
    assert "scale fold (sf0.5): 120 of 120 sites folded" in stdout
    line = next(line for line in stdout.splitlines() if line.strip().startswith(out.name))
    kl = float(line.split("KL ")[1].split()[0])
    assert kl < 0.01, line
