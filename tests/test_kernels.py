"""Packed low-bit weights and their CPU kernels: layout round trips, kernel vs. reference, QuantLinear,
and a packed model run through the kernels.

Kernel tests skip only when there is no C compiler at all; a compiler that fails to build the
kernels is a failure.
"""

from __future__ import annotations

import copy
import ctypes
import io
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from allocator.evaluate.perplexity import REFERENCE, evaluate, next_token_logprobs
from allocator.model.layers import quantizable_linears, swapped_weights
from allocator.model.loading import LoadedModel
from allocator.quantize.apply import QuantizedModel, quantize_model
from allocator.runtime.packed import (
    DEQUANTIZED,
    KERNEL,
    install_quantized,
    load_quantized,
    load_quantized_model,
    quantized_from_modules,
    save_quantized,
)
from allocator.table.options import quantizer_from_settings
from quantizers import RTNQuantizer, XNORQuantizer
from quantizers.kernels import build, ops
from quantizers.kernels.build import FLAG_SETS, KernelLibrary, find_compiler, kernel_library
from quantizers.kernels.layout import CHUNK, ChunkGeometry, KernelWeight, dequantize_reference, lut_tiles, pack_chunks, unpack_chunks
from quantizers.kernels.linear import QuantLinear
from tests.conftest import WORDS, tiny_llama, tiny_tokenizer

# (rows, cols, group_size): odd row counts, a shorter last group, groups and rows that are not
# multiples of 32 (padded chunks), one group per row, and a real SmolLM2 width.
SHAPES = [
    (13, 100, 32),  # last group of 4 columns
    (8, 96, 40),  # groups of 40 = 32 + 8 (every group padded), last group of 16
    (7, 77, None),  # one group per row, not a multiple of 32
    (33, 576, 128),  # SmolLM2 width: four groups of 128 and one of 64, no padding
    (5, 64, 256),  # group larger than the row
    (6, 300, None),  # one group of 10 chunks: three int8 activation blocks in a group; 2 rows past the last 4
    (5, 8256, 32),  # 258 groups: more than one window of the GEMV's stacked group scales
    (64, 576, 128),  # rows in LUT tiles of 32: the 1-bit int8 GEMV looks its products up
    (32, 100, 48),  # one LUT tile over padded groups
]
BITS = (1, 2, 3, 4, 8)  # 8: the LM head's width


