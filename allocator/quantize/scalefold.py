"""Scale folding: move activation outliers into the weights before low-bit quantization.

A linear layer ``y = W x`` fed by a channel-wise scaling step can take a per-input-channel factor
``s`` from that step at no cost::

    y = W x = (W diag(s)) (diag(1/s) x) = W' x'

so channels whose activations are large (outliers) get proportionally larger weight columns,
quantized with proportionally finer relative precision, while weight-outlier columns shrink.
Exactly as in SmoothQuant (Xiao et al. 2023), with the factor per input channel ``j`` ::

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

where ``max|X_j|`` is the calibration absmax of the channel and ``max|W_j|`` the largest ``|w|`` in
column ``j`` over every linear fed by that input. ``s`` is divided by its geometric mean (a common
factor changes nothing a per-group quantizer sees, and this keeps the norm weights in their range)
and clamped to ``[SCALE_MIN, SCALE_MAX]``.

Fold sites of a llama/qwen/gemma-style decoder block, in execution order:

1. ``input_layernorm -> self_attn.{q,k,v}_proj``: the norm's weight is divided by ``s``;
2. ``self_attn.v_proj -> self_attn.o_proj``: attention is linear in the values, so ``v_proj``'s
   rows are divided by ``s`` and ``o_proj``'s columns multiplied by it. With grouped-query
   attention, ``o_proj`` input column (query head ``h``, dim ``d``) reads value row
   (``kv(h) = h // n_rep``, ``d``): one scale per value row, shared by the ``n_rep`` query heads of a
   kv head (the statistics are maxed over them). Skipped when ``v_proj`` has a bias or the
   attention has a ``v_norm`` (Gemma-3n): then ``v`` is not linear in ``v_proj``'s weight alone;
3. ``post_attention_layernorm`` (Gemma 2/3: ``pre_feedforward_layernorm``) ``-> mlp.{gate,up}_proj``;
4. ``mlp.up_proj -> mlp.down_proj``: ``act(gate x) * (up x)`` is linear in ``up``'s output.
   Skipped without a gate or with a bias.

Norm folding: llama's RMSNorm outputs ``w * x_hat`` and gets ``w / s``; Gemma's outputs
``(1 + w) * x_hat`` and gets ``(1 + w) / s - 1``. Which kind a norm is, is probed numerically (with
``w = 0`` a llama norm outputs zeros); a norm with a bias is not folded. A norm site is folded only
if the norm's output tensor is, by identity, the input of every target linear (checked by hooks
on the calibration pass), and after folding each block is run once more on its first calibration
batch: its output must match the reference within float tolerance, otherwise
:class:`~allocator.errors.BitallocError` (an architecture this code does not understand).

The transform keeps the float model's function, so block ``i``'s statistics are the same with
or without blocks ``< i`` folded: the reference blocks run once on the calibration samples and
every block's scales come from that one pass.

Choosing alpha:

- a global ``alpha`` (default :data:`DEFAULT_ALPHA` = 0.5, SmoothQuant's default);
- ``alpha=None``: searched per fold site on :data:`ALPHA_GRID` (0, 0.1, ..., 1) plus "no fold"
  (``s = 1``), as AWQ searches its scale exponent on a grid: the candidate minimizing the summed
  Hessian-weighted output error ``tr((W - Q) H (W - Q)^T)`` of the site's target linears is kept.
  ``H = 2 X^T X / n`` of the reference inputs, and the error is in the reference coordinates
  (``Q`` quantizes ``W diag(s)`` with ``H' = diag(1/s) H diag(1/s)`` and is mapped back by
  ``diag(1/s)``), so every candidate is scored on the same output error. For ``v -> o`` and
  ``up -> down`` only the consumer is scored: the producer's rows are scaled by whole rows, which a
  per-row/per-group quantizer absorbs. The scoring quantizer (:func:`search_proxy`) is the layer's
  own when it is cheap (RTN, XNOR), RTN at the same bits and group size for GPTQ (its 12 x 7 runs
  per block would cost minutes on a 2-core CPU), and XNOR g128 for the slow 1-bit methods (BiLLM,
  PB-LLM, W(1+1), dynamic grouping). With a uniform assignment the search scores against that
  quantizer; for a mixed one (a bit map) and for profiling it scores against RTN 3-bit g128
  (:data:`MIXED_SEARCH_SETTINGS`), so a profile and the model quantized from its bit map fold alike.
  Unlike AWQ, the score is per linear (the profile's loss) rather than the block output.

:func:`compute_scale_fold` returns the record (:class:`ScaleFold`: settings, per-site alpha and
float32 scales) and the transformed tensors as an overlay (module name -> weight) that
:func:`allocator.model.layers.swapped_weights` puts into the reference model; the reference itself is
never modified. :func:`allocator.quantize.apply.quantize_with_scale_fold` quantizes under that overlay and keeps the
folded norms in :attr:`allocator.quantize.apply.QuantizedModel.float_weights`, so evaluation (which swaps
``dequantized_weights()`` into the reference) and the packed format see the folded model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from allocator.errors import BitallocError
from allocator.model.arch import FOLD_SITES
from allocator.model.calibration import HessianAccumulator, capture_block_inputs, run_block
from allocator.model.layers import decoder_layers, decoder_prefix, swapped_weights
from allocator.table.options import quantizer_from_settings
from quantizers import Quantizer, build_quantizer

log = logging.getLogger(__name__)

SCALE_FOLD_VERSION = 1
"""Bump when what the transform computes changes (it is part of profile cache keys)."""
DEFAULT_ALPHA = 0.5
ALPHA_GRID: tuple[float, ...] = tuple(i / 10 for i in range(11))
STAT_FLOOR = 1e-5
"""Floor of ``max|X_j|`` and ``max|W_j|``: a dead channel gets a small scale, not 0 or inf."""
SCALE_MIN, SCALE_MAX = 2.0**-10, 2.0**10
"""Clamp of ``s`` after normalizing its geometric mean to 1 (fp16 scales and norms stay finite)."""
CHECK_RTOL = 1e-3
"""A folded block's output may differ from the reference by this fraction of its max |value|."""
MIXED_SEARCH_SETTINGS: dict[str, Any] = {"quantizer": "rtn", "bits": 3, "group_size": 128}
BINARY_PROXY_SETTINGS: dict[str, Any] = {"quantizer": "xnor", "group_size": 128}


