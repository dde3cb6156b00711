"""Compile ``lowbit.c`` (the kernels) and ``llama_step.c`` (a llama decode step on them) on first use
into one shared library, and load it with ctypes.

No torch headers, no build step at install time: the system C compiler builds a plain shared
library (``cc -O3 -march=native -fopenmp -shared -fPIC``) into
``$BITALLOC_CACHE/kernels/lowbit-<key>.so``, where the key hashes the sources, the compiler's
identity, the flags and the CPU (``-march=native`` code must not be loaded on a different CPU
sharing the cache). Later processes load the cached file directly.

If there is no compiler, or every flag set fails to compile (e.g. a compiler without OpenMP
falls back to the same source without it), :func:`kernel_library` returns ``None`` once with a
warning and the callers use the dequantize-then-matmul reference. ``BITALLOC_KERNELS=0`` turns the
kernels off on purpose (no warning).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

SOURCES = (Path(__file__).with_name("lowbit.c"), Path(__file__).with_name("llama_step.c"))
HEADERS = (Path(__file__).with_name("lowbit.h"),)
"""Included by the sources: part of the library's cache key, not compiled on their own."""
ABI_VERSION = 8
"""Must equal ``BQ_ABI_VERSION`` in the C source: guards against loading a stale library."""
DISABLE_ENV = "BITALLOC_KERNELS"
COMMON_FLAGS = ("-shared", "-fPIC", "-std=c11")
FLAG_SETS: tuple[tuple[str, ...], ...] = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-march=native"),  # compilers without OpenMP (e.g. clang lacking libomp)
    ("-O3",),  # compilers that do not know -march=native
)
COMPILE_TIMEOUT_S = 120


@dataclass(frozen=True)
class KernelLibrary:
    """The loaded shared library and how it was built."""

    lib: ctypes.CDLL
    path: Path
    compiler: str
    flags: tuple[str, ...]

    @property
    def simd(self) -> str:
        return "avx2" if self.lib.bq_simd() == 2 else "portable"

    @property
    def max_threads(self) -> int:
        return int(self.lib.bq_max_threads())


class WeightDescriptor(ctypes.Structure):
    """Mirror of ``bq_weight`` in ``lowbit.h``: a weight's pointers and sizes, filled once per module."""

    _fields_ = [
        ("codes", ctypes.c_void_p),
        ("params", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("group_size", ctypes.c_int64),
        ("bits", ctypes.c_int64),
        ("lut_codes", ctypes.c_void_p),
        ("lut_params", ctypes.c_void_p),
    ]


MAX_PIECES = 3
"""Pieces a projection of a :class:`LlamaBlockDescriptor` may be split into (``BQ_MAX_PIECES``)."""
FLOAT_BITS = 32
"""``bits`` of a descriptor whose ``codes`` point at a float32 row-major weight (``llama_step.c``)."""


class LlamaBlockDescriptor(ctypes.Structure):
    """Mirror of ``bq_llama_block`` in ``llama_step.c``: one decoder block's weights."""

    _fields_ = [
        ("qkv", WeightDescriptor * MAX_PIECES),
        ("qkv_pieces", ctypes.c_int64),
        ("o", WeightDescriptor),
        ("gate_up", WeightDescriptor * MAX_PIECES),
        ("gate_up_pieces", ctypes.c_int64),
        ("down", WeightDescriptor),
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
    ]


class LlamaDescriptor(ctypes.Structure):
    """Mirror of ``bq_llama`` in ``llama_step.c``: sizes, blocks, head, rotary tables and KV cache."""

    _fields_ = [
        *[(name, ctypes.c_int64) for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "max_length",
                                              "vocab", "int8_activations")],
        ("norm_eps", ctypes.c_float),
        ("attention_scale", ctypes.c_float),
        ("blocks", ctypes.c_void_p),
        ("final_norm", ctypes.c_void_p),
        ("head", WeightDescriptor),
        ("cos", ctypes.c_void_p),
        ("sin", ctypes.c_void_p),
        ("keys", ctypes.c_void_p),
        ("values", ctypes.c_void_p),
    ]


def find_compiler() -> str | None:
    """``$CC`` (its program; extra words in it are ignored) if set, else the first of cc, gcc, clang on PATH."""
    configured = os.environ.get("CC", "").strip()
    if configured:
        return shutil.which(shlex.split(configured)[0])
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def kernels_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() in {"0", "false", "no", "off"}


