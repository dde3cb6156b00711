"""Integration on the real SmolLM2-135M (dequantized from its shipped GGUF), on few tokens."""

import pytest

from allocator.corpus import load_corpus
from allocator.models import load_model
from allocator.pipeline import EvalSettings, compare_variants
from quantizers import GPTQQuantizer, RTNQuantizer

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_smollm2_loads_as_llama_with_30_blocks(smollm2) -> None:
    config = smollm2.model.config
    assert config.model_type == "llama" and config.num_hidden_layers == 30 and config.hidden_size == 576
    assert not smollm2.add_bos  # SmolLM2 windows start with text, not <|im_start|>


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
