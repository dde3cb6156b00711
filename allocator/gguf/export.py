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
import hashlib
import logging
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from allocator.table.bitmap import GGUF_TENSOR_NAMES, BitMap, ggml_type, gguf_tensor_name
from allocator.errors import BitallocError
from allocator.storage import atomic_path, cache_dir

if TYPE_CHECKING:
    import torch

    from allocator.gguf.fold import GGUFFold
    from allocator.model.loading import LoadedModel
    from allocator.quantize.scalefold import ScaleFold

log = logging.getLogger(__name__)

FLOAT_GGUF_VERSION = 1
IMATRIX_VERSION = 1

PRESETS: tuple[str, ...] = (
    "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_1",
    "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M",
    "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "IQ4_NL", "IQ4_XS",
)
"""llama.cpp file types ``bitalloc export --preset`` accepts (``LLAMA_FTYPE_MOSTLY_<name>``)."""

IMATRIX_PRESETS = frozenset({"Q2_K_S", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS"})
"""Presets llama.cpp refuses to make without an importance matrix (some of their tensors need one)."""

IMATRIX_TYPES = frozenset({"iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs"})
"""Tensor types llama.cpp refuses to quantize to without an importance matrix."""

ROW_FALLBACK: dict[str, str] = {
    **dict.fromkeys(("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_xs"), "iq4_nl"),
    **dict.fromkeys(("q2_k", "q3_k", "tq1_0", "tq2_0"), "q4_0"),
    "q4_k": "q5_0",
    "q5_k": "q5_1",
    "q6_k": "q8_0",
}
"""llama.cpp's replacement for a 256-block type on rows whose length is not a multiple of 256
(llama-quant.cpp ``tensor_type_fallback``); a row that the replacement's block does not divide
either becomes f16."""

LINEAR_TENSOR = re.compile(r"^blk\.\d+\.(" + "|".join(GGUF_TENSOR_NAMES.values()) + r")\.weight$")
"""GGUF names of the decoder linears (the tensors bitalloc's bpw budget counts)."""

DEFAULT_EMBEDDING_TYPE = "q8_0"
"""Type of ``token_embd`` (and an untied ``output``) in bit-map exports; presets choose their own."""


# -- types ----------------------------------------------------------------------------------


def _quant_type(name: str):  # -> gguf.GGMLQuantizationType
    import gguf

    try:
        return gguf.GGMLQuantizationType[name.upper()]
    except KeyError:
        raise BitallocError(f"unknown ggml type {name!r}") from None


def block_size(name: str) -> int:
    """Weights per block of the ggml type ``name``: rows must be a multiple of it."""
    import gguf

    return int(gguf.GGML_QUANT_SIZES[_quant_type(name)][0])


def type_bpw(name: str) -> float:
    """Stored bits per weight of ggml type ``name`` (block bytes x 8 / block size)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[_quant_type(name)]
    return size * 8 / block


def effective_type(requested: str, row_length: int) -> str:
    """The type llama.cpp really writes for ``requested`` on rows of ``row_length`` weights."""
    import gguf

    requested = requested.lower()
    block = gguf.GGML_QUANT_SIZES[_quant_type(requested)][0]
    if row_length % block == 0:
        return requested
    fallback = ROW_FALLBACK.get(requested, requested)
    if row_length % gguf.GGML_QUANT_SIZES[_quant_type(fallback)][0] != 0:
        return "f16"
    return fallback


# -- the float GGUF -------------------------------------------------------------------------


def source_gguf(model: str) -> Path:
    """The shipped GGUF of ``model`` (a built-in name or a ``.gguf`` path)."""
    from allocator.model.loading import BUILTIN_MODELS

    if model in BUILTIN_MODELS:
        return BUILTIN_MODELS[model].locate_gguf()
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise BitallocError(f"model file not found: {model}")
        return path
    raise BitallocError(f"GGUF export needs a built-in model or a .gguf file, not {model!r} "
                        "(convert an HF model with llama.cpp's convert_hf_to_gguf.py first)")


def _sha16(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def float_gguf(source: Path) -> Path:
    """The F32 copy of ``source`` (cached under ``$BITALLOC_CACHE/gguf``; written on first use)."""
    target = cache_dir("gguf") / f"{source.stem}-{_sha16(source)}-f32-v{FLOAT_GGUF_VERSION}.gguf"
    if not target.is_file():
        log.info("writing the F32 reference GGUF %s (once)", target.name)
        write_float_gguf(source, target)
    return target


def write_float_gguf(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` with every tensor dequantized to F32 and the metadata kept
    (``general.file_type`` becomes ALL_F32), atomically."""
    rewrite_gguf(source, target)


def gguf_field(reader: Any, key: str) -> Any:
    """The value of metadata ``key`` of a ``gguf.GGUFReader``; a missing key is a :class:`BitallocError`."""
    fld = reader.fields.get(key)
    if fld is None:
        raise BitallocError(f"the GGUF has no {key}")
    return fld.contents()


def dequantized_array(tensor: Any) -> np.ndarray:
    """A ``gguf.ReaderTensor`` as float32 rows x columns (numpy order: ``ne`` reversed)."""
    from gguf.quants import dequantize

    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    return dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False).reshape(shape)


def rewrite_gguf(source: Path, target: Path, transform: Callable[[str, np.ndarray], np.ndarray] | None = None) -> None:
    """Copy ``source`` to ``target`` as an ALL_F32 GGUF with the metadata kept, atomically: each
    tensor dequantized to float32 (rows x columns) and passed through ``transform(name, array)``."""
    import gguf

    try:
        reader = gguf.GGUFReader(source)
    except (OSError, ValueError) as exc:
        raise BitallocError(f"cannot read GGUF {source}: {str(exc).splitlines()[0]}") from None
    arch_field = reader.fields.get("general.architecture")
    if arch_field is None:
        raise BitallocError(f"{source} has no general.architecture")
    with atomic_path(target) as tmp:
        writer = gguf.GGUFWriter(tmp, str(arch_field.contents()))
        for name, fld in reader.fields.items():
            if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type", "general.alignment"):
                continue
            main = fld.types[0]
            sub = fld.types[-1] if main == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, fld.contents(), main, sub_type=sub)
        writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
        for tensor in reader.tensors:
            data = dequantized_array(tensor)
            if transform is not None:
                data = transform(tensor.name, data)
            writer.add_tensor(tensor.name, np.ascontiguousarray(data, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def gguf_tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> GGUF shape (``ne``: row length first) of the GGUF at ``path``."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {t.name: tuple(int(n) for n in t.shape.tolist()) for t in reader.tensors}


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
    """GGUF tensor name -> :class:`TensorPlan` for every module of ``bitmap``."""
    plan: dict[str, TensorPlan] = {}
    for module, entry in bitmap.modules.items():
        tensor = gguf_tensor_name(module) + ".weight"
        if tensor not in shapes:
            raise BitallocError(f"bit map module {module} has no tensor {tensor} in this GGUF (another model?)")
        requested = ggml_type(entry.settings)
        row = int(shapes[tensor][0])
        plan[tensor] = TensorPlan(module, entry.option, requested, effective_type(requested, row), row)
    return plan


# -- importance matrix ----------------------------------------------------------------------


def compute_imatrix(loaded: LoadedModel, samples: torch.Tensor, batch_size: int = 4) -> dict[str, np.ndarray]:
    """GGUF tensor name -> per input column mean of x^2 over every calibration token that enters
    that decoder linear (float32), from one forward pass of the float model over ``samples``."""
    import torch

    from allocator.model.layers import quantizable_linears

    linears = quantizable_linears(loaded.model)
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in linears.items()}
    rows = dict.fromkeys(linears, 0)

    def hook_for(name: str):
        def hook(_module: Any, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] += (x * x).sum(dim=0).double()
            rows[name] += x.shape[0]

        return hook

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in linears.items()]
    try:
        with torch.inference_mode():
            for batch in samples.split(batch_size):
                loaded.model(batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {gguf_tensor_name(name) + ".weight": (sums[name] / max(rows[name], 1)).float().numpy() for name in linears}


def cached_imatrix(model: str, loaded: LoadedModel, corpus_name: str, samples: int, seqlen: int, seed: int = 0) -> dict[str, np.ndarray]:
    """:func:`compute_imatrix` on ``samples`` seeded calibration windows, cached as ``.npz``."""
    from allocator.model.corpus import load_corpus
    from allocator.measure.profile import model_fingerprint
    from allocator.model.tokens import calibration_samples

    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(model).stem if model.endswith(".gguf") else model)
    key = f"{safe}-{model_fingerprint(loaded.model)[:12]}-{corpus_name}-{samples}x{seqlen}-s{seed}-v{IMATRIX_VERSION}"
    path = cache_dir("imatrix") / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', key)}.npz"
    if path.is_file():
        with np.load(path) as data:
            return {name: data[name] for name in data.files}
    corpus = load_corpus(corpus_name)
    windows = calibration_samples(loaded.tokenizer, corpus.calibration, samples, seqlen, loaded.add_bos, seed)
    log.info("importance matrix: %d x %d calibration tokens (cached at %s)", samples, seqlen, path)
    matrix = compute_imatrix(loaded, windows)
    with atomic_path(path) as tmp:
        with tmp.open("wb") as handle:
            np.savez(handle, **matrix)
    return matrix


