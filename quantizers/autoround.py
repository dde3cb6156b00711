"""AutoRound's SignRound (Cheng et al., 2023; PyPI ``auto-round``) as a per-layer quantizer.

The library itself tunes each weight's rounding offset and each group's scale by signed gradient descent, against
the layer's output error on its calibration inputs, as AutoRound does for a layer outside a transformer block. Its
objective, ``sum_x ||W x - Q(W) x||^2``, depends on the inputs only through ``H = 2 X X^T / n``, so the profile's
Hessian stands in for the tokens: with ``H + damp = L L^T`` the ``in_features`` columns of ``L`` are inputs whose
output error is exactly ``tr((W - Q) (H + damp) (W - Q)^T)``, and AutoRound sees them all every iteration (one
batch), deterministic for a seed. ``in_features`` rows instead of every calibration token also make it cheaper than
AutoRound on the tokens themselves.

Stored form: AutoRound's symmetric int grid (code ``q`` in ``[-2^(b-1), 2^(b-1) - 1]`` times a signed fp16 group
scale) is bitalloc's symmetric uniform grid with codes ``q + 2^(b-1)``: packed codes and fp16 scales, decoding to
exactly AutoRound's fake-quantized weight.

``auto-round`` is an optional extra (``pip install 'bitalloc[peers]'``); building the quantizer without it raises
ValueError, so a profile that names it fails before any work.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import math
import types
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import nn

from quantizers.base import GroupLayout, QuantizedTensor, Quantizer, checked_count, checked_damping, checked_group_size
from quantizers.formats import encode_uniform_grid, uniform_grid_storage_bits
from quantizers.gptq import damped_cholesky
from quantizers.grid import GridSpec

AUTOROUND_SAMPLES = 8
"""The Hessian's rows are split into this many "samples" of equal length: AutoRound's default batch size, so that
every iteration's batch holds all of them."""
AUTOROUND_SEED = 42
"""AutoRound's own default seed."""
AUTOROUND_MULTIPLE = 32
"""AutoRound leaves an int layer in float unless both its sides are multiples of this (the layer is padded to them)."""


class _OneLinearBlock(nn.Module):
    """The transformer "block" AutoRound tunes: the linear alone."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.linear(hidden_states)


class _HessianRowsModel(nn.Module):
    """What AutoRound is given as a model: "token" ``i`` embeds to row ``i`` of ``inputs``, which then goes through the
    one block. ``config``, ``dtype`` and ``device`` are the attributes AutoRound reads off a language model."""

    inputs: torch.Tensor

    def __init__(self, linear: nn.Linear, inputs: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("inputs", inputs)
        self.layers = nn.ModuleList([_OneLinearBlock(linear)])
        self.config = types.SimpleNamespace(model_type="llama", tie_word_embeddings=False, use_cache=False)

    @property
    def block(self) -> _OneLinearBlock:
        block = self.layers[0]
        assert isinstance(block, _OneLinearBlock)
        return block

    @property
    def dtype(self) -> torch.dtype:
        return self.inputs.dtype

    @property
    def device(self) -> torch.device:
        return self.inputs.device

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.block(self.inputs[input_ids])


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """AutoRound's progress bars (stderr) and its log lines below errors silenced: a profile reports its own progress."""
    logger = logging.getLogger("autoround")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def hessian_inputs(hessian: torch.Tensor, damp_ratio: float) -> torch.Tensor:
    """Rows whose Gram matrix is ``H + damp_ratio * mean(diag H) * I`` (the transposed Cholesky factor), zero-padded to a
    multiple of :data:`AUTOROUND_SAMPLES` rows (a zero row adds nothing to the output error)."""
    columns = hessian.shape[0]
    rows = damped_cholesky(hessian, damp_ratio).T.float()  # damped as GPTQ damps
    padded = math.ceil(columns / AUTOROUND_SAMPLES) * AUTOROUND_SAMPLES
    return torch.cat([rows, rows.new_zeros(padded - columns, columns)]) if padded > columns else rows.contiguous()


def autoround_available() -> bool:
    return importlib.util.find_spec("auto_round") is not None


