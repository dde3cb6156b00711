"""GGUF files: the shipped GGUF of a model, its cached F32 copy, reading fields and tensors,
rewriting a file tensor by tensor, and measuring what a written file really stores."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from allocator.errors import BitallocError
from allocator.gguf.constants import FLOAT_GGUF_VERSION
from allocator.model.arch import GGUF_TENSOR_NAMES
from allocator.storage import atomic_path, cache_dir, is_file, shown

log = logging.getLogger(__name__)


def source_gguf(model: str) -> Path:
    """The shipped GGUF of ``model`` (a built-in name or a ``.gguf`` path)."""
    from allocator.model.loading import BUILTIN_MODELS

    if model in BUILTIN_MODELS:
        return BUILTIN_MODELS[model].locate_gguf()
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not is_file(path, "--model"):
            raise BitallocError(f"model file not found: {shown(model)}")
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

    from allocator.model.loading import open_gguf

    reader = open_gguf(source)
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
    from allocator.model.loading import open_gguf

    reader = open_gguf(path)
    return {t.name: tuple(int(n) for n in t.shape.tolist()) for t in reader.tensors}

LINEAR_TENSOR = re.compile(r"^blk\.\d+\.(" + "|".join(GGUF_TENSOR_NAMES.values()) + r")\.weight$")
"""GGUF names of the decoder linears (the tensors bitalloc's bpw budget counts)."""

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
    from allocator.model.loading import open_gguf

    reader = open_gguf(path)
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