# ----------------------------------------------------------------------------- settings and record


@dataclass(frozen=True)
class ScaleFoldSettings:
    """How the scales are chosen: a global ``alpha``, or ``alpha=None`` to search ``grid``."""

    alpha: float | None = DEFAULT_ALPHA
    grid: tuple[float, ...] = ALPHA_GRID

    def __post_init__(self) -> None:
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise BitallocError(f"the scale-fold alpha must be between 0 and 1, got {self.alpha}")
        if not self.grid or any(not 0.0 <= a <= 1.0 for a in self.grid):
            raise BitallocError(f"the scale-fold alpha grid must hold values in [0, 1], got {list(self.grid)}")

    @property
    def search(self) -> bool:
        return self.alpha is None

    def as_dict(self) -> dict[str, Any]:
        """JSON-able settings (with the transform's version), for cache keys and saved records."""
        data: dict[str, Any] = {"version": SCALE_FOLD_VERSION, "alpha": "search" if self.search else self.alpha}
        if self.search:
            data["grid"] = list(self.grid)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScaleFoldSettings:
        alpha = data.get("alpha", DEFAULT_ALPHA)
        grid = tuple(float(a) for a in data.get("grid", ALPHA_GRID))
        return cls(None if alpha == "search" else float(alpha), grid)

    def label(self) -> str:
        """Suffix for variant names: ``sf0.5`` or ``sf-search``."""
        return "sf-search" if self.search else f"sf{self.alpha:g}"

    def key_suffix(self) -> str:
        """What a sensitivity table's key appends to its code version when it was profiled folded."""
        return "+scalefold" + json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))


