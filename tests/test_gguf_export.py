"""GGUF export through llama.cpp's quantizer and evaluation in llama.cpp, on a tiny random llama.

The tiny model is written as a GGUF here (HF llama -> GGUF layout, q/k rows permuted for llama.cpp's
rope, a small sentencepiece-style vocabulary), so the checks cover: the F32 reference GGUF
reproducing the HF model's log-probabilities on the same token ids, per-tensor types from a bit map
(row-length fallbacks included) read back from the file, real bpw from tensor bytes, the importance
matrix, presets, and the CLI. Skipped without llama-cpp-python.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from allocator.cli import main  # noqa: E402
from allocator.errors import BitallocError  # noqa: E402
from allocator.evaluate.perplexity import next_token_logprobs  # noqa: E402
from allocator.gguf.export import export_bitmap, export_preset, preset_ftype, quantize_gguf  # noqa: E402
from allocator.gguf.files import LINEAR_TENSOR, float_gguf, measure_gguf  # noqa: E402
from allocator.gguf.fold import GGUFFold, write_folded_gguf  # noqa: E402
from allocator.gguf.ggml_types import effective_type, type_bpw  # noqa: E402
from allocator.gguf.imatrix import compute_imatrix  # noqa: E402
from allocator.gguf.llama_eval import REFERENCE, cpu_has_amx, evaluate_ggufs, load_llama, window_logprobs  # noqa: E402
from allocator.model.arch import gguf_tensor_name  # noqa: E402
from allocator.model.layers import quantizable_linears, swapped_weights  # noqa: E402
from allocator.model.loading import LoadedModel  # noqa: E402
from allocator.quantize.apply import quantize_with_scale_fold  # noqa: E402
from allocator.quantize.scalefold import FoldGroup, ScaleFold, ScaleFoldSettings, compute_scale_fold  # noqa: E402
from allocator.runtime.packed import save_quantized  # noqa: E402
from allocator.table.bitmap import BitMap, ModuleEntry, SolverRecord  # noqa: E402
from quantizers import RTNQuantizer  # noqa: E402

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 256, 320, 4, 2, 2
WORDS = ["▁the", "▁a", "▁of", "▁river", "▁city", "▁king", "▁music", "▁stone", "▁light", "▁north", "▁water", "▁war"]
VOCAB = ["<unk>", "<s>", "</s>", "<0x0A>", *WORDS] + [f"▁w{i}" for i in range(100)]


def _tiny_hf() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                         rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.08)
            # the "shipped" GGUF stores f16: keep the HF model on exactly those values
            p.copy_(p.half().float())
    model.config.use_cache = False
    return model


def _rope_rows(weight: torch.Tensor, heads: int) -> np.ndarray:
    """HF q/k rows -> llama.cpp's order (each head's two rotary halves interleaved)."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols).numpy()


def _write_gguf(model: LlamaForCausalLM, path: Path) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(VOCAB)
    writer.add_token_scores([0.0] * 4 + [-float(i) for i in range(len(VOCAB) - 4)])
    writer.add_token_types([2, 3, 3, 6] + [1] * (len(VOCAB) - 4))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    f16 = lambda t: t.numpy().astype(np.float16)  # noqa: E731
    writer.add_tensor("token_embd.weight", f16(sd["model.embed_tokens.weight"]))
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    writer.add_tensor("output.weight", f16(sd["lm_head.weight"]))
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"].numpy())
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"].numpy())
        writer.add_tensor(f"blk.{i}.attn_q.weight", _rope_rows(sd[p + "self_attn.q_proj.weight"], HEADS).astype(np.float16))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _rope_rows(sd[p + "self_attn.k_proj.weight"], KV_HEADS).astype(np.float16))
        writer.add_tensor(f"blk.{i}.attn_v.weight", f16(sd[p + "self_attn.v_proj.weight"]))
        writer.add_tensor(f"blk.{i}.attn_output.weight", f16(sd[p + "self_attn.o_proj.weight"]))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", f16(sd[p + "mlp.gate_proj.weight"]))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", f16(sd[p + "mlp.up_proj.weight"]))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", f16(sd[p + "mlp.down_proj.weight"]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[LlamaForCausalLM, Path]:
    model = _tiny_hf()
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny-llama.gguf"
    _write_gguf(model, path)
    return model, path