def quantized_weight(rows: int, cols: int, group: int | None, bits: int, symmetric: bool = False, seed: int = 0):
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    return RTNQuantizer(bits, group, symmetric).quantize(weight)


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelLibrary]:
    """The kernels compiled from scratch into an empty cache; skipped only when no C compiler exists."""
    if find_compiler() is None:
        pytest.skip("no C compiler (cc/gcc/clang or $CC): the kernels cannot be built, the reference path is used")
    cache = tmp_path_factory.mktemp("kernel-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("BITALLOC_CACHE", str(cache))
    kernel_library.cache_clear()
    try:
        library = kernel_library()
        assert library is not None, "a C compiler is present but the kernels did not build (see the warning)"
        assert library.path.parent == cache / "kernels" and library.path.is_file()
        assert kernel_library() is library  # built once per process
        yield library
    finally:
        patch.undo()
        kernel_library.cache_clear()


# ----------------------------------------------------------------------------- layout


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rows,cols,group", SHAPES)
def test_chunk_layout_round_trips_codes(bits: int, rows: int, cols: int, group: int | None) -> None:
    geometry = ChunkGeometry(cols, group, bits)
    codes = np.random.default_rng(bits).integers(0, 1 << bits, size=(rows, cols), dtype=np.uint8)
    packed = pack_chunks(codes, geometry)
    assert packed.dtype == np.uint8 and packed.shape == (rows, geometry.row_bytes)
    assert geometry.row_bytes * 8 == geometry.padded_cols * bits  # bits per code exactly, 3-bit included
    assert np.array_equal(unpack_chunks(packed, geometry), codes)


def test_chunk_layout_places_each_element_where_documented() -> None:
    """One code at a time, against the table in quantizers/kernels/layout.py (not the packer's own logic)."""
    expected_bit = {
        4: lambda s, l: [(8 * (l + 8 * (s & 1)) + 4 * (s >> 1) + k) for k in range(4)],
        2: lambda s, l: [(8 * l + 2 * s + k) for k in range(2)],
        1: lambda s, l: [8 * (l % 4) + 2 * s + l // 4],  # element e = 8s + l: byte e % 4, bit e // 4
        3: lambda s, l: [8 * l + 2 * s, 8 * l + 2 * s + 1, 64 + 8 * (l % 4) + 2 * s + l // 4],
        8: lambda s, l: [8 * (8 * s + l) + k for k in range(8)],
    }
    for bits, where in expected_bit.items():
        geometry = ChunkGeometry(CHUNK, None, bits)
        for element in range(CHUNK):
            codes = np.zeros((1, CHUNK), dtype=np.uint8)
            codes[0, element] = (1 << bits) - 1
            stream = np.unpackbits(pack_chunks(codes, geometry)[0], bitorder="little")
            assert sorted(np.flatnonzero(stream).tolist()) == sorted(where(element // 8, element % 8)), (bits, element)


def test_3bit_pairs_place_each_element_where_documented() -> None:
    """Two chunks of a group share 24 bytes: nibble e holds A's code and B's high bit, then B's 2-bit plane."""
    geometry = ChunkGeometry(2 * CHUNK, None, 3)
    assert geometry.pair_roles.tolist() == [1, 2]
    nibble = lambda e: [8 * (e % 16) + 4 * (e // 16) + k for k in range(4)]  # noqa: E731
    for column in range(2 * CHUNK):
        codes = np.zeros((1, 2 * CHUNK), dtype=np.uint8)
        codes[0, column] = 7
        stream = np.unpackbits(pack_chunks(codes, geometry)[0], bitorder="little")
        e = column % CHUNK
        if column < CHUNK:
            expected = nibble(e)[:3]
        else:
            s, l = divmod(e, 8)
            expected = [128 + 8 * l + 2 * s, 128 + 8 * l + 2 * s + 1, nibble(e)[3]]
        assert sorted(np.flatnonzero(stream).tolist()) == sorted(expected), column
    # an odd last chunk of a group stays single; groups pair up on their own
    assert ChunkGeometry(96, 40, 3).pair_roles.tolist() == [1, 2, 1, 2, 0]
    assert ChunkGeometry(160, 96, 3).pair_roles.tolist() == [1, 2, 0, 1, 2]


def test_geometry_pads_only_short_groups() -> None:
    assert ChunkGeometry(576, 128, 3).row_bytes == 576 * 3 // 8  # no padding on SmolLM2's width
    assert ChunkGeometry(640, 128, 2).row_bytes == 640 * 2 // 8  # nor on Gemma3's
    short = ChunkGeometry(100, 32, 2)
    assert (short.groups, short.last_len, short.chunks) == (4, 4, 4) and short.padded_cols == 128
    assert list(short.column_positions[[0, 31, 32, 96, 99]]) == [0, 31, 32, 96, 99]
    padded = ChunkGeometry(96, 40, 4)  # groups of 40 take two chunks each
    assert padded.chunks == 5 and list(padded.column_positions[[39, 40, 80, 95]]) == [39, 64, 128, 143]
    for bad in [(64, 32, 5), (64, 0, 2), (0, 32, 2)]:
        with pytest.raises(ValueError):
            ChunkGeometry(*bad)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_kernel_weight_converts_exactly_both_ways(bits: int, symmetric: bool) -> None:
    for rows, cols, group in SHAPES:
        qt = quantized_weight(rows, cols, group, bits, symmetric)
        weight = KernelWeight.from_quantized(qt)
        assert torch.equal(dequantize_reference(weight), qt.dequantized)
        back = weight.to_quantized()
        assert back.format == qt.format and back.meta == qt.meta and back.shape == qt.shape
        assert set(back.stored) == set(qt.stored)
        for name, tensor in qt.stored.items():
            assert torch.equal(back.stored[name], tensor), (bits, symmetric, rows, cols, group, name)


def test_kernel_weight_refuses_other_formats() -> None:
    from quantizers import BiLLMQuantizer

    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="uniform_grid"):
        KernelWeight.from_quantized(BiLLMQuantizer().quantize(weight, torch.eye(64)))


# ----------------------------------------------------------------------------- kernels


def error_bound(x: torch.Tensor, weight: KernelWeight) -> torch.Tensor:
    """Float32 rounding allowance for x @ W^T computed as s * (sum x q - z sum x) in any order."""
    codes = weight.unpacked_codes().float()
    columns = torch.arange(weight.shape[1]) // weight.geometry.size
    scales = weight.params[..., 0].float()[:, columns].abs()
    zeros = weight.params[..., 1].float()[:, columns].abs()
    return 2e-5 * (x.abs().double() @ ((codes + zeros) * scales).double().T) + 1e-6


@pytest.mark.parametrize("bits", BITS)
def test_c_dequantize_matches_reference_exactly(lib: KernelLibrary, bits: int) -> None:
    for rows, cols, group in SHAPES:
        assert lib.lib.bq_row_bytes(cols, group or 0, bits) == ChunkGeometry(cols, group, bits).row_bytes  # C and Python agree
        for symmetric in (False, True):
            weight = KernelWeight.from_quantized(quantized_weight(rows, cols, group, bits, symmetric))
            assert torch.equal(ops.dequantize(weight, lib), dequantize_reference(weight)), (rows, cols, group, symmetric)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("tokens", [1, 3, 8, 13, 64, 65])  # GEMV, GEMM tiles and tails, the dequantize fallback
def test_kernel_matmul_matches_reference(lib: KernelLibrary, bits: int, tokens: int) -> None:
    generator = torch.Generator().manual_seed(tokens)
    for rows, cols, group in SHAPES:
        weight = KernelWeight.from_quantized(quantized_weight(rows, cols, group, bits, symmetric=bits == 1))
        x = torch.randn(tokens, cols, generator=generator)
        bias = torch.randn(rows, generator=generator)
        exact = x.double() @ dequantize_reference(weight).double().T
        got = ops.matmul(x, weight, library=lib)
        assert got.dtype == torch.float32 and got.shape == (tokens, rows)
        assert ((got.double() - exact).abs() <= error_bound(x, weight)).all(), (rows, cols, group)
        with_bias = ops.matmul(x, weight, bias, library=lib)
        assert ((with_bias.double() - exact - bias.double()).abs() <= error_bound(x, weight) + 1e-6).all()
        reference = ops.reference_matmul(x, weight)
        torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))


@pytest.mark.parametrize("bits", BITS)
def test_int8_activation_gemv_is_exact_for_the_rounded_input(lib: KernelLibrary, bits: int) -> None:
    """The decode GEMV equals the float product of the weight with round_activations_int8(x)."""
    generator = torch.Generator().manual_seed(bits)
    for rows, cols, group in SHAPES:
        for symmetric in (False, True):
            weight = KernelWeight.from_quantized(quantized_weight(rows, cols, group, bits, symmetric))
            x = torch.randn(1, cols, generator=generator) * 4
            x[0, : cols // 3] = 0.0  # whole chunks of zeros have scale 0
            bias = torch.randn(rows, generator=generator)
            rounded = ops.round_activations_int8(x, weight.geometry)
            exact = rounded.double() @ dequantize_reference(weight).double().T + bias.double()
            got = ops.matmul(x, weight, bias, library=lib, int8_activations=True)
            assert ((got.double() - exact).abs() <= error_bound(rounded, weight) + 1e-6).all(), (rows, cols, group)
            assert not torch.equal(rounded, x)  # the rounding is really applied


def test_lut_tiles_hold_the_chunk_layout_codes_and_params() -> None:
    """Against the docstring of layout.lut_tiles, element by element (not the builder's own reshapes)."""
    weight = KernelWeight.from_quantized(quantized_weight(64, 100, 48, 1))
    tiles = lut_tiles(weight)
    assert tiles is not None
    codes, params = tiles[0].numpy(), tiles[1]
    padded = np.zeros((64, weight.geometry.padded_cols), dtype=np.uint8)
    padded[:, weight.geometry.column_positions] = weight.unpacked_codes().numpy()
    for row in (0, 17, 40, 63):
        tile, j = divmod(row, 32)
        for pair in range(weight.geometry.padded_cols // 8):
            byte = int(codes[tile, pair, j])
            for half in range(2):
                index = (byte >> (4 * half)) & 15
                for i in range(4):
                    assert (index >> i) & 1 == padded[row, 8 * pair + 4 * half + i]
        for g in range(weight.geometry.groups):
            assert params[tile, g, 0, j] == weight.params[row, g, 0] and params[tile, g, 1, j] == weight.params[row, g, 1]
    assert lut_tiles(KernelWeight.from_quantized(quantized_weight(48, 100, 48, 1))) is None  # rows not a multiple of 32
    assert lut_tiles(KernelWeight.from_quantized(quantized_weight(64, 100, 48, 2))) is None  # not 1-bit


def test_lut_gemv_agrees_with_the_chunk_gemv(lib: KernelLibrary) -> None:
    """Same int8 activations, same integer dot products: the two 1-bit paths differ only in float rounding."""
    generator = torch.Generator().manual_seed(3)
    for rows, cols, group, symmetric in ((64, 576, 128, True), (32, 300, None, False), (96, 640, 64, False)):
        weight = KernelWeight.from_quantized(quantized_weight(rows, cols, group, 1, symmetric))
        x = torch.randn(1, cols, generator=generator) * 3
        prepared = ops.PreparedWeight(lib, weight, None, int8_activations=True)
        assert prepared._lut is not None
        with_lut = prepared(x)
        plain = build.WeightDescriptor(weight.codes.data_ptr(), weight.params.data_ptr(), None, rows, cols,
                                       weight.geometry.kernel_group_size, 1)
        without = torch.empty(1, rows)
        assert lib.lib.bq_gemv_i8_desc(ctypes.addressof(plain), x.data_ptr(), without.data_ptr()) == 0
        rounded = ops.round_activations_int8(x, weight.geometry)
        torch.testing.assert_close(with_lut, without, rtol=0, atol=float(error_bound(rounded, weight).max()))
        assert not torch.equal(with_lut, torch.zeros_like(with_lut))


@pytest.mark.parametrize(
    "cols,group,blocks",
    [
        (100, 48, ((0, 48), (48, 96), (96, 100))),  # groups of 48, 48, 4 columns: one block each
        (300, None, ((0, 128), (128, 256), (256, 300))),  # one group of 10 chunks: blocks of 4, 4, 2 chunks
        (512, 256, ((0, 128), (128, 256), (256, 384), (384, 512))),
    ],
)
def test_int8_rounding_reference_follows_the_activation_blocks(cols: int, group: int | None, blocks: tuple) -> None:
    geometry = ChunkGeometry(cols, group, 2)
    x = torch.randn(3, cols, generator=torch.Generator().manual_seed(0))
    rounded = ops.round_activations_int8(x, geometry)
    for start, stop in blocks:
        block = x[:, start:stop]
        step = block.abs().amax(dim=-1, keepdim=True) / 127
        assert ((rounded[:, start:stop] - block).abs() <= step / 2 * (1 + 1e-6)).all()
        codes = rounded[:, start:stop] / step
        torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
        assert (codes.abs() <= 127 + 1e-4).all()
        assert (codes.abs().amax(dim=-1) > 127 - 1e-4).all()  # the block's largest |x| maps to 127
    assert torch.equal(ops.round_activations_int8(torch.zeros(2, cols), geometry), torch.zeros(2, cols))


def test_int8_activations_apply_to_single_tokens_only(lib: KernelLibrary) -> None:
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(0))
    for bits in BITS:
        weight = KernelWeight.from_quantized(quantized_weight(24, 96, 32, bits))
        several = ops.matmul(x, weight, library=lib, int8_activations=True)
        assert torch.equal(several, ops.matmul(x, weight, library=lib))  # prefill: float activations
        single = ops.matmul(x[:1], weight, library=lib, int8_activations=True)
        assert not torch.equal(single, ops.matmul(x[:1], weight, library=lib))


def test_kernel_results_do_not_depend_on_thread_count(lib: KernelLibrary) -> None:
    """Every output row is computed whole by one thread, so threads change nothing, not even rounding."""
    weight = KernelWeight.from_quantized(quantized_weight(301, 576, 128, 3))
    x = torch.randn(9, 576, generator=torch.Generator().manual_seed(0))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = [ops.matmul(x[:1], weight, library=lib), ops.matmul(x, weight, library=lib),
                  ops.matmul(x[:1], weight, library=lib, int8_activations=True)]
        torch.set_num_threads(2)
        multi = [ops.matmul(x[:1], weight, library=lib), ops.matmul(x, weight, library=lib),
                 ops.matmul(x[:1], weight, library=lib, int8_activations=True)]
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(single, multi))


def test_portable_build_without_simd_or_openmp_agrees(lib: KernelLibrary) -> None:
    """The fallback C path (no -march=native, no OpenMP) computes the same products."""
    portable = build._load(build._build(lib.compiler, FLAG_SETS[-1]), lib.compiler, FLAG_SETS[-1])
    if build.platform.machine() in {"x86_64", "AMD64"}:
        assert portable.simd == "portable" and lib.simd == "avx2"
    for bits in BITS:
        for rows, cols, group in SHAPES[:3]:
            weight = KernelWeight.from_quantized(quantized_weight(rows, cols, group, bits))
            assert torch.equal(ops.dequantize(weight, portable), dequantize_reference(weight))
            for tokens in (1, 5):
                x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens))
                exact = x.double() @ dequantize_reference(weight).double().T
                assert ((ops.matmul(x, weight, library=portable).double() - exact).abs() <= error_bound(x, weight)).all()
            x = torch.randn(1, cols, generator=torch.Generator().manual_seed(bits))
            rounded = ops.round_activations_int8(x, weight.geometry)
            exact = rounded.double() @ dequantize_reference(weight).double().T
            got = ops.matmul(x, weight, library=portable, int8_activations=True)
            assert ((got.double() - exact).abs() <= error_bound(rounded, weight)).all()


def test_without_compiler_warns_once_and_uses_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    qt = quantized_weight(12, 64, 32, 2)
    module = QuantLinear.from_quantized(qt, torch.randn(12))
    x = torch.randn(2, 64)
    monkeypatch.setattr(build, "find_compiler", lambda: None)
    kernel_library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no C compiler"):
            assert kernel_library() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the warning is given once, not per call
            assert kernel_library() is None
            with torch.no_grad():
                out = module(x)
        assert torch.equal(out, F.linear(x, qt.dequantized, module.bias))
    finally:
        kernel_library.cache_clear()


def test_kernels_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(build.DISABLE_ENV, "0")
    kernel_library.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert kernel_library() is None
    finally:
        kernel_library.cache_clear()


# ----------------------------------------------------------------------------- QuantLinear


@pytest.mark.parametrize("bits", BITS)
def test_quant_linear_computes_the_dequantized_linear(lib: KernelLibrary, bits: int) -> None:
    qt = quantized_weight(40, 96, 40, bits)
    bias = torch.randn(40)
    module = QuantLinear.from_quantized(qt, bias)
    assert torch.equal(module.dequantize(), qt.dequantized)
    geometry = ChunkGeometry(96, 40, bits)
    for int8_activations in (True, False):
        module.int8_activations = int8_activations
        for shape in [(1, 1, 96), (2, 7, 96), (96,), (3, 70, 96)]:  # decode, prefill, an unbatched vector, the fallback
            x = torch.randn(*shape)
            with torch.no_grad():
                out = module(x)
            decode_input = ops.round_activations_int8(x, geometry) if int8_activations and x.numel() == 96 else x
            expected = F.linear(decode_input, qt.dequantized, bias)
            assert out.shape == expected.shape
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    half = module(torch.randn(2, 3, 96, dtype=torch.bfloat16))
    assert half.dtype == torch.bfloat16 and half.shape == (2, 3, 40)


def test_quant_linear_passes_gradients_to_its_input(lib: KernelLibrary) -> None:
    qt = quantized_weight(16, 64, 32, 3)
    module = QuantLinear.from_quantized(qt)
    x = torch.randn(4, 64, requires_grad=True)
    module(x).sum().backward()
    torch.testing.assert_close(x.grad, qt.dequantized.sum(dim=0).expand(4, 64))


def test_loading_into_a_one_bit_module_rebuilds_its_lut_tiles(lib: KernelLibrary) -> None:
    """load_state_dict copies into the same buffers: the LUT tiles derived from them must not survive it."""
    module = QuantLinear.from_quantized(quantized_weight(64, 256, 128, 1, seed=1))
    other = QuantLinear.from_quantized(quantized_weight(64, 256, 128, 1, seed=2))
    x = torch.randn(1, 256)
    with torch.no_grad():
        module(x)  # binds the kernels and builds the tiles of the first weight
        assert module.lut_tiles() is not None
        module.load_state_dict(other.state_dict())
        assert torch.equal(module(x), other(x))


def test_quant_linear_state_dict_round_trip(lib: KernelLibrary) -> None:
    qt = quantized_weight(24, 100, 32, 3, seed=1)
    module = QuantLinear.from_quantized(qt, torch.randn(24))
    state = module.state_dict()
    assert set(state) == {"codes", "params", "bias"} and state["codes"].dtype == torch.uint8
    fresh = QuantLinear(100, 24, bits=3, group_size=32)
    x = torch.randn(3, 100)
    with torch.no_grad():
        before = fresh(x)  # binds the zero buffers first: loading must rebind or update in place
        fresh.load_state_dict(state)
        assert torch.equal(fresh(x), module(x)) and not torch.equal(before, fresh(x))
        fresh.load_state_dict(state, assign=True)  # replaced buffers get a new binding
        assert torch.equal(fresh(x), module(x))
    for name, tensor in qt.stored.items():
        assert torch.equal(fresh.to_quantized().stored[name], tensor)
    # a module that has run (and so holds a pointer binding) still copies and pickles
    twin = copy.deepcopy(fresh)
    buffer = io.BytesIO()
    torch.save(fresh, buffer)
    buffer.seek(0)
    unpickled = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(twin(x), module(x)) and torch.equal(unpickled(x), module(x))
    assert twin.codes.data_ptr() != fresh.codes.data_ptr()


# ----------------------------------------------------------------------------- a packed model


MODEL_SETTINGS = [
    {"quantizer": "rtn", "bits": 2, "group_size": 32},
    {"quantizer": "gptq", "bits": 3, "group_size": 40},  # padded groups inside a real model
    {"quantizer": "rtn", "bits": 4, "group_size": None, "symmetric": True},
    {"quantizer": "xnor", "group_size": 64},
    {"quantizer": "gptq", "bits": 3, "group_size": 64},
    {"quantizer": "billm"},  # no kernel for this format: runs dequantized
    {"quantizer": "rtn", "bits": 1, "group_size": 32},
]


def test_packed_model_runs_on_kernels_with_the_simulated_perplexity(lib: KernelLibrary, tmp_path) -> None:
    reference = tiny_llama()
    names = list(quantizable_linears(reference))
    assignment = {name: quantizer_from_settings(MODEL_SETTINGS[i % len(MODEL_SETTINGS)]) for i, name in enumerate(names)}
    samples = torch.randint(2, len(WORDS) + 2, (4, 32), generator=torch.Generator().manual_seed(0))
    quantized = quantize_model(reference, assignment, samples, progress=False)
    save_quantized(tmp_path / "packed", "tiny", quantized, {n: q.settings() for n, q in assignment.items()})

    loaded = LoadedModel("tiny", tiny_llama(), tiny_tokenizer(), add_bos=False)
    run = load_quantized_model(tmp_path / "packed", loaded)
    assert run.loaded is loaded and set(run.kinds) == set(names)
    for name, kind in run.kinds.items():
        module = dict(loaded.model.named_modules())[name]
        fmt = quantized.tensors[name].format
        assert (kind == KERNEL) == (fmt == "uniform_grid") and isinstance(module, QuantLinear) == (kind == KERNEL)
    assert DEQUANTIZED in run.kinds.values() and list(run.kinds.values()).count(KERNEL) >= 10

    windows = torch.randint(2, len(WORDS) + 2, (3, 24), generator=torch.Generator().manual_seed(1))
    simulated = evaluate(reference, windows, {"simulated": quantized.dequantized_weights()}, progress=False)["simulated"]
    on_kernels = evaluate(loaded.model, windows, {}, progress=False)[REFERENCE]
    assert on_kernels.perplexity == pytest.approx(simulated.perplexity, rel=1e-4)
    with torch.inference_mode(), swapped_weights(reference, quantized.dequantized_weights()):
        expected = next_token_logprobs(reference, windows[:1])
        got = next_token_logprobs(loaded.model, windows[:1])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        generated = loaded.model.generate(windows[:1, :8], max_new_tokens=6, do_sample=False, use_cache=True)
    assert generated.shape == (1, 14) and torch.equal(generated[:, :8], windows[:1, :8])

    # the packed weights read back out of the running model are the saved ones, byte for byte
    from_modules = quantized_from_modules(loaded.model)
    assert set(from_modules.tensors) == {n for n, k in run.kinds.items() if k == KERNEL}
    disk = load_quantized(tmp_path / "packed").quantized
    for name, qt in from_modules.tensors.items():
        assert qt.meta == disk.tensors[name].meta and qt.storage_bits == disk.tensors[name].storage_bits
        assert all(torch.equal(qt.stored[k], disk.tensors[name].stored[k]) for k in disk.tensors[name].stored), name
    # ... and saving them from the modules then loading again gives identical modules
    save_quantized(tmp_path / "again", "tiny", from_modules, {n: assignment[n].settings() for n in from_modules.tensors})
    again = tiny_llama()
    kinds = install_quantized(again, load_quantized(tmp_path / "again").quantized)
    assert set(kinds.values()) == {KERNEL}
    modules_again = dict(again.named_modules())
    for name in from_modules.tensors:
        first, second = dict(loaded.model.named_modules())[name], modules_again[name]
        assert torch.equal(first.codes, second.codes) and torch.equal(first.params, second.params)


def test_install_refuses_a_mismatched_model() -> None:
    model = tiny_llama()
    name = next(iter(quantizable_linears(model)))
    quantized = quantize_model(model, {name: XNORQuantizer(32)}, progress=False)
    quantized.tensors["model.layers.9.mlp.up_proj"] = quantized.tensors.pop(name)
    from allocator.errors import BitallocError

    with pytest.raises(BitallocError, match="not a quantizable linear"):
        install_quantized(tiny_llama(), quantized)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_lm_head_saves_loads_and_runs(lib: KernelLibrary, tmp_path, bits: int) -> None:
    from allocator.evaluate.accounting import model_size_bytes
    from allocator.quantize.head import head_name, quantize_head

    reference = tiny_llama()
    reference.config.tie_word_embeddings = True
    reference.tie_weights()
    assert reference.lm_head.weight is reference.model.embed_tokens.weight
    names = list(quantizable_linears(reference))
    assignment = {name: quantizer_from_settings({"quantizer": "rtn", "bits": 2, "group_size": 32}) for name in names}
    quantized = quantize_model(reference, assignment, progress=False)
    quantized.head = quantize_head(reference, bits)
    assert list(quantized.head) == [head_name(reference)] == ["lm_head"]
    bpw_without_head = quantized.bits_per_weight
    save_quantized(tmp_path / "packed", "tiny", quantized, {n: q.settings() for n, q in assignment.items()})
    disk = load_quantized(tmp_path / "packed")
    assert disk.config["schema_version"] == 3 and disk.quantized.bits_per_weight == bpw_without_head
    assert torch.equal(disk.quantized.head["lm_head"].dequantized, quantized.head["lm_head"].dequantized)

    # the tied embedding keeps its float rows; the head is stored on its own, once, in the size
    with_head = model_size_bytes(reference, quantized)
    without_head = model_size_bytes(reference, QuantizedModel(tensors=quantized.tensors))
    assert abs(with_head - without_head - quantized.head["lm_head"].storage_bits / 8) <= 1

    tied_model = tiny_llama()
    tied_model.config.tie_word_embeddings = True
    tied_model.tie_weights()
    loaded = LoadedModel("tiny", tied_model, tiny_tokenizer(), add_bos=False)
    run = load_quantized_model(tmp_path / "packed", loaded)
    assert run.kinds["lm_head"] == KERNEL and isinstance(loaded.model.lm_head, QuantLinear)
    assert not isinstance(loaded.model.model.embed_tokens.weight, QuantLinear)
    windows = torch.randint(2, len(WORDS) + 2, (2, 24), generator=torch.Generator().manual_seed(1))
    simulated = evaluate(reference, windows, {"simulated": quantized.dequantized_weights()}, progress=False)["simulated"]
    on_kernels = evaluate(loaded.model, windows, {}, progress=False)[REFERENCE]
    assert on_kernels.perplexity == pytest.approx(simulated.perplexity, rel=1e-4)
    float_head = evaluate(reference, windows, {"from modules": quantized_from_modules(loaded.model).dequantized_weights()},
                          progress=False)
    assert set(quantized_from_modules(loaded.model).head) == {"lm_head"}
    assert float_head["from modules"].perplexity == pytest.approx(simulated.perplexity, rel=1e-4)
    # the reference itself is untouched by the evaluation overlays (still tied)
    assert reference.lm_head.weight is reference.model.embed_tokens.weight


def test_malformed_head_entries_get_one_line_errors(tmp_path) -> None:
    import json

    from allocator.errors import BitallocError
    from allocator.quantize.head import quantize_head
    from allocator.runtime.packed import CONFIG_FILE, check_float_weights

    reference = tiny_llama()
    name = next(iter(quantizable_linears(reference)))
    quantized = quantize_model(reference, {name: XNORQuantizer(32)}, progress=False)
    quantized.head = quantize_head(reference, 8)
    save_quantized(tmp_path / "good", "tiny", quantized, {name: XNORQuantizer(32).settings()})
    config = json.loads((tmp_path / "good" / CONFIG_FILE).read_text())
    cases = {
        "shape": ([50], "malformed entry"), "meta": (None, "malformed entry"), "tensors": (None, "malformed entry"),
    }
    for key, (value, message) in cases.items():
        broken = json.loads(json.dumps(config))
        broken["head"]["lm_head"][key] = value
        target = tmp_path / f"bad-{key}"
        target.mkdir()
        (target / CONFIG_FILE).write_text(json.dumps(broken))
        (target / "quantized.safetensors").write_bytes((tmp_path / "good" / "quantized.safetensors").read_bytes())
        with pytest.raises(BitallocError, match=message) as error:
            load_quantized(target)
        assert "\n" not in str(error.value)
    # a head entry that names another module of the same shape (the input embedding) is refused
    renamed = QuantizedModel(tensors=quantized.tensors, head={"model.embed_tokens": quantized.head["lm_head"]})
    with pytest.raises(BitallocError, match="not this model's LM head"):
        check_float_weights(renamed, reference, "test")
