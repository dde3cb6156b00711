"""AutoRound (PyPI ``auto-round``) as peers.py runs it: SignRound W{2,3,4}A16 and AutoScheme's mixed bits, on the CPU.

What AutoRound is given, and why:
- the model as an in-memory fp32 ``nn.Module`` (a deep copy: AutoRound rewrites the weights it is given in place);
- bitalloc's calibration windows as a list of (1, seqlen) id tensors (a bare 2-D tensor is iterated as 1-D rows);
  ``nsamples`` and ``seqlen`` set to them (AutoRound's defaults are 128 x 2048);
- a tokenizer stub without a pad token (AutoRound reads only ``pad_token_id``/``pad_token`` for id tensors; a real
  tokenizer would mask every calibration token equal to its pad id);
- ``amp=False`` (on a CPU, amp casts the whole model to bf16 in place) and ``enable_torch_compile=False`` (an inductor
  compile per block on a CPU); ``device_map="cpu"``; everything else its default: sym int, group size 128,
  ``batch_size=8``, ``seed=42``, and one of AutoRound's CLI recipes (:data:`RECIPES`: ``default`` = 200 iterations at
  its default learning rate 1/iters, ``light`` = 50 iterations at lr 5e-3) as ``SignRoundConfig(iters, lr)``.

AutoScheme (``avg_bits``) only takes a dataset *name*; its calibration loader is pointed at the same windows (two
module attributes patched for the call) and its score cache at a fresh directory (it is keyed by the dataset name,
not the data), with ``low_cpu_mem_usage=False`` (else it re-reads blocks from a checkpoint on disk, which an
in-memory model has not). Its scoring runs on its own defaults (16 x 256 tokens).

Honest bits per linear = what ``save_quantized(format="auto_round")`` stores: int32-packed codes (in x b bits per
column, rounded up to 32), int32-packed zero points (G x out x b bits) and fp16 scales (G x out), G = ceil(in / 128):
``b + G (16 + b) / in`` bits per weight, AutoScheme's own ``avg_bits`` accounting.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import tempfile
import time
import types
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

os.environ.setdefault("AR_LOG_LEVEL", "WARNING")  # read when auto_round is first imported
TOKENIZER_STUB = types.SimpleNamespace(pad_token_id=None, pad_token=None)
RECIPES = {"default": {"iters": 200, "lr": None}, "light": {"iters": 50, "lr": 5e-3}}
"""AutoRound's CLI recipes (``auto_round.cli.main.RECIPES``), their SignRound settings only (bitalloc's calibration
replaces their nsamples and seqlen)."""
SCHEME_OPTIONS = "W2A16,W3A16,W4A16"


def _common(recipe: str) -> dict[str, Any]:
    from auto_round import SignRoundConfig

    return {"tokenizer": TOKENIZER_STUB, "device_map": "cpu", "amp": False, "enable_torch_compile": False, "seed": 42,
            "alg_configs": SignRoundConfig(**RECIPES[recipe])}


def stored_bits(out_features: int, in_features: int, bits: int, group_size: int) -> int:
    """Bits ``save_quantized(format="auto_round")`` keeps for one linear (see the module doc)."""
    groups = math.ceil(in_features / group_size)
    qweight = 32 * math.ceil(in_features * bits / 32) * out_features
    qzeros = 32 * groups * math.ceil(out_features * bits / 32)
    return qweight + qzeros + 16 * groups * out_features


def quantized_linears(model: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """Every linear AutoRound quantized: (its fake-quantized fp32 weight, exactly scale x (code - zero), and its stored
    bits)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and getattr(module, "scale", None) is not None and getattr(module, "bits", 16) < 16:
            out_features, in_features = module.weight.shape
            found[name] = (module.weight.detach().float().clone(), stored_bits(out_features, in_features, module.bits, module.group_size))
    return found


def _samples(calibration: torch.Tensor) -> list[torch.Tensor]:
    return [calibration[i:i + 1] for i in range(calibration.shape[0])]


def quantize(model: nn.Module, calibration: torch.Tensor, recipe: str = "default", bits: int | None = None,
             layer_bits: Mapping[str, int] | None = None) -> tuple[dict[str, tuple[torch.Tensor, int]], float]:
    """SignRound on a copy of ``model``: every decoder linear at ``bits``, or each at ``layer_bits[name]``; returns
    :func:`quantized_linears` of the result and the wall seconds."""
    from auto_round import AutoRound

    work = copy.deepcopy(model)
    extra: dict[str, Any] = {"scheme": f"W{bits}A16"} if bits is not None else {
        "scheme": "W4A16", "layer_config": {name: {"bits": b, "group_size": 128, "sym": True, "data_type": "int"} for name, b in (layer_bits or {}).items()}}
    tick = time.perf_counter()
    rounder = AutoRound(work, dataset=_samples(calibration), nsamples=calibration.shape[0], seqlen=calibration.shape[1],
                        batch_size=8, **extra, **_common(recipe))
    rounder.quantize()
    return quantized_linears(work), time.perf_counter() - tick


@contextlib.contextmanager
def _scheme_calibration(calibration: torch.Tensor) -> Iterator[str]:
    """AutoScheme's loader pointed at ``calibration`` and its score cache at a fresh directory; yields the dataset
    name to pass."""
    import auto_round.auto_scheme.delta_loss as delta_loss
    import auto_round.calib_dataset as calib_dataset

    def loader(tokenizer: Any, seqlen: int, dataset_name: Any = None, seed: int = 42, bs: int = 8, nsamples: int = 512) -> list[dict]:
        ids = calibration[:nsamples, :seqlen]
        return [{"input_ids": ids[i:i + bs], "attention_mask": torch.ones_like(ids[i:i + bs])} for i in range(0, ids.shape[0], bs)]

    saved = delta_loss.get_dataloader, calib_dataset.get_dataloader, os.environ.get("AR_AUTO_SCHEME_CACHE")
    with tempfile.TemporaryDirectory(prefix="autoscheme-") as cache:
        delta_loss.get_dataloader = calib_dataset.get_dataloader = loader
        os.environ["AR_AUTO_SCHEME_CACHE"] = cache
        try:
            yield "bitalloc-calibration"
        finally:
            delta_loss.get_dataloader, calib_dataset.get_dataloader = saved[0], saved[1]
            if saved[2] is None:
                os.environ.pop("AR_AUTO_SCHEME_CACHE", None)
            else:
                os.environ["AR_AUTO_SCHEME_CACHE"] = saved[2]


def scheme_bits(model: nn.Module, calibration: torch.Tensor, avg_bits: float, recipe: str = "default") -> tuple[dict[str, int], float]:
    """AutoScheme's per-layer bits at ``avg_bits`` (W2/W3/W4 options; no tuning: ``recipe`` only configures the AutoRound
    object AutoScheme runs in) and the wall seconds."""
    from auto_round import AutoRound, AutoScheme

    work = copy.deepcopy(model)
    tick = time.perf_counter()
    with _scheme_calibration(calibration) as dataset:
        scheme = AutoScheme(avg_bits=avg_bits, options=SCHEME_OPTIONS, low_cpu_mem_usage=False)
        rounder = AutoRound(work, scheme=scheme, dataset=dataset, **_common(recipe))
        rounder.post_init()  # AutoScheme allocates here; quantize() would go on to tune
        chosen = {name: int(config["bits"]) for name, config in rounder.layer_config.items() if config.get("bits", 16) < 16}
    return chosen, time.perf_counter() - tick


__all__ = ["RECIPES", "quantize", "scheme_bits", "stored_bits"]