def parse_alpha(text: str) -> float | None:
    """``--scale-fold-alpha``: a number in [0, 1], or ``search`` (returned as None)."""
    if text.strip().lower() == "search":
        return None
    try:
        value = float(text)
    except ValueError:
        raise BitallocError(f"not a number in [0, 1] nor 'search': {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise BitallocError(f"must be between 0 and 1, got {value:g}")
    return value


@dataclass
class FoldGroup:
    """One folded scale vector: between a producer (a norm or a linear) and its consumer linears."""

    block: int
    source: str
    """Qualified name of the producer: a norm, or ``v_proj`` / ``up_proj``."""
    targets: tuple[str, ...]
    """Qualified names of the linears whose input columns are multiplied by the scales."""
    alpha: float | None
    """The alpha used; None where the search kept ``s = 1`` (then ``scales`` are ones)."""
    scales: torch.Tensor = field(repr=False)
    """float32, one per output channel of ``source`` (for ``v_proj``: kv heads x head dim; the
    ``o_proj`` columns use them repeated over each kv head's query heads)."""

    @property
    def tensor_key(self) -> str:
        """Key of ``scales`` in a packed model's safetensors file."""
        return f"scale_fold/{self.source}"


@dataclass
class ScaleFold:
    """What a scale fold did: its settings and every folded scale vector (block order)."""

    settings: ScaleFoldSettings
    groups: list[FoldGroup] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": self.settings.as_dict(),
            "groups": [
                {"block": g.block, "source": g.source, "targets": list(g.targets), "alpha": g.alpha, "tensor": g.tensor_key}
                for g in self.groups
            ],
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """The scales by :attr:`FoldGroup.tensor_key` (float32)."""
        return {g.tensor_key: g.scales.float().contiguous() for g in self.groups}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> ScaleFold:
        """Inverse of :meth:`to_json` + :meth:`tensors`; a missing piece is a :class:`BitallocError`."""
        try:
            settings = ScaleFoldSettings.from_dict(data["settings"])
            groups = []
            for entry in data["groups"]:
                key = entry["tensor"]
                if key not in tensors:
                    raise BitallocError(f"scale fold: the scales {key} are missing")
                alpha = entry["alpha"]
                groups.append(FoldGroup(int(entry["block"]), str(entry["source"]), tuple(entry["targets"]),
                                        None if alpha is None else float(alpha), tensors[key].float()))
        except (KeyError, TypeError, ValueError) as exc:
            raise BitallocError(f"unreadable scale-fold record: {exc}") from None
        return cls(settings, groups)


# ----------------------------------------------------------------------------- the math


def smoothing_scales(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``, geometric mean 1, clamped (float64)."""
    x = x_max.double().clamp_min(STAT_FLOOR)
    w = w_max.double().clamp_min(STAT_FLOOR)
    s = x.pow(alpha) / w.pow(1.0 - alpha)
    s = s / s.log().mean().exp()
    return s.clamp(SCALE_MIN, SCALE_MAX)


def fold_norm_weight(weight: torch.Tensor, scales: torch.Tensor, offset: float) -> torch.Tensor:
    """The norm weight that divides the norm's output by ``scales``: its effective multiplier
    ``offset + w`` (offset 0: llama, 1: Gemma) becomes ``(offset + w) / s``."""
    return ((offset + weight.double()) / scales - offset).to(weight.dtype)


def scale_columns(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``W diag(s)``: the consumer of an input divided by ``s``."""
    return (weight.double() * scales[None, :]).to(weight.dtype)


def scale_rows(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``diag(1/s) W``: a producer whose output is divided by ``s``."""
    return (weight.double() / scales[:, None]).to(weight.dtype)


@dataclass(frozen=True)
class HeadLayout:
    """Grouped-query attention shape: ``o_proj`` column ``(h, d)`` reads value row ``(h // n_rep, d)``."""

    kv_heads: int
    n_rep: int
    head_dim: int

    def reduce(self, per_column: torch.Tensor) -> torch.Tensor:
        """Max over the query heads sharing a kv head: ``o_proj`` columns -> value rows."""
        return per_column.reshape(self.kv_heads, self.n_rep, self.head_dim).amax(dim=1).reshape(-1)

    def expand(self, per_row: torch.Tensor) -> torch.Tensor:
        """Value rows -> ``o_proj`` columns (each kv head's scale repeated for its query heads)."""
        return per_row.reshape(self.kv_heads, 1, self.head_dim).expand(self.kv_heads, self.n_rep, self.head_dim).reshape(-1)


def hessian_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)``: twice the mean squared output error over the calibration rows."""
    error = (weight - dequantized).float()
    return float(((error @ hessian) * error).sum())


def search_proxy(quantizer: Quantizer) -> Quantizer:
    """The quantizer that scores alpha candidates for layers quantized with ``quantizer`` (see the module doc)."""
    settings = quantizer.settings()
    name = settings["quantizer"]
    if name == "gptq":
        return build_quantizer("rtn", bits=settings["bits"], group_size=settings["group_size"], symmetric=settings["symmetric"])
    if name in ("billm", "pbllm", "w1p1", "dyngroup"):
        return quantizer_from_settings(BINARY_PROXY_SETTINGS)
    return quantizer


def search_quantizers(quantizers: Mapping[str, Quantizer]) -> dict[str, Quantizer]:
    """Scoring quantizer per layer: a uniform map's proxy, or RTN 3-bit g128 for a mixed one."""
    distinct = {json.dumps(q.settings(), sort_keys=True) for q in quantizers.values()}
    if len(distinct) == 1:
        proxy = search_proxy(next(iter(quantizers.values())))
    else:
        proxy = quantizer_from_settings(MIXED_SEARCH_SETTINGS)
    return {name: proxy for name in quantizers}


# ----------------------------------------------------------------------------- fold sites of a block


@dataclass(frozen=True)
class _Site:
    """A fold site inside one block, by local module names."""

    source: str
    targets: tuple[str, ...]
    norm_offset: float | None = None
    """For a norm producer: 0 (``w * x_hat``) or 1 (``(1 + w) * x_hat``); None for a linear producer."""
    heads: HeadLayout | None = None
    """For ``v_proj -> o_proj``: how value rows map to ``o_proj`` columns."""

    @property
    def is_norm(self) -> bool:
        return self.norm_offset is not None


def _norm_offset(norm: nn.Module) -> float | None:
    """0 for ``w * x_hat`` norms, 1 for Gemma's ``(1 + w) * x_hat``, None if not a bias-free
    weighted norm (probed: with ``w = 0`` the first kind outputs zeros, the second ``x_hat``)."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or getattr(norm, "bias", None) is not None:
        return None
    probe = torch.randn(2, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    with torch.no_grad(), swapped_weights(norm, {"": torch.zeros_like(weight)}):
        zero = norm(probe)
    if torch.count_nonzero(zero) == 0:
        return 0.0
    rms = probe.float().pow(2).mean(-1, keepdim=True).sqrt()
    return 1.0 if torch.allclose(zero.float(), probe.float() / rms, rtol=1e-2, atol=1e-2) else None


def _linear(block: nn.Module, name: str) -> nn.Linear | None:
    module = block.get_submodule(name) if _has(block, name) else None
    return module if isinstance(module, nn.Linear) else None


def _has(block: nn.Module, name: str) -> bool:
    try:
        block.get_submodule(name)
    except AttributeError:
        return False
    return True


def _block_sites(block: nn.Module) -> list[_Site]:
    """The fold sites of a llama/qwen/gemma-style block that exist here, in execution order
    (names: :data:`allocator.model.arch.FOLD_SITES`)."""
    names = FOLD_SITES
    sites: list[_Site] = []
    q, k, v = (_linear(block, name) for name in names.qkv)
    o = _linear(block, names.output)
    if q is not None and k is not None and v is not None and _has(block, names.attention_norm):
        offset = _norm_offset(block.get_submodule(names.attention_norm))
        if offset is not None:
            sites.append(_Site(names.attention_norm, names.qkv, norm_offset=offset))
    if v is not None and o is not None and v.bias is None and not _has(block, names.value_norm):
        module = block.get_submodule(names.value.rpartition(".")[0])
        head_dim = getattr(module, "head_dim", None)
        if isinstance(head_dim, int) and head_dim > 0 and v.out_features % head_dim == 0 and o.in_features % v.out_features == 0:
            kv_heads = v.out_features // head_dim
            n_rep = o.in_features // v.out_features
            sites.append(_Site(names.value, (names.output,), heads=HeadLayout(kv_heads, n_rep, head_dim)))
    gate, up = (_linear(block, name) for name in names.gate_up)
    down = _linear(block, names.down)
    norm_name = next((n for n in names.mlp_norms if _has(block, n)), names.mlp_norms[-1])
    if gate is not None and up is not None and _has(block, norm_name):
        offset = _norm_offset(block.get_submodule(norm_name))
        if offset is not None:
            sites.append(_Site(norm_name, names.gate_up, norm_offset=offset))
    if gate is not None and up is not None and down is not None and up.bias is None:
        sites.append(_Site(names.up, (names.down,)))
    return sites


class _InputObserver:
    """Per-channel ``max|x|`` (and, for a search, the Hessian) of one site's input; for a norm
    site also whether the norm's output is really what every target receives."""

    def __init__(self, channels: int, with_hessian: bool) -> None:
        self.absmax = torch.zeros(channels)
        self.hessian = HessianAccumulator(channels) if with_hessian else None
        self.shared = True
        self.norm_output: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).float()
        self.absmax = torch.maximum(self.absmax, flat.abs().amax(dim=0))
        if self.hessian is not None:
            self.hessian.add(flat)


def _observe(
    block: nn.Module, sites: Sequence[_Site], hidden: list[torch.Tensor], kwargs: dict[str, Any], with_hessian: bool
) -> tuple[list[_InputObserver], list[torch.Tensor]]:
    """Run ``block`` on every batch, observing each site's input; returns the block's outputs too."""
    observers = [_InputObserver(block.get_submodule(s.targets[0]).in_features, with_hessian) for s in sites]
    handles = []

    def norm_hook(observer: _InputObserver) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            observer.norm_output = output

        return hook

    def target_hook(observer: _InputObserver, first: bool, is_norm: bool) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple) -> None:
            if is_norm and args[0] is not observer.norm_output:
                observer.shared = False
            if first:
                observer.add(args[0])

        return hook

    try:
        for site, observer in zip(sites, observers):
            if site.is_norm:
                handles.append(block.get_submodule(site.source).register_forward_hook(norm_hook(observer)))
            for i, target in enumerate(site.targets):
                handles.append(block.get_submodule(target).register_forward_pre_hook(target_hook(observer, i == 0, site.is_norm)))
        outputs = [run_block(block, h, kwargs) for h in hidden]
    finally:
        for handle in handles:
            handle.remove()
    for observer in observers:
        observer.norm_output = None
    return observers, outputs


# ----------------------------------------------------------------------------- choosing the scales


class _CurrentWeights(Mapping[str, torch.Tensor]):
    """A block's weights as folded so far: the local overlay where a site changed them, else the
    module's own (writes go to the overlay; the model is never modified)."""

    def __init__(self, block: nn.Module, overlay: dict[str, torch.Tensor]) -> None:
        self.block = block
        self.overlay = overlay

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.overlay:
            return self.overlay[name]
        return self.block.get_submodule(name).weight.detach()

    def __iter__(self):
        return iter(self.overlay)

    def __len__(self) -> int:
        return len(self.overlay)


def _candidate_scales(site: _Site, observer: _InputObserver, weights: Mapping[str, torch.Tensor], alpha: float) -> torch.Tensor:
    """The site's scales at ``alpha`` (one per producer channel, float64)."""
    w_max = torch.stack([weights[t].detach().abs().amax(dim=0).float() for t in site.targets]).amax(dim=0)
    x_max = observer.absmax
    if site.heads is not None:
        x_max, w_max = site.heads.reduce(x_max), site.heads.reduce(w_max)
    return smoothing_scales(x_max, w_max, alpha)


def _column_scales(site: _Site, scales: torch.Tensor) -> torch.Tensor:
    return site.heads.expand(scales) if site.heads is not None else scales


def _site_error(
    site: _Site, scales: torch.Tensor, weights: Mapping[str, torch.Tensor], hessian: torch.Tensor, scorers: Mapping[str, Quantizer]
) -> float:
    """Summed Hessian-weighted error of the site's scored targets with ``scales`` folded, in reference coordinates."""
    columns = _column_scales(site, scales)
    inverse = (1.0 / columns).float()
    folded_hessian = hessian * inverse[:, None] * inverse[None, :]
    total = 0.0
    for target in site.targets:
        if target not in scorers:
            continue
        weight = weights[target].detach().float()
        folded = scale_columns(weight, columns)
        dequantized = scorers[target].quantize(folded, folded_hessian).dequantized * inverse[None, :]
        total += hessian_error(weight, dequantized, hessian)
    return total


def _choose(
    site: _Site,
    observer: _InputObserver,
    weights: Mapping[str, torch.Tensor],
    settings: ScaleFoldSettings,
    scorers: Mapping[str, Quantizer],
) -> tuple[float | None, torch.Tensor]:
    """(alpha, scales) for one site: the global alpha, or the best of the grid and "no fold"."""
    if not settings.search:
        assert settings.alpha is not None
        return settings.alpha, _candidate_scales(site, observer, weights, settings.alpha)
    assert observer.hessian is not None
    hessian = observer.hessian.hessian()
    channels = site.heads.kv_heads * site.heads.head_dim if site.heads is not None else observer.absmax.numel()
    best: tuple[float, float | None, torch.Tensor] = (
        _site_error(site, torch.ones(channels, dtype=torch.float64), weights, hessian, scorers), None, torch.ones(channels, dtype=torch.float64)
    )
    for alpha in settings.grid:
        scales = _candidate_scales(site, observer, weights, alpha)
        error = _site_error(site, scales, weights, hessian, scorers)
        if error < best[0]:
            best = (error, alpha, scales)
    return best[1], best[2]


def _apply_site(site: _Site, scales: torch.Tensor, weights: _CurrentWeights) -> None:
    """Fold ``scales`` into the block's current weights (producer divided, consumers' columns multiplied)."""
    if site.is_norm:
        assert site.norm_offset is not None
        weights.overlay[site.source] = fold_norm_weight(weights[site.source], scales, site.norm_offset)
    else:
        weights.overlay[site.source] = scale_rows(weights[site.source], scales)
    columns = _column_scales(site, scales)
    for target in site.targets:
        weights.overlay[target] = scale_columns(weights[target], columns)


def _check_block(block: nn.Module, overlay: Mapping[str, torch.Tensor], hidden: torch.Tensor, expected: torch.Tensor,
                 kwargs: dict[str, Any], where: str) -> None:
    """The folded block must compute what the reference block computed (see the module doc)."""
    with swapped_weights(block, overlay):
        got = run_block(block, hidden, kwargs)
    error = float((got.float() - expected.float()).abs().max())
    scale = float(expected.float().abs().max())
    if not error <= CHECK_RTOL * scale + 1e-6:
        raise BitallocError(f"scale folding changes the output of {where} (max error {error:.3g} of {scale:.3g}); "
                            f"this block structure is not supported")


# ----------------------------------------------------------------------------- the transform


@torch.no_grad()
def compute_scale_fold(
    model: PreTrainedModel,
    samples: torch.Tensor,
    settings: ScaleFoldSettings = ScaleFoldSettings(),
    quantizers: Mapping[str, Quantizer] | None = None,
    progress: bool = True,
) -> tuple[ScaleFold, dict[str, torch.Tensor]]:
    """The scale fold of ``model`` on the calibration ``samples`` (N x seqlen token ids).

    ``quantizers`` (qualified linear name -> scoring quantizer, e.g. :func:`search_quantizers`)
    names the layers that will be quantized: a site none of whose targets is named is left alone,
    and a search scores only the named targets. None: every site, scored with RTN 3-bit g128.
    Returns the record and the overlay of transformed tensors (module name -> weight).
    """
    proxy = quantizer_from_settings(MIXED_SEARCH_SETTINGS) if quantizers is None else None
    named: Mapping[str, Quantizer] | None = quantizers

    def scorer_of(name: str) -> Quantizer | None:
        return proxy if named is None else named.get(name)
    fold = ScaleFold(settings)
    overlay: dict[str, torch.Tensor] = {}
    inputs = capture_block_inputs(model, samples)
    hidden = inputs.hidden_states
    prefix = decoder_prefix(model)
    layers = decoder_layers(model)
    for index in tqdm(range(len(layers)), desc="scale fold", disable=not progress):
        block = layers[index]
        kwargs = inputs.block_kwargs[index]
        qualified = {name: f"{prefix}.{index}.{name}" for name, _ in block.named_modules() if name}
        sites = [s for s in _block_sites(block) if any(scorer_of(qualified[t]) is not None for t in s.targets)]
        observers, outputs = _observe(block, sites, hidden, kwargs, settings.search)
        scorers = {local: q for local in qualified if (q := scorer_of(qualified[local])) is not None}
        local: dict[str, torch.Tensor] = {}
        current = _CurrentWeights(block, local)
        for site, observer in zip(sites, observers):
            if not observer.shared:
                log.warning("block %d: %s does not feed %s directly; not folded", index, site.source, ", ".join(site.targets))
                continue
            alpha, scales = _choose(site, observer, current, settings, scorers)
            if alpha is not None:
                _apply_site(site, scales, current)
            fold.groups.append(FoldGroup(index, qualified[site.source], tuple(qualified[t] for t in site.targets),
                                         alpha, scales.float()))
        if local:
            _check_block(block, local, hidden[0], outputs[0], kwargs, f"decoder block {index} of {type(model).__name__}")
        overlay.update({qualified[name]: weight for name, weight in local.items()})
        hidden = outputs
    return fold, overlay


__all__ = [
    "ALPHA_GRID",
    "DEFAULT_ALPHA",
    "FoldGroup",
    "ScaleFold",
    "ScaleFoldSettings",
    "compute_scale_fold",
    "fold_norm_weight",
    "hessian_error",
    "parse_alpha",
    "search_proxy",
    "search_quantizers",
    "smoothing_scales",
]