@pytest.fixture
def windows() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(4, len(VOCAB), (2, 64), generator=generator)


def _bitmap(model_path: Path) -> BitMap:
    entries = {
        "model.layers.0.self_attn.q_proj": ({"quantizer": "gptq", "bits": 2, "group_size": 128}, "q2_k"),
        "model.layers.0.mlp.down_proj": ({"quantizer": "gptq", "bits": 2, "group_size": 128}, "q4_0"),  # rows of 320
        "model.layers.1.self_attn.k_proj": ({"quantizer": "gptq", "bits": 4, "group_size": 128}, "q4_k"),
        "model.layers.1.self_attn.v_proj": ({"quantizer": "rtn", "bits": 3, "group_size": 128}, "q3_k"),
        "model.layers.1.mlp.up_proj": ({"quantizer": "billm"}, "iq1_s"),
        "model.layers.1.mlp.down_proj": ({"quantizer": "gptq", "bits": 4, "group_size": 64}, "q5_0"),  # rows of 320
    }
    shapes = {name: p.shape for name, p in _tiny_hf().named_parameters()}
    modules = {name: ModuleEntry(option=f"opt-{expected}", settings=settings, storage_bits=1000, numel=shapes[f"{name}.weight"].numel())
               for name, (settings, expected) in entries.items()}
    return BitMap(model=str(model_path), modules=modules, predicted_loss=0.0, loss_name="hessian_err", solver=SolverRecord("test"))


EXPECTED = {"blk.0.attn_q.weight": "q2_k", "blk.0.ffn_down.weight": "q4_0", "blk.1.attn_k.weight": "q4_k",
            "blk.1.attn_v.weight": "q3_k", "blk.1.ffn_up.weight": "iq1_s", "blk.1.ffn_down.weight": "q5_0"}


def test_type_rules() -> None:
    assert effective_type("q2_k", 576) == "q4_0" and effective_type("q2_k", 1536) == "q2_k"
    assert effective_type("q4_k", 640) == "q5_0" and effective_type("iq1_s", 576) == "iq4_nl"
    assert effective_type("q4_0", 40) == "f16"
    assert type_bpw("q2_k") == pytest.approx(2.625) and type_bpw("q4_0") == pytest.approx(4.5)
    assert type_bpw("iq1_s") == pytest.approx(1.5625) and type_bpw("q8_0") == pytest.approx(8.5)


def test_float_gguf_reproduces_hf_logprobs(tiny, windows, isolated_cache) -> None:
    model, path = tiny
    f32 = float_gguf(path)
    stats = measure_gguf(f32)
    assert set(stats.types.values()) == {"f32"} and stats.linear_bpw == 32.0
    llm = load_llama(f32, seqlen=64)
    try:
        ours = window_logprobs(llm, windows[0].numpy())
    finally:
        llm.close()
    reference = next_token_logprobs(model, windows[0][None])
    assert ours.shape == reference.shape
    kl = torch.nn.functional.kl_div(ours, reference, log_target=True, reduction="batchmean").item()
    assert kl < 1e-4, kl  # same weights, same token ids: llama.cpp and HF agree