@functools.cache
def kernel_library() -> KernelLibrary | None:
    """The compiled kernels, built on first call and cached; ``None`` means use the reference path."""
    if kernels_disabled():
        return None
    compiler = find_compiler()
    if compiler is None:
        warnings.warn("bitalloc: no C compiler found (cc/gcc/clang, or $CC); low-bit layers run the slower "
                      "dequantize-then-matmul reference", RuntimeWarning, stacklevel=2)
        return None
    errors = []
    for flags in FLAG_SETS:
        try:
            path = _build(compiler, flags)
            return _load(path, compiler, flags)
        except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
            errors.append(f"{' '.join(flags)}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}")
    warnings.warn("bitalloc: could not build the low-bit kernels (" + "; ".join(errors) + "); "
                  "low-bit layers run the slower dequantize-then-matmul reference", RuntimeWarning, stacklevel=2)
    return None


def kernel_cache_dir() -> Path:
    """``$BITALLOC_CACHE/kernels`` (default ``~/.cache/bitalloc/kernels``), created.

    The same root as :func:`allocator.storage.cache_dir`, read here because quantizers sit below
    allocator and import nothing from it.
    """
    root = Path(os.environ.get("BITALLOC_CACHE") or Path.home() / ".cache" / "bitalloc")
    path = root / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _build(compiler: str, flags: tuple[str, ...]) -> Path:
    source = b"\0".join(path.read_bytes() for path in SOURCES + HEADERS)
    key = hashlib.sha256(b"\0".join([source, _compiler_identity(compiler).encode(), " ".join(flags + COMMON_FLAGS).encode(),
                                     _cpu_identity().encode()])).hexdigest()[:16]
    target = kernel_cache_dir() / f"lowbit-{key}.so"
    if target.is_file():
        return target
    # Compile next to the target and rename: concurrent processes never load a half-written file.
    fd, tmp_name = tempfile.mkstemp(prefix=".lowbit-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *flags, *COMMON_FLAGS, *map(str, SOURCES), "-o", tmp_name, "-lm"],
                                capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(result.stderr or f"{compiler} exited with {result.returncode}")
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return target


def _load(path: Path, compiler: str, flags: tuple[str, ...]) -> KernelLibrary:
    # torch is imported first so that libgomp.so.1 resolves to the copy torch already loaded:
    # one OpenMP runtime, one thread pool, no two pools spinning against each other.
    import torch  # noqa: F401

    lib = ctypes.CDLL(str(path))
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.bq_abi_version.restype = i32
    lib.bq_abi_version.argtypes = []
    if lib.bq_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path.name} has ABI {lib.bq_abi_version()}, expected {ABI_VERSION}")
    lib.bq_simd.restype = i32
    lib.bq_simd.argtypes = []
    lib.bq_max_threads.restype = i32
    lib.bq_max_threads.argtypes = []
    lib.bq_row_bytes.restype = i64
    lib.bq_row_bytes.argtypes = [i64, i64, i32]
    lib.bq_matmul.restype = i32
    lib.bq_matmul.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, i32, i64, ptr]
    lib.bq_matmul_desc.restype = i32
    lib.bq_matmul_desc.argtypes = [ptr, ptr, i64, ptr]
    lib.bq_gemv_sequence.restype = i32
    lib.bq_gemv_sequence.argtypes = [ptr, i64, ptr, ptr, i32]
    lib.bq_llama_step.restype = i32
    lib.bq_llama_step.argtypes = [ptr, ptr, i64, ptr]
    lib.bq_gemv_i8_desc.restype = i32
    lib.bq_gemv_i8_desc.argtypes = [ptr, ptr, ptr]
    lib.bq_dequantize.restype = i32
    lib.bq_dequantize.argtypes = [ptr, ptr, i64, i64, i32, i64, ptr]
    return KernelLibrary(lib=lib, path=path, compiler=compiler, flags=flags)


def _compiler_identity(compiler: str) -> str:
    try:
        result = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
        return f"{compiler}\n{result.stdout.splitlines()[0] if result.stdout else ''}"
    except (OSError, subprocess.SubprocessError):
        return compiler


def _cpu_identity() -> str:
    """CPU model and feature flags (what -march=native compiles for)."""
    try:
        fields = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor is enough
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        return f"{fields.get('model name', '')}|{fields.get('flags', fields.get('Features', ''))}"
    except OSError:
        return f"{platform.machine()}|{platform.processor()}"
