"""A sensitivity table whose options are llama.cpp's own tensor types, for GGUF-native allocation.

bitalloc's quantizer options map onto llama.cpp types only approximately (2-bit GPTQ -> q2_k, and
on rows that are not a multiple of 256 -> q4_0 at 4.5 bpw), so a bit map solved in bitalloc's bpw
is priced wrong in a GGUF. This table prices and measures what llama.cpp really writes:

- options: ggml types (``{"quantizer": "ggml", "type": "q3_k"}``), one per candidate type; a type
  is available for a linear only where its block divides the linear's rows (input width);
- bits: the exact bytes of that tensor in a file llama.cpp quantized to that type (from the F32
  reference GGUF, with the calibration importance matrix, as ``bitalloc export`` makes files);
- loss ``kl``: the mean per-token KL(reference || model) on calibration windows with only that
  layer replaced by llama.cpp's dequantized tensor (as ``profile --measure-kl`` measures bitalloc's
  options), plus ``weight_err`` (squared error of the weights).

The solvers then allocate in real GGUF bits per weight, and ``bitalloc export --bitmap`` writes
exactly the solved types, so the exported file's bpw is the budget.

GGUF keeps q/k rows of llama-architecture models permuted for rotary (convert_hf_to_gguf); the
dequantized tensors are permuted back to the HF layout before the KL probe, and every linear of the
F32 reference must equal the HF weight after that mapping (checked: another layout is an error).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from allocator.errors import BitallocError
from allocator.gguf.constants import DEFAULT_GGML_TYPES, GGML_PROFILE_VERSION, GGML_QUANTIZER, IMATRIX_TYPES
from allocator.gguf.export import quantize_gguf, require_llama_cpp
from allocator.gguf.files import dequantized_array, float_gguf, gguf_field, source_gguf
from allocator.gguf.ggml_types import check_ggml_types, type_fits
from allocator.measure.profile import KLProbe, profile_cache_path
from allocator.model.arch import gguf_tensor_name, tie_groups
from allocator.model.layers import quantizable_linears
from allocator.model.loading import LoadedModel
from allocator.storage import atomic_path, cache_dir
from allocator.table.losses import KL, WEIGHT_ERR
from allocator.table.sensitivity import NOT_APPLICABLE, Option, SensitivityTable, TableKey

log = logging.getLogger(__name__)


def ggml_option(type_name: str) -> Option:
    return Option(type_name, {"quantizer": GGML_QUANTIZER, "type": type_name})


def hf_rows(array: np.ndarray, heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's rotary row permutation of a llama q/k weight (rows x columns)."""
    rows, cols = array.shape
    return array.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


class GGUFLayout:
    """Maps the GGUF's linear tensors to the HF model's weights (names and q/k row order)."""

    def __init__(self, reader, names: Sequence[str]) -> None:
        arch = str(gguf_field(reader, "general.architecture"))
        self.permuted = arch == "llama"  # convert_hf_to_gguf permutes q/k rows for llama-arch models only
        self.heads = int(gguf_field(reader, f"{arch}.attention.head_count"))
        self.kv_heads = int(gguf_field(reader, f"{arch}.attention.head_count_kv"))
        self.tensor = {name: gguf_tensor_name(name) + ".weight" for name in names}

    def to_hf(self, name: str, array: np.ndarray) -> np.ndarray:
        if self.permuted and name.endswith("self_attn.q_proj"):
            return hf_rows(array, self.heads)
        if self.permuted and name.endswith("self_attn.k_proj"):
            return hf_rows(array, self.kv_heads)
        return array


def _dequantized(reader, layout: GGUFLayout, names: Sequence[str] | None = None) -> dict[str, tuple[np.ndarray, int]]:
    """HF linear name -> (float32 weight in HF layout, stored bits) from a GGUF ``reader`` (``names``, or all)."""
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for name in names if names is not None else layout.tensor:
        t = tensors[layout.tensor[name]]
        out[name] = (layout.to_hf(name, dequantized_array(t)), int(t.n_bytes) * 8)
    return out


def _check_layout(reference: Mapping[str, tuple[np.ndarray, int]], linears: Mapping[str, torch.nn.Linear]) -> None:
    for name, (array, _) in reference.items():
        weight = linears[name].weight.detach().float().numpy()
        if array.shape != weight.shape or not np.allclose(array, weight, rtol=1e-4, atol=1e-6):
            raise BitallocError(f"the GGUF tensor of {name} does not match the model's weight after the layout mapping "
                                "(an architecture whose GGUF layout this code does not know)")


