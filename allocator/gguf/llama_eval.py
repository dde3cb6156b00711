"""Run GGUF files in llama.cpp (llama-cpp-python) on bitalloc's own evaluation windows.

Every file gets exactly the token ids of :func:`allocator.jobs.compare.evaluation_tokens` (BOS included
where the model wants it), one window per fresh context, all ``seqlen`` tokens in one batch with the
logits of every position kept, so its perplexity is comparable with bitalloc's HF evaluation. With
an HF ``reference`` model the windows also go through it once, giving the reference perplexity and
the mean per-token KL(reference || GGUF) on the same positions (all files are loaded at once so the
reference runs once per window; pass fewer files per call to bound memory: a context keeps
``seqlen x vocab`` float32 logits twice).

Speed: prefill tokens/s is the evaluation windows' throughput; decode tokens/s is greedy decoding
of ``decode_tokens`` tokens one at a time after a 32-token prompt, on ``threads`` CPU threads.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from allocator.errors import BitallocError
from allocator.gguf.export import require_llama_cpp

if TYPE_CHECKING:
    from transformers import PreTrainedModel

REFERENCE = "reference (HF fp32)"
DECODE_PROMPT = 32


@dataclass
class GGUFEvalResult:
    perplexity: float
    kl: float | None
    """Mean per-token KL(reference || model) in nats (None without a reference)."""
    tokens: int
    """Predicted tokens the means are over."""
    seconds: float
    """Forward time over the evaluation windows."""
    prefill_tok_s: float
    decode_tok_s: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cpu_has_amx(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU advertises AMX int8 tiles (Sapphire Rapids and later); False where unknown."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    return any(line.startswith("flags") and " amx_int8" in line for line in text.splitlines())


@contextmanager
def _without_extra_buffer_types(llama_cpp: Any) -> Iterator[None]:
    """Load models without ggml's extra CPU buffer types (AMX, weight repacking).

    ggml's AMX matmul segfaults in llama_decode on AMX CPUs (llama.cpp issue #20824, still in the
    llama.cpp that llama-cpp-python 0.3.36 bundles); llama_cpp.Llama has no argument for
    ``use_extra_bufts``, so the default model parameters are wrapped for the one constructor call.
    """
    low_level = llama_cpp.llama_cpp
    defaults = low_level.llama_model_default_params

    def without_extra() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    low_level.llama_model_default_params = without_extra
    try:
        yield
    finally:
        low_level.llama_model_default_params = defaults


def load_llama(path: Path, seqlen: int, threads: int | None = None) -> Any:
    """A llama.cpp context on ``path`` that keeps the logits of every position of a ``seqlen`` window.

    On AMX CPUs the weights stay in plain CPU buffers (see :func:`_without_extra_buffer_types`);
    elsewhere llama.cpp repacks them as it would by default.
    """
    llama_cpp = require_llama_cpp()
    if not Path(path).is_file():
        raise BitallocError(f"no GGUF at {path}")
    guard = _without_extra_buffer_types(llama_cpp) if cpu_has_amx() else ExitStack()
    try:
        with guard:
            return llama_cpp.Llama(
                model_path=str(path), n_ctx=seqlen, n_batch=seqlen, n_ubatch=seqlen, logits_all=True,
                n_threads=threads, n_threads_batch=threads, n_gpu_layers=0, verbose=False,
            )
    except (ValueError, RuntimeError, OSError) as exc:
        raise BitallocError(f"llama.cpp could not load {path}: {str(exc).splitlines()[0]}") from None


def window_logprobs(llm: Any, ids: np.ndarray) -> torch.Tensor:
    """Next-token log-probabilities at every position but the last ((len-1) x vocab, float32)."""
    llm.reset()
    llm.eval([int(t) for t in ids])
    logits = torch.from_numpy(np.array(llm.scores[: len(ids) - 1], dtype=np.float32))
    return torch.log_softmax(logits, dim=-1)


def decode_speed(llm: Any, prompt: np.ndarray, tokens: int) -> float:
    """Greedy decoding tokens/s: ``tokens`` single-token steps after evaluating ``prompt``."""
    llm.reset()
    llm.eval([int(t) for t in prompt])
    start = time.perf_counter()
    for _ in range(tokens):
        next_id = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([next_id])
    return tokens / (time.perf_counter() - start)


@torch.inference_mode()
def evaluate_ggufs(
    paths: Mapping[str, Path],
    windows: torch.Tensor,
    reference: PreTrainedModel | None = None,
    threads: int | None = None,
    decode_tokens: int = 64,
    progress: bool = True,
) -> dict[str, GGUFEvalResult]:
    """Perplexity (and KL to ``reference``) of every GGUF in ``paths`` on ``windows``.

    With a reference, the result also has the key :data:`REFERENCE` (the HF model's own numbers,
    KL 0). ``decode_tokens=0`` skips the decode timing.
    """
    from tqdm.auto import tqdm

    from allocator.evaluate.perplexity import next_token_logprobs

    seqlen = int(windows.shape[1])
    names = list(paths)
    nll = dict.fromkeys(names, 0.0)
    kl = dict.fromkeys(names, 0.0)
    seconds = dict.fromkeys(names, 0.0)
    ref_nll, ref_seconds, tokens = 0.0, 0.0, 0
    with ExitStack() as stack:
        models = {}
        for name in names:
            models[name] = load_llama(paths[name], seqlen, threads)
            stack.callback(models[name].close)
        for window in tqdm(windows, desc="llama.cpp eval windows", disable=not progress):
            ids = window.numpy()
            targets = window[1:]
            ref_logprobs = None
            if reference is not None:
                start = time.perf_counter()
                ref_logprobs = next_token_logprobs(reference, window[None])
                ref_seconds += time.perf_counter() - start
                ref_nll -= ref_logprobs.gather(1, targets[:, None]).sum().item()
            for name, llm in models.items():
                start = time.perf_counter()
                logprobs = window_logprobs(llm, ids)
                seconds[name] += time.perf_counter() - start
                if ref_logprobs is not None and logprobs.shape != ref_logprobs.shape:
                    raise BitallocError(f"{name} gives {tuple(logprobs.shape)} logits per window, the reference {tuple(ref_logprobs.shape)}")
                nll[name] -= logprobs.gather(1, targets[:, None]).sum().item()
                if ref_logprobs is not None:
                    kl[name] += torch.nn.functional.kl_div(logprobs, ref_logprobs, log_target=True, reduction="sum").item()
            tokens += targets.numel()
        decode = {name: (decode_speed(llm, windows[0, :DECODE_PROMPT].numpy(), decode_tokens) if decode_tokens > 0 else None)
                  for name, llm in models.items()}
    results: dict[str, GGUFEvalResult] = {}
    if reference is not None:
        results[REFERENCE] = GGUFEvalResult(math.exp(ref_nll / tokens), 0.0, tokens, ref_seconds,
                                            windows.numel() / max(ref_seconds, 1e-9), None)
    for name in names:
        results[name] = GGUFEvalResult(
            perplexity=math.exp(nll[name] / tokens),
            kl=kl[name] / tokens if reference is not None else None,
            tokens=tokens,
            seconds=seconds[name],
            prefill_tok_s=windows.numel() / max(seconds[name], 1e-9),
            decode_tok_s=decode[name],
        )
    return results