class AutoRoundQuantizer(Quantizer):
    """SignRound by the ``auto-round`` library on one layer, from its Hessian.

    Args:
        bits: code width (AutoRound's ``W{bits}A16`` scheme: symmetric int).
        group_size: columns per scale (AutoRound's default 128).
        iters: SignRound iterations (AutoRound's default 200; its ``light`` recipe 50).
        lr: learning rate (None: AutoRound's default, 1 / iters; ``light`` uses 5e-3).
        damp_ratio: diagonal damping of H as a fraction of mean(diag H), as GPTQ's.
    """

    name = "autoround"
    uses_hessian = True

    def __init__(self, bits: int, group_size: int | None = 128, iters: int = 200, lr: float | None = None, damp_ratio: float = 0.01) -> None:
        if not autoround_available():
            raise ValueError("the autoround quantizer needs the auto-round package: pip install 'bitalloc[peers]'")
        self.spec = GridSpec(bits, symmetric=True)
        if bits < 2:
            raise ValueError(f"autoround takes 2 to 8 bits (its symmetric int grid), got {bits}")
        self.group_size = checked_group_size(group_size)
        self.iters = checked_count(iters, "iters")
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf):
            raise ValueError(f"lr must be a positive number or none, got {lr!r}")
        self.lr = None if lr is None else float(lr)
        self.damp_ratio = checked_damping(damp_ratio)

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> QuantizedTensor:
        if hessian is None:
            raise ValueError("autoround needs the layer's input Hessian")
        # SignRound differentiates: callers (the profile, the sequential quantization) run in inference mode
        with torch.inference_mode(False), torch.enable_grad():
            return self._tune(weight.detach().clone(), hessian.detach().clone())

    def _tune(self, weight: torch.Tensor, hessian: torch.Tensor) -> QuantizedTensor:
        from auto_round import AutoRound, SignRoundConfig

        w = weight.detach().float()
        out_features, in_features = w.shape
        # AutoRound leaves a layer in float unless both sides are multiples of 32: pad with zero weights fed zero inputs
        # (a zero weight stays exactly zero, a column without input adds no error, and the zeros do not move a group's
        # range, which always includes zero), then cut the padding off
        padded_out, padded_in = (math.ceil(n / AUTOROUND_MULTIPLE) * AUTOROUND_MULTIPLE for n in (out_features, in_features))
        linear = nn.Linear(padded_in, padded_out, bias=False)
        with torch.no_grad():
            linear.weight.zero_()
            linear.weight[:out_features, :in_features] = w
        rows = hessian_inputs(hessian, self.damp_ratio)
        inputs = torch.cat([rows, rows.new_zeros(rows.shape[0], padded_in - in_features)], dim=1)
        model = _HessianRowsModel(linear, inputs)
        length = inputs.shape[0] // AUTOROUND_SAMPLES
        samples = [torch.arange(i * length, (i + 1) * length)[None] for i in range(AUTOROUND_SAMPLES)]
        group_size = -1 if self.group_size is None else self.group_size
        with _quiet():
            rounder = AutoRound(model, tokenizer=types.SimpleNamespace(pad_token_id=None, pad_token=None), dataset=samples,
                                nsamples=AUTOROUND_SAMPLES, seqlen=length, batch_size=AUTOROUND_SAMPLES, bits=self.spec.bits,
                                group_size=group_size, sym=True, data_type="int", device_map="cpu", amp=False,
                                enable_torch_compile=False, seed=AUTOROUND_SEED,
                                alg_configs=SignRoundConfig(iters=self.iters, lr=self.lr))
            rounder.quantize()
        tuned = model.block.linear
        layout = GroupLayout(in_features, self.group_size)
        scale = cast(torch.Tensor, tuned.scale)  # AutoRound sets it on the tuned layer
        scales = scale.detach().reshape(padded_out, -1)[:out_features, :layout.count].float()  # fp16 values, signed
        per_column = scales.repeat_interleave(torch.tensor([b - a for a, b in map(layout.bounds, range(layout.count))]), dim=1)
        zero = self.spec.symmetric_zero()
        dequantized = tuned.weight.detach()[:out_features, :in_features].float()
        codes = (torch.round(dequantized / per_column) + zero).clamp(0, self.spec.max_code)
        return encode_uniform_grid(codes, scales, torch.full_like(scales, zero), self.spec, layout)

    def storage_bits(self, out_features: int, in_features: int) -> int:
        return uniform_grid_storage_bits((out_features, in_features), self.spec, GroupLayout(in_features, self.group_size))

    def settings(self) -> dict[str, Any]:
        return {"quantizer": self.name, "bits": self.spec.bits, "group_size": self.group_size, "iters": self.iters, "lr": self.lr,
                "damp_ratio": self.damp_ratio}

    def label(self) -> str:
        group = "" if self.group_size is None else f"g{self.group_size}"
        return f"autoround-w{self.spec.bits}{group}-i{self.iters}"