def profile_ggml_types(
    loaded: LoadedModel,
    model: str,
    windows: torch.Tensor,
    imatrix: Mapping[str, np.ndarray] | None,
    types: Sequence[str] = DEFAULT_GGML_TYPES,
    key: TableKey | None = None,
    progress: bool = True,
    threads: int | None = None,
    recompute: bool = False,
    imatrix_settings: Mapping[str, object] | None = None,
) -> SensitivityTable:
    """Profile ``types`` for every decoder linear of ``loaded`` (see the module doc).

    ``windows`` (N x seqlen token ids) are the KL probe's calibration windows; ``imatrix`` (GGUF
    tensor -> mean x^2 per column, :func:`allocator.gguf.export.cached_imatrix`) is needed by the IQ
    types. Each type's file and each type's KL column are cached under ``$BITALLOC_CACHE``, so an
    interrupted run resumes at the type it was measuring.
    """
    import gguf

    require_llama_cpp()
    types = check_ggml_types(types)
    if not imatrix and any(t in IMATRIX_TYPES for t in types):
        raise BitallocError(f"llama.cpp needs an importance matrix for {', '.join(t for t in types if t in IMATRIX_TYPES)}")
    linears = quantizable_linears(loaded.model)
    names = list(linears)
    float_path = float_gguf(source_gguf(model))
    fingerprint = hashlib.sha256(json.dumps({
        "float": float_path.name, "windows": [int(windows.shape[0]), int(windows.shape[1])],
        "tokens": hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16],
        "imatrix": None if not imatrix else hashlib.sha256(b"".join(np.ascontiguousarray(v).tobytes() for v in imatrix.values())).hexdigest()[:16],
        "version": GGML_PROFILE_VERSION,
    }, sort_keys=True).encode()).hexdigest()[:16]
    cache_id = "ggml-" + hashlib.sha256(f"{fingerprint}:{','.join(types)}".encode()).hexdigest()[:16]
    cached = profile_cache_path(model, cache_id)
    work = cache_dir("gguf", "types", fingerprint)
    if recompute:
        cached.unlink(missing_ok=True)
        for column in work.glob("*.npz"):
            column.unlink()
    if cached.is_file():
        return SensitivityTable.load(cached)
    layout = GGUFLayout(gguf.GGUFReader(float_path), names)
    _check_layout(_dequantized(gguf.GGUFReader(float_path), layout), linears)
    rows = {name: module.in_features for name, module in linears.items()}
    probe = KLProbe(loaded.model, windows)
    bits = np.full((len(names), len(types)), NOT_APPLICABLE, dtype=np.int64)
    kl = np.full(bits.shape, np.nan)
    weight_err = np.full(bits.shape, np.nan)
    start = time.perf_counter()
    for j, type_name in enumerate(tqdm(types, desc="llama.cpp types", disable=not progress)):
        fitting = [name for name in names if type_fits(type_name, rows[name])]
        if not fitting:
            continue
        column = work / f"{type_name}.npz"
        if column.is_file():
            with np.load(column) as saved:
                bits[:, j], kl[:, j], weight_err[:, j] = saved["bits"], saved["kl"], saved["weight_err"]
            continue
        path = work / f"{type_name}.gguf"
        if not path.is_file():
            overrides = {layout.tensor[name]: type_name for name in fitting}
            quantize_gguf(float_path, path, int(require_llama_cpp().LLAMA_FTYPE_MOSTLY_Q8_0), overrides, imatrix,
                          token_embedding_type="q8_0", output_tensor_type="q8_0", pure=True, threads=threads)
        measured = _dequantized(gguf.GGUFReader(path), layout, fitting)
        for name in tqdm(fitting, desc=type_name, leave=False, disable=not progress):
            i = names.index(name)
            array, stored = measured[name]
            weight = torch.from_numpy(np.ascontiguousarray(array))
            reference = linears[name].weight.detach().float()
            bits[i, j] = stored
            weight_err[i, j] = float(((weight - reference) ** 2).sum())
            kl[i, j] = probe.mean_kl({name: weight.to(reference.dtype)})
        with atomic_path(column) as tmp:
            with tmp.open("wb") as handle:
                np.savez(handle, bits=bits[:, j], kl=kl[:, j], weight_err=weight_err[:, j])
        path.unlink()  # the column holds what was measured; the file can be made again
    numel = np.array([linears[n].weight.numel() for n in names], dtype=np.int64)
    table = SensitivityTable(
        names=names, numel=numel, tie_group=tie_groups(names), options=[ggml_option(t) for t in types], bits=bits,
        losses={KL: kl, WEIGHT_ERR: weight_err},
        key=key or TableKey(model=model, samples=int(windows.shape[0]), seqlen=int(windows.shape[1])),
        metadata={
            "target": "gguf",
            "ggml_types": list(types),
            "float_gguf": float_path.name,
            "imatrix": dict(imatrix_settings) if imatrix and imatrix_settings else bool(imatrix),
            "kl_measurement": {"windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "anchors": "all"},
            "losses": {KL: "mean per-token KL(reference || model), only this layer at llama.cpp's type, dequantized",
                       WEIGHT_ERR: "sum of squared weight errors of llama.cpp's dequantized tensor"},
            "layer_seconds": time.perf_counter() - start,
            "cache_id": cache_id,
        },
    )
    table.save(cached)
    return table


__all__ = ["GGUFLayout", "ggml_option", "hf_rows", "profile_ggml_types"]
