"""GGUF export: a bit map, or one of llama.cpp's own presets, as a GGUF file that llama.cpp runs.

Path (every step from the same float reference that bitalloc evaluates against):

1. **float GGUF** (:func:`float_gguf`): the model's shipped GGUF with every tensor dequantized to
   F32 (``gguf.quants.dequantize``) and all its metadata (architecture, hyper-parameters,
   tokenizer) copied, cached under ``$BITALLOC_CACHE/gguf``. The tensors stay in llama.cpp's own
   layout (q/k rows keep GGUF's rope permutation), so no HF -> GGUF conversion is involved; the
   values are exactly the reference weights bitalloc's HF model holds.
2. **quantize** (:func:`quantize_gguf`) with llama.cpp's own quantizer through llama-cpp-python's C
   API (``llama_model_quantize``): a preset's ``ftype``, or, for a bit map, one exact-name tensor
   override per module (``tt_overrides``) with the type of :func:`tensor_plan`; optionally an
   importance matrix (``imatrix``) = per input column mean of x^2 of each linear's calibration
   inputs (:func:`compute_imatrix`; the diagonal of ``allocator.model.calibration`` 's Hessian / 2).
3. **measure** (:func:`measure_gguf`): real bits per weight from the tensor bytes of the written
   file, for the decoder linears and for the whole file.

llama.cpp requantizes the float weights itself: a bit map fixes each linear's *type*, not
bitalloc's codes (GPTQ/BiLLM results are not carried over; llama.cpp's formats cannot store them).

Option -> ggml type (:func:`allocator.table.bitmap.ggml_type`), then llama.cpp's row-length rule
(:data:`ROW_FALLBACK`): K- and IQ-types need rows (input width) that are a multiple of 256; other rows
get a 32-block type. Bits per weight of each type = block bytes x 8 / block size:

=========================  ===============  =================================  ========
option                     requested        rows % 256 != 0 (SmolLM2 576,       bpw
                                            Gemma3 640)
=========================  ===============  =================================  ========
1-bit family               iq1_s  (1.5625)  iq4_nl                             4.5
2-bit grid                 q2_k   (2.625)   q4_0                               4.5
3-bit grid                 q3_k   (3.4375)  q4_0                               4.5
4-bit grid                 q4_k   (4.5)     q5_0                               5.5
5 / 6-bit                  q5_k / q6_k      q5_1 (6.0) / q8_0 (8.5)
8-bit                      q8_0   (8.5)     q8_0                               8.5
float                      f16    (16)      f16                                16
=========================  ===============  =================================  ========

On SmolLM2 only ``ffn_down`` (input 1536) keeps K/IQ types; on Gemma3 ``attn_output`` (1024) and
``ffn_down`` (2048) do. So below 4 bpw these models are not expressible in llama.cpp's formats, and
:func:`measure_gguf` reports what the file really holds.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from allocator.errors import BitallocError
from allocator.gguf.constants import DEFAULT_EMBEDDING_TYPE, GGML_LOG_LEVEL_ERROR, IMATRIX_PRESETS, IMATRIX_TYPES, PRESETS
from allocator.gguf.files import GGUFStats, float_gguf, gguf_tensor_shapes, measure_gguf, source_gguf
from allocator.gguf.fold import GGUFFold, without_codebook_sites, write_folded_gguf
from allocator.gguf.ggml_types import effective_type, ggml_type, quant_type
from allocator.model.arch import gguf_tensor_name
from allocator.storage import atomic_path, cache_dir
from allocator.table.bitmap import BitMap

if TYPE_CHECKING:
    from allocator.quantize.scalefold import ScaleFold

log = logging.getLogger(__name__)


# -- types ----------------------------------------------------------------------------------


# -- the float GGUF -------------------------------------------------------------------------


# -- plans: which type each tensor gets ------------------------------------------------------


@dataclass(frozen=True)
class TensorPlan:
    """What a bit map asks for one GGUF tensor and what llama.cpp will write."""

    module: str
    option: str
    requested: str
    written: str
    row_length: int


def tensor_plan(bitmap: BitMap, shapes: Mapping[str, Sequence[int]]) -> dict[str, TensorPlan]:
    """GGUF tensor name -> :class:`TensorPlan` for every module of ``bitmap``; a module the GGUF does
    not have, or has with another weight count, is a one-line :class:`BitallocError` (a map for another
    model). ``shapes`` may come from the shipped GGUF: its F32 copy has the same names and shapes."""
    plan: dict[str, TensorPlan] = {}
    for module, entry in bitmap.modules.items():
        tensor = gguf_tensor_name(module) + ".weight"
        if tensor not in shapes:
            raise BitallocError(f"bit map module {module} has no tensor {tensor} in this GGUF (another model?)")
        if math.prod(shapes[tensor]) != entry.numel:
            raise BitallocError(f"bit map module {module} has {entry.numel} weights, this GGUF's {tensor} has "
                                f"{math.prod(shapes[tensor])} (another model?)")
        requested = ggml_type(entry.settings)
        row = int(shapes[tensor][0])
        plan[tensor] = TensorPlan(module, entry.option, requested, effective_type(requested, row), row)
    return plan


# -- importance matrix ----------------------------------------------------------------------


# -- llama.cpp's quantizer ------------------------------------------------------------------


def require_llama_cpp():  # -> module llama_cpp
    """Import llama-cpp-python, or explain in one line how to get it."""
    try:
        import llama_cpp
    except ImportError:
        raise BitallocError("GGUF export and llama.cpp evaluation need llama-cpp-python: pip install 'bitalloc[gguf]'") from None
    _install_log_sink(llama_cpp)
    return llama_cpp


_LOG_SINK: list[Any] = []
_ERRORS: list[str] = []


def _install_log_sink(llama_cpp: Any) -> None:
    """Route llama.cpp's log to Python logging (debug) and keep its error lines for our messages."""
    if _LOG_SINK:
        return
    cpp_log = logging.getLogger("bitalloc.llama_cpp")

    @llama_cpp.llama_log_callback
    def sink(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        message = text.decode("utf-8", errors="replace").rstrip()
        if level == GGML_LOG_LEVEL_ERROR and message:
            _ERRORS.append(message)
            del _ERRORS[:-20]
        if message:
            cpp_log.debug("%s", message)

    _LOG_SINK.append(sink)  # the callback must outlive every call into the library
    llama_cpp.llama_log_set(sink, ctypes.c_void_p(0))


def preset_ftype(preset: str) -> int:
    """``LLAMA_FTYPE_MOSTLY_<preset>`` from llama-cpp-python."""
    name = preset.upper()
    if name not in PRESETS:
        raise BitallocError(f"unknown llama.cpp preset {preset!r}; choose from {', '.join(PRESETS)}")
    llama_cpp = require_llama_cpp()
    value = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}", None)
    if value is None:
        raise BitallocError(f"this llama-cpp-python has no preset {name}")
    return int(value)