# -- llama.cpp's quantizer ------------------------------------------------------------------


def require_llama_cpp():  # -> module llama_cpp
    """Import llama-cpp-python, or explain in one line how to get it."""
    try:
        import llama_cpp
    except ImportError:
        raise BitallocError("GGUF export and llama.cpp evaluation need llama-cpp-python: pip install 'bitalloc[gguf]'") from None
    _install_log_sink(llama_cpp)
    return llama_cpp


GGML_LOG_LEVEL_ERROR = 4
"""``enum ggml_log_level`` in ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5."""

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
        params.token_embedding_type = int(_quant_type(token_embedding_type))
    if output_tensor_type is not None:
        params.output_tensor_type = int(_quant_type(output_tensor_type))
    if tensor_types:
        overrides = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (name, type_name) in enumerate(tensor_types.items()):
            pattern = ("^" + re.escape(name) + "$").encode()
            keep.append(pattern)
            overrides[i].pattern = pattern
            overrides[i].type = int(_quant_type(type_name))
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


@dataclass(frozen=True)
class GGUFStats:
    """What a GGUF file really stores."""

    path: str
    file_bytes: int
    tensor_bytes: int
    params: int
    linear_bytes: int
    linear_params: int
    types: dict[str, str] = field(default_factory=dict)
    """Tensor name -> ggml type name (lower case)."""

    @property
    def linear_bpw(self) -> float:
        """Bits per weight of the decoder linears, from their tensor bytes."""
        return self.linear_bytes * 8 / max(self.linear_params, 1)

    @property
    def file_bpw(self) -> float:
        """Bits per weight of every tensor in the file (embeddings, norms and LM head included)."""
        return self.tensor_bytes * 8 / max(self.params, 1)

    def linear_type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name, kind in self.types.items():
            if LINEAR_TENSOR.match(name):
                counts[kind] = counts.get(kind, 0) + 1
        return dict(sorted(counts.items()))

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "file_bytes": self.file_bytes, "tensor_bytes": self.tensor_bytes, "params": self.params,
                "linear_bytes": self.linear_bytes, "linear_params": self.linear_params, "linear_bpw": self.linear_bpw,
                "file_bpw": self.file_bpw, "linear_types": self.linear_type_counts()}


def measure_gguf(path: Path) -> GGUFStats:
    """Read ``path`` with ``gguf.GGUFReader`` and count its tensor bytes."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise BitallocError(f"cannot read GGUF {path}: {str(exc).splitlines()[0]}") from None
    tensor_bytes = params = linear_bytes = linear_params = 0
    types: dict[str, str] = {}
    for tensor in reader.tensors:
        n_bytes, n = int(tensor.n_bytes), int(tensor.n_elements)
        tensor_bytes += n_bytes
        params += n
        types[tensor.name] = tensor.tensor_type.name.lower()
        if LINEAR_TENSOR.match(tensor.name):
            linear_bytes += n_bytes
            linear_params += n
    return GGUFStats(str(path), Path(path).stat().st_size, tensor_bytes, params, linear_bytes, linear_params, types)


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
    from allocator.gguf.fold import without_codebook_sites, write_folded_gguf

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