def test_amx_cpus_load_without_extra_buffer_types(tiny, isolated_cache, tmp_path, monkeypatch) -> None:
    # ggml's AMX matmul segfaults in llama_decode (llama.cpp #20824): on AMX CPUs the weights must stay
    # in plain CPU buffers, and the library's defaults must be untouched afterwards.
    (tmp_path / "amx").write_text("processor : 0\nflags : fpu sse avx2 avx512f amx_bf16 amx_tile amx_int8\n")
    (tmp_path / "avx2").write_text("processor : 0\nflags : fpu sse avx2 fma\n")
    assert cpu_has_amx(tmp_path / "amx") and not cpu_has_amx(tmp_path / "avx2") and not cpu_has_amx(tmp_path / "none")
    import llama_cpp

    seen: list[bool] = []
    original = llama_cpp.llama_cpp.llama_model_default_params
    real_load = llama_cpp.llama_cpp.llama_model_load_from_file

    def recording_load(path, params):  # type: ignore[no-untyped-def]
        seen.append(bool(params.use_extra_bufts))
        return real_load(path, params)

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_load_from_file", recording_load)
    for amx in (True, False):
        monkeypatch.setattr("allocator.gguf.llama_eval.cpu_has_amx", lambda amx=amx: amx)
        load_llama(float_gguf(tiny[1]), seqlen=16).close()
    assert seen == [False, True]
    assert llama_cpp.llama_cpp.llama_model_default_params is original


def test_bitmap_export_types_bpw_and_run(tiny, windows, isolated_cache, tmp_path) -> None:
    model, path = tiny
    bitmap = _bitmap(path)
    with pytest.raises(BitallocError, match="importance matrix"):
        export_bitmap(bitmap, tmp_path / "no-imatrix.gguf")
    loaded = LoadedModel("tiny", model, tokenizer=None, add_bos=False)  # type: ignore[arg-type]
    imatrix = compute_imatrix(loaded, windows)
    assert imatrix["blk.1.ffn_up.weight"].shape == (HIDDEN,) and imatrix["blk.0.ffn_down.weight"].shape == (FFN,)
    result = export_bitmap(bitmap, tmp_path / "mixed.gguf", imatrix=imatrix)
    stats = result.stats
    for name, kind in EXPECTED.items():
        assert stats.types[name] == kind and result.plan[name].written == kind
    others = [n for n in stats.types if LINEAR_TENSOR.match(n) and n not in EXPECTED]
    assert others and all(stats.types[n] == "q8_0" for n in others)
    assert stats.types["token_embd.weight"] == "q8_0" and stats.types["output.weight"] == "q8_0"
    assert stats.types["blk.0.attn_norm.weight"] == "f32"
    reader = gguf.GGUFReader(result.path)
    numel = {t.name: int(t.n_elements) for t in reader.tensors if LINEAR_TENSOR.match(t.name)}
    expected_bits = sum(numel[n] * type_bpw(stats.types[n]) for n in numel)
    assert stats.linear_bpw == pytest.approx(expected_bits / sum(numel.values()))
    assert stats.file_bytes > stats.tensor_bytes
    results = evaluate_ggufs({"mixed": result.path}, windows, model, decode_tokens=4, progress=False)
    mixed = results["mixed"]
    assert np.isfinite(mixed.perplexity) and mixed.kl is not None and 0.0 < mixed.kl < 5.0
    assert results[REFERENCE].perplexity > 1.0 and mixed.decode_tok_s > 0


def test_presets_and_llama_cpp_refusal(tiny, isolated_cache, tmp_path) -> None:
    _, path = tiny
    q4 = export_preset("Q4_K_M", str(path), tmp_path / "q4km.gguf").stats
    linear = {kind for name, kind in q4.types.items() if LINEAR_TENSOR.match(name)}
    assert "q4_k" in linear and linear <= {"q4_k", "q5_0", "q6_k", "q8_0", "q5_k"}
    assert 4.0 < q4.linear_bpw < 6.6
    with pytest.raises(BitallocError, match="importance matrix"):
        export_preset("IQ2_XXS", str(path), tmp_path / "iq2.gguf")
    # llama.cpp's own refusal comes back as one line
    with pytest.raises(BitallocError, match="imatrix"):
        quantize_gguf(float_gguf(path), tmp_path / "iq2b.gguf", preset_ftype("IQ2_XXS"))
    assert not (tmp_path / "iq2b.gguf").exists()