def quantize_gguf(
    source: Path,
    out: Path,
    ftype: int,
    tensor_types: Mapping[str, str] | None = None,
    imatrix: Mapping[str, np.ndarray] | None = None,
    token_embedding_type: str | None = None,
    output_tensor_type: str | None = None,
    pure: bool = False,
    threads: int | None = None,
) -> Path:
    """Quantize the F32/F16 GGUF ``source`` into ``out`` with llama.cpp (atomically).

    ``tensor_types`` maps exact tensor names to ggml type names (``tt_overrides``, one anchored
    pattern each); ``pure`` turns llama.cpp's per-tensor preset mixture off, so tensors without an
    override get the ftype's base type.
    """
    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = int(threads or os.cpu_count() or 1)
    params.ftype = int(ftype)
    params.pure = bool(pure)
    keep: list[Any] = []  # ctypes buffers that must live until llama_model_quantize returns
    if token_embedding_type is not None:
        params.token_embedding_type = int(quant_type(token_embedding_type))
    if output_tensor_type is not None:
        params.output_tensor_type = int(quant_type(output_tensor_type))
    if tensor_types:
        overrides = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (name, type_name) in enumerate(tensor_types.items()):
            pattern = ("^" + re.escape(name) + "$").encode()
            keep.append(pattern)
            overrides[i].pattern = pattern
            overrides[i].type = int(quant_type(type_name))
        overrides[len(tensor_types)].pattern = None  # terminator
        keep.append(overrides)
        params.tt_overrides = ctypes.cast(overrides, type(params.tt_overrides))
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            array = np.ascontiguousarray(values, dtype=np.float32)
            if not np.all(np.isfinite(array)):
                raise BitallocError(f"importance matrix of {name} has non-finite values")
            encoded = name.encode()
            keep += [array, encoded]
            entries[i].name = encoded
            entries[i].data = array.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = array.size
        entries[len(imatrix)].name = None
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, type(params.imatrix))
    out = Path(out)
    if not out.parent.is_dir():
        raise BitallocError(f"--out: directory {out.parent} does not exist")
    with atomic_path(out) as tmp:
        del _ERRORS[:]
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if status != 0 or not tmp.is_file():
            reason = _ERRORS[-1] if _ERRORS else f"llama_model_quantize returned {status}"
            raise BitallocError(f"llama.cpp could not quantize {source.name}: {reason.splitlines()[-1].strip()}")
    del keep
    return out


# -- measuring a GGUF -----------------------------------------------------------------------


# -- the two exports ------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportResult:
    path: Path
    stats: GGUFStats
    plan: dict[str, TensorPlan]
    """Per tensor, what the bit map asked for and what llama.cpp writes (empty for presets)."""
    imatrix: bool
    scale_fold: bool = False
    """Whether llama.cpp quantized the scale-folded model."""
    unfolded_sites: int = 0
    """Fold sites left unfolded because their consumers are written in a codebook type."""


@contextmanager
def _quantizer_source(float_path: Path, scale_fold: ScaleFold | None, written: Mapping[str, str]) -> Iterator[tuple[Path, GGUFFold | None, int]]:
    """The F32 GGUF llama.cpp quantizes: the reference, or a temporary folded copy of it whose sites
    feeding codebook-typed tensors (``written``: tensor -> type) stay unfolded; and how many did."""
    if scale_fold is None:
        yield float_path, None, 0
        return

    fold, unfolded = without_codebook_sites(scale_fold, written)
    with tempfile.TemporaryDirectory(prefix="folded-", dir=cache_dir("gguf")) as work:
        folded = Path(work) / float_path.name
        log.info("writing the scale-folded F32 GGUF")
        plan = write_folded_gguf(float_path, fold, folded)
        yield folded, plan, unfolded


def export_bitmap(
    bitmap: BitMap,
    out: Path,
    model: str | None = None,
    imatrix: Mapping[str, np.ndarray] | None = None,
    embedding_type: str = DEFAULT_EMBEDDING_TYPE,
    threads: int | None = None,
    scale_fold: ScaleFold | None = None,
) -> ExportResult:
    """Write ``bitmap`` as a GGUF: each module's tensor at its option's llama.cpp type
    (:func:`tensor_plan`), ``token_embd``/``output`` at ``embedding_type``, other quantizable tensors
    at q8_0, norms F32. Fails in one line if a type needs an importance matrix and none is given.

    With ``scale_fold`` llama.cpp quantizes the folded model (:mod:`allocator.gguf.fold`);
    ``imatrix`` is the reference model's, and is folded too."""
    float_path = float_gguf(source_gguf(model or bitmap.model))
    plan = tensor_plan(bitmap, gguf_tensor_shapes(float_path))
    needing = sorted({p.written for p in plan.values() if p.written in IMATRIX_TYPES})
    if needing and not imatrix:
        raise BitallocError(f"llama.cpp needs an importance matrix for {', '.join(needing)}; pass one (bitalloc export --imatrix on)")
    llama_cpp = require_llama_cpp()
    written = {name: p.written for name, p in plan.items()}
    with _quantizer_source(float_path, scale_fold, written) as (source, fold_plan, unfolded):
        path = quantize_gguf(
            source, out, int(llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), written,
            fold_plan.imatrix(imatrix) if fold_plan is not None and imatrix else imatrix,
            token_embedding_type=embedding_type, output_tensor_type=embedding_type, pure=True, threads=threads,
        )
    stats = measure_gguf(path)
    wrong = [name for name, p in plan.items() if stats.types.get(name) != p.written]
    if wrong:
        raise BitallocError(f"llama.cpp wrote {stats.types.get(wrong[0])} for {wrong[0]}, expected {plan[wrong[0]].written}")
    return ExportResult(path, stats, plan, imatrix=bool(imatrix), scale_fold=scale_fold is not None, unfolded_sites=unfolded)


def export_preset(
    preset: str,
    model: str,
    out: Path,
    imatrix: Mapping[str, np.ndarray] | None = None,
    threads: int | None = None,
    scale_fold: ScaleFold | None = None,
) -> ExportResult:
    """llama.cpp's own ``preset`` (its per-tensor mixture) made from the same F32 reference
    (``scale_fold``: from the folded reference, as :func:`export_bitmap`)."""
    ftype = preset_ftype(preset)
    if preset.upper() in IMATRIX_PRESETS and not imatrix:
        raise BitallocError(f"llama.cpp makes {preset.upper()} only with an importance matrix (bitalloc export --imatrix on)")
    float_path = float_gguf(source_gguf(model))
    written: dict[str, str] = {}
    if scale_fold is not None:
        # which types the preset gives each tensor (llama.cpp decides by name and shape, not values)
        path = quantize_gguf(float_path, out, ftype, imatrix=imatrix, threads=threads)
        written = measure_gguf(path).types
    with _quantizer_source(float_path, scale_fold, written) as (source, fold_plan, unfolded):
        matrix = fold_plan.imatrix(imatrix) if fold_plan is not None and imatrix else imatrix
        path = quantize_gguf(source, out, ftype, imatrix=matrix, threads=threads)
    return ExportResult(path, measure_gguf(path), {}, imatrix=bool(imatrix), scale_fold=scale_fold is not None, unfolded_sites=unfolded)


def export_float(model: str) -> ExportResult:
    """The cached F32 reference GGUF of ``model`` itself (for llama.cpp-side reference numbers)."""
    path = float_gguf(source_gguf(model))
    return ExportResult(path, measure_gguf(path), {}, imatrix=False)