def test_cli_export(tiny, isolated_cache, tmp_path, capsys) -> None:
    _, path = tiny
    out = tmp_path / "q3.gguf"
    assert main(["export", "--preset", "Q3_K_M", "--model", str(path), "--out", str(out)]) == 0
    assert "bpw over the decoder linears" in capsys.readouterr().out
    assert "q3_k" in measure_gguf(out).linear_type_counts()
    bitmap_path = tmp_path / "map.json"
    _bitmap(path).save(bitmap_path)
    assert main(["export", "--bitmap", str(bitmap_path), "--imatrix", "off", "--out", str(tmp_path / "m.gguf")]) == 2
    assert "importance matrix" in capsys.readouterr().err
    assert main(["export", "--preset", "Q7_Z", "--model", str(path), "--out", str(out)]) == 2
    assert main(["export", "--preset", "Q4_K_M", "--model", str(tmp_path / "missing.gguf"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("bitalloc: error:") for line in err)


# -- scale folding in GGUF coordinates -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_fold(tiny):
    """The tiny model's scale fold (alpha 0.5 at every site) and its overlay of folded HF tensors."""
    model, _ = tiny
    samples = torch.randint(4, len(VOCAB), (4, 64), generator=torch.Generator().manual_seed(2))
    fold, overlay = compute_scale_fold(model, samples, ScaleFoldSettings(alpha=0.5), progress=False)
    return fold, overlay


def _gguf_arrays(path: Path) -> dict[str, np.ndarray]:
    """The F32 tensors of a GGUF (rows x columns)."""
    reader = gguf.GGUFReader(path)
    return {t.name: np.array(t.data).reshape(tuple(int(n) for n in reversed(t.shape.tolist())))
            for t in reader.tensors if t.tensor_type == gguf.GGMLQuantizationType.F32}


def test_folded_gguf_holds_the_hf_fold_and_keeps_the_function(tiny, tiny_fold, windows, isolated_cache, tmp_path) -> None:
    model, path = tiny
    fold, overlay = tiny_fold
    assert len(fold.groups) == 4 * LAYERS and all(g.alpha == 0.5 for g in fold.groups)
    assert max(float(g.scales.log().abs().max()) for g in fold.groups) > 0.05  # the fold really moves weights
    reference = float_gguf(path)
    plan = write_folded_gguf(reference, fold, tmp_path / "folded.gguf")
    folded, plain = _gguf_arrays(tmp_path / "folded.gguf"), _gguf_arrays(reference)
    # every folded HF tensor, in GGUF's layout (q/k rows rope-permuted), is exactly what the GGUF holds
    gguf_names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for module, weight in overlay.items():
        block, local = module.split(".")[2], module.split(".", 3)[3]
        if local in gguf_names:
            name = f"blk.{block}.{gguf_names[local]}.weight"
            expected = weight.numpy()
        else:
            name = gguf_tensor_name(module) + ".weight"
            heads = {"self_attn.q_proj": HEADS, "self_attn.k_proj": KV_HEADS}.get(local)
            expected = _rope_rows(weight, heads) if heads else weight.numpy()
        np.testing.assert_allclose(folded[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)
        assert not np.allclose(folded[name], plain[name], rtol=1e-3), name
    assert len(plan.tensors) == len(overlay) == 9 * LAYERS
    untouched = set(plain) - plan.tensors
    assert {"token_embd.weight", "output.weight", "output_norm.weight"} <= untouched
    assert all(np.array_equal(folded[n], plain[n]) for n in untouched)
    # llama.cpp runs the folded file as the same function
    llm = load_llama(tmp_path / "folded.gguf", seqlen=64)
    try:
        ours = window_logprobs(llm, windows[0].numpy())
    finally:
        llm.close()
    reference_logprobs = next_token_logprobs(model, windows[0][None])
    kl = torch.nn.functional.kl_div(ours, reference_logprobs, log_target=True, reduction="batchmean").item()
    assert kl < 1e-4, kl


def test_folded_imatrix_is_the_folded_models(tiny, tiny_fold, windows, isolated_cache) -> None:
    model, path = tiny
    fold, overlay = tiny_fold
    import gguf as gguf_py

    plan = GGUFFold.from_record(fold, gguf_py.GGUFReader(float_gguf(path)))
    loaded = LoadedModel("tiny", model, tokenizer=None, add_bos=False)  # type: ignore[arg-type]
    reference = compute_imatrix(loaded, windows)
    with swapped_weights(model, overlay):
        expected = compute_imatrix(loaded, windows)
    folded = plan.imatrix(reference)
    assert set(folded) == set(reference)
    for name in reference:
        np.testing.assert_allclose(folded[name], expected[name], rtol=2e-3, atol=1e-7, err_msg=name)
    assert not np.allclose(reference["blk.0.attn_output.weight"], expected["blk.0.attn_output.weight"], rtol=1e-2)


def test_fold_refuses_another_models_record(tiny, tiny_fold, isolated_cache) -> None:
    _, path = tiny
    fold, _ = tiny_fold
    import gguf as gguf_py

    wrong = ScaleFold(fold.settings, [FoldGroup(0, g.source, g.targets, g.alpha, torch.cat([g.scales, g.scales])) for g in fold.groups])
    with pytest.raises(BitallocError, match="scales for"):
        GGUFFold.from_record(wrong, gguf_py.GGUFReader(float_gguf(path)))
    missing = ScaleFold(fold.settings, [FoldGroup(9, "model.layers.9.input_layernorm", ("model.layers.9.self_attn.q_proj",), 0.5,
                                                   fold.groups[0].scales)])
    with pytest.raises(BitallocError, match="does not have"):
        GGUFFold.from_record(missing, gguf_py.GGUFReader(float_gguf(path)))


def test_cli_export_of_a_folded_packed_model(tiny, isolated_cache, tmp_path, capsys) -> None:
    """``export --quantized`` takes the packed model's bit map and its saved scale fold."""
    model, path = tiny
    assignment = {name: RTNQuantizer(4, 128) for name in quantizable_linears(model)}
    samples = torch.randint(4, len(VOCAB), (4, 64), generator=torch.Generator().manual_seed(3))
    quantized = quantize_with_scale_fold(model, assignment, samples, ScaleFoldSettings(alpha=0.5), progress=False)
    packed = tmp_path / "packed"
    save_quantized(packed, str(path), quantized, {n: q.settings() for n, q in assignment.items()}, {n: "rtn-w4g128" for n in assignment})
    out = tmp_path / "folded-q4.gguf"
    assert main(["export", "--quantized", str(packed), "--out", str(out)]) == 0
    assert "scale fold (sf0.5): 8 of 8 sites folded" in capsys.readouterr().out
    stats = measure_gguf(out)
    assert stats.types["blk.0.attn_q.weight"] == "q4_k" and stats.types["blk.1.ffn_down.weight"] == "q5_0"  # rows of 320
    written = _gguf_arrays(out)
    np.testing.assert_allclose(written["blk.1.ffn_norm.weight"], quantized.float_weights["model.layers.1.post_attention_layernorm"].numpy(),
                               rtol=1e-6)
    assert not np.allclose(written["blk.1.ffn_norm.weight"], 1.0)  # the reference norm is all ones
    # a packed model carries its own fold: asking for another is one line, and nothing is written
    again = tmp_path / "again.gguf"
    assert main(["export", "--quantized", str(packed), "--scale-fold", "--out", str(again)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "carries its own scale fold" in err[0] and not again.exists()
    assert main(["export", "--quantized", str(tmp_path / "nothing"), "--out", str(again)]) == 2
    assert "no packed quantized model" in capsys.readouterr().err


# -- GGUF-native profile: llama.cpp's types as the options ----------------------------------


def test_ggml_type_profile_prices_real_bytes_and_exports_at_the_budget(tiny, windows, isolated_cache, tmp_path) -> None:
    from allocator.gguf.native_profile import profile_ggml_types
    from allocator.solvers import Budget, Constraints, solve

    model, path = tiny
    loaded = LoadedModel("tiny", model, tokenizer=None, add_bos=False)  # type: ignore[arg-type]
    types = ("q2_k", "q4_k", "iq4_nl", "q8_0")
    table = profile_ggml_types(loaded, str(path), windows[:, :32], None, types, progress=False)
    assert table.labels == list(types) and table.metadata["target"] == "gguf"
    down = table.names.index("model.layers.0.mlp.down_proj")  # rows of 320: no K-type fits
    q = table.names.index("model.layers.0.self_attn.q_proj")
    assert table.bits[down, 0] == table.bits[down, 1] == -1 and table.bits[down, 2] > 0
    assert table.bits[q, 0] == 256 * 84 * 8  # q2_k: 84 bytes per 256 weights, rows of 256, 256 of them
    kl = table.loss("kl")
    usable = (table.bits >= 0).all(axis=0)
    assert list(usable) == [False, False, True, True]
    assert np.nanmean(kl[:, 0]) > np.nanmean(kl[:, 1]) > np.nanmean(kl[:, 3]) >= 0
    assert profile_ggml_types(loaded, str(path), windows[:, :32], None, types, progress=False).bits.tolist() == table.bits.tolist()  # cached
    bitmap = solve(table, Budget.bpw(4.6), Constraints(loss="kl"), solver="ilp")
    assert {e.settings["quantizer"] for e in bitmap.modules.values()} == {"ggml"}
    result = export_bitmap(bitmap, tmp_path / "native.gguf", str(path))
    # the file holds exactly the solved types, so its real bpw over the linears is the bit map's
    assert result.stats.linear_bpw == pytest.approx(bitmap.predicted_bpw, rel=1e-9)
    assert all(result.stats.types[name] == p.requested for name, p in result.plan.items())
    assert bitmap.predicted_bpw <= 4.6


def test_cli_ggml_type_profile_refuses_bitalloc_options(capsys) -> None:
    assert main(["profile", "--ggml-types", "q4_k", "--measure-kl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "takes no --options" in err[0]


def test_cli_ggml_type_names_are_checked_before_anything_loads(capsys) -> None:
    from allocator.gguf.ggml_types import check_ggml_types

    assert check_ggml_types(["Q4_K", "q4_k", "iq4_nl"]) == ["q4_k", "iq4_nl"]
    assert main(["profile", "--model", "no-such-model-xyz", "--ggml-types", "q4_k", "q9_z"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown llama.cpp tensor type 'q9_z'" in err[0]


def test_fold_stays_off_sites_feeding_codebook_types(tiny, tiny_fold, windows, isolated_cache, tmp_path) -> None:
    """The bit map writes blk.1.ffn_up as iq1_s (a lattice codebook): the norm -> gate/up site of block 1 stays
    unfolded in the GGUF, every other site is folded."""
    model, path = tiny
    fold, overlay = tiny_fold
    loaded = LoadedModel("tiny", model, tokenizer=None, add_bos=False)  # type: ignore[arg-type]
    result = export_bitmap(_bitmap(path), tmp_path / "mixed-sf.gguf", imatrix=compute_imatrix(loaded, windows), scale_fold=fold)
    assert result.scale_fold and result.unfolded_sites == 1
    written, plain = _gguf_arrays(result.path), _gguf_arrays(float_gguf(path))
    np.testing.assert_array_equal(written["blk.1.ffn_norm.weight"], plain["blk.1.ffn_norm.weight"])
    np.testing.assert_allclose(written["blk.0.ffn_norm.weight"], overlay["model.layers.0.post_attention_layernorm"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(written["blk.1.attn_norm.weight"], overlay["model.layers.1.input_layernorm"].numpy(), rtol=1e-6)
