"""Profiling: the sensitivity table of a model, from one calibration pass over the reference.

The reference model runs block by block on the calibration samples (memory stays bounded: only
one block's inputs and its linears' statistics are held). While a block runs, hooks collect every
linear layer's input Hessian ``H = 2 X^T X / n`` and activation statistics
(:class:`allocator.model.calibration.InputStatistics`). Then, for each of the block's layers, the feature
measurements are taken (:mod:`allocator.measure.features`) and every candidate option quantizes that layer
alone, on the reference weights and the reference inputs, recording:

- ``bits``: the exact stored bits of the quantized tensor;
- ``hessian_err`` (the first loss, the solvers' default): ``tr((W - Q) H (W - Q)^T)``, i.e. twice the
  mean squared output error of the layer over its calibration tokens (an output-MSE proxy);
- ``weight_err``: ``||W - Q||_F^2``;
- ``kl`` (with ``measure_kl``): the measured mean per-token KL(reference || model) on the first
  ``kl_samples`` calibration windows, with only that layer quantized (a full forward per
  (layer, option): expensive, and it holds the reference log-probabilities of those windows,
  ``kl_samples * seqlen * vocab`` floats, in memory).

The table is cached under ``$BITALLOC_CACHE/profiles``, keyed by model (name and a fingerprint of
its weights), corpus, samples, seqlen, seed, the option set, the KL settings and
:data:`CODE_VERSION`. Each finished layer is saved at once in a ``.partial`` directory beside the
table, so an interrupted run resumes where it stopped; the directory is removed once the table is
written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from allocator import __version__
from allocator.errors import BitallocError
from allocator.evaluate.accounting import OTHER_TENSOR_BITS, model_size_bytes
from allocator.evaluate.perplexity import next_token_logprobs
from allocator.measure.distributed import RayLayerScorer, RaySettings
from allocator.measure.features import FEATURE_NAMES, FEATURE_SCHEMA, LayerMeasurements, feature_matrix, measure_layer
from allocator.measure.option_scores import OptionScore, score_options
from allocator.measure.option_weights import OptionWeights
from allocator.measure.proxies import GPTQ_BY_RTN_SUFFIX, pricing_quantizer
from allocator.model.arch import tie_groups
from allocator.model.blockwise import BlockwiseForward
from allocator.model.calibration import BlockInputs, InputStatistics, capture_block_inputs, run_block
from allocator.model.corpus import Corpus
from allocator.model.layers import decoder_layers, decoder_prefix, layer_linears, quantizable_linears, swapped_weights
from allocator.model.loading import LoadedModel
from allocator.model.placement import CPU, working_block
from allocator.model.tokens import calibration_samples
from allocator.quantize.scalefold import ScaleFoldSettings, compute_scale_fold
from allocator.storage import cache_dir, write_json
from allocator.table.losses import HESSIAN_ERR, KL, WEIGHT_ERR
from allocator.table.options import default_options
from allocator.table.sensitivity import Option, SensitivityTable, TableKey
from quantizers import QuantizedTensor, Quantizer
from quantizers.base import single_threaded

log = logging.getLogger(__name__)

PROFILE_VERSION = 1
"""Bump when what a profile measures changes (invalidates cached tables)."""
CODE_VERSION = f"{__version__}+profile{PROFILE_VERSION}+{FEATURE_SCHEMA}"
PROFILE_CACHE = "profiles"
LOSS_DESCRIPTIONS = {
    HESSIAN_ERR: "tr((W-Q) H (W-Q)^T), H = 2 X^T X / n of the reference inputs (layer quantized alone)",
    WEIGHT_ERR: "||W-Q||_F^2",
    KL: "mean per-token KL(reference || model) on the first kl_samples calibration windows, only this layer quantized",
}
BARE_PROFILE_LOSSES = (HESSIAN_ERR, WEIGHT_ERR)
"""The losses of a profile made without ``measure_kl``."""
DEFAULT_SAMPLES = 64
DEFAULT_SEQLEN = 512
DEFAULT_KL_SAMPLES = 4


# ----------------------------------------------------------------------------- per-layer results


@dataclass
class LayerResult:
    """Everything a profile keeps of one layer (saved as JSON in the partial directory)."""

    name: str
    bits: list[int]
    losses: dict[str, list[float]]
    measurements: LayerMeasurements
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "bits": self.bits,
            "losses": self.losses,
            "measurements": self.measurements.as_dict(),
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LayerResult:
        return cls(
            name=str(data["name"]),
            bits=[int(b) for b in data["bits"]],
            losses={str(k): [float(x) for x in v] for k, v in data["losses"].items()},
            measurements=LayerMeasurements.from_dict(data["measurements"]),
            seconds=float(data["seconds"]),
        )


class KLProbe:
    """Mean per-token KL(reference || model) on fixed windows, the reference computed once.

    An overlay that changes only blocks ``>= b`` leaves every block's input before ``b`` as it is,
    so where it can the probe keeps each window's input to every decoder block and runs only blocks
    ``b..`` plus the final norm and head (about half the forward on average), block by block
    (:class:`allocator.model.blockwise.BlockwiseForward`: each block an fp32 copy on ``device``, the overlay swapped into
    that copy). That shortcut is used only if, on the ``base`` weights, it reproduces the full forward's
    log-probabilities; otherwise (an architecture whose head this does not understand) every call runs the whole model.

    ``base`` (module name -> weight) is swapped in under every overlay: the KL is then that of a whole
    quantized allocation with one more change, still against the unquantized reference, which is how
    the single-layer losses are re-measured around an allocation instead of around the float model.

    The reference is the whole forward for an fp32 model on the CPU; on another device, or for a model stored in another
    dtype, it is the block-wise forward too (whose check against the whole forward, in the storage dtype, then only
    has to agree to that dtype's rounding).
    """

    def __init__(self, model: PreTrainedModel, windows: torch.Tensor, base: Mapping[str, torch.Tensor] | None = None,
                 device: torch.device = CPU) -> None:
        self.model = model
        self.windows = windows
        self.base = dict(base or {})
        self._forward = BlockwiseForward(model, device)
        whole_reference = self._forward.stored_fp32 and device == CPU
        with torch.inference_mode():
            self.reference = [next_token_logprobs(model, w[None]) for w in windows] if whole_reference else []
        self._block_inputs: list[list[torch.Tensor]] | None = None
        self._captured: BlockInputs | None = None
        with torch.inference_mode():
            self._prepare_tail()
        if not self.reference:
            with torch.inference_mode():
                if self._block_inputs is not None:
                    self.reference = [self._tail_logprobs(0, index, {}) for index in range(len(windows))]
                else:
                    self.reference = [next_token_logprobs(model, w[None]) for w in windows]
        self.tokens = sum(r.shape[0] for r in self.reference)

    def _prepare_tail(self) -> None:
        forward = self._forward
        if not forward.handles(self.base) or (self.base and self._first_block(self.base) is None):
            return  # no norm/head this understands, or a base outside the blocks: whole forwards
        captured = forward.capture(self.windows, batch_size=1)
        inputs = [list(captured.hidden_states)]
        for index in range(len(forward.layers) - 1):
            inputs.append([forward.run_blocks(h, captured, self.base, index, index + 1) for h in inputs[-1]])
        self._block_inputs, self._captured = inputs, captured
        if self.reference and not self.base:
            whole = self.reference[0]
        else:
            with swapped_weights(self.model, self.base):
                whole = next_token_logprobs(self.model, self.windows[:1])
        tolerance = 1e-4 if forward.stored_fp32 else 0.1  # bf16/fp16 activations in the whole forward
        if not torch.allclose(self._tail_logprobs(0, 0, {}), whole, rtol=tolerance, atol=tolerance):
            log.debug("KL probe: the block-wise forward does not reproduce %s; using whole forwards", type(self.model).__name__)
            self._block_inputs = None

    def _tail_logprobs(self, start: int, window: int, overlay: Mapping[str, torch.Tensor]) -> torch.Tensor:
        assert self._block_inputs is not None and self._captured is not None
        weights = {**self.base, **overlay}
        hidden = self._forward.run_blocks(self._block_inputs[start][window], self._captured, weights, start)
        return self._forward.logprobs(hidden[0], weights)

    def _first_block(self, overlay: Mapping[str, torch.Tensor]) -> int | None:
        """The first decoder block ``overlay`` touches; None if it touches anything outside the
        blocks (embeddings, final norm, head: the whole forward runs)."""
        blocks = []
        prefix = self._forward.prefix
        for name in overlay:
            rest = name[len(prefix):] if name.startswith(prefix) else ""
            index = rest.split(".", 1)[0]
            if not index.isdigit():
                return None
            blocks.append(int(index))
        return min(blocks, default=None)

    @torch.inference_mode()
    def mean_kl(self, overlay: Mapping[str, torch.Tensor]) -> float:
        """KL with the weights of ``overlay`` (module name -> weight) swapped in."""
        total = 0.0
        start = self._first_block(overlay) if self._block_inputs is not None else None
        for index, (window, reference) in enumerate(zip(self.windows, self.reference)):
            if start is None:
                with swapped_weights(self.model, {**self.base, **overlay}):
                    logprobs = next_token_logprobs(self.model, window[None])
            else:
                logprobs = self._tail_logprobs(start, index, overlay)
            with single_threaded():  # a threaded sum rounds by its thread count; one thread: the same sum in every process
                total += torch.nn.functional.kl_div(logprobs, reference, log_target=True, reduction="sum").item()
        return max(total / max(self.tokens, 1), 0.0)  # float noise can dip a hair below 0


def layer_result(
    name: str,
    measurements: LayerMeasurements,
    scores: Sequence[OptionScore],
    kl_probe: KLProbe | None,
    kept: dict[str, QuantizedTensor] | None,
    seconds: float,
) -> LayerResult:
    """A layer's row of the table from its options' scores; with ``kl_probe`` each option's KL is measured here, and
    with ``kept`` each option's weights are put there under its index ("0", "1", ...)."""
    start = time.perf_counter()
    losses: dict[str, list[float]] = {HESSIAN_ERR: [s.hessian_err for s in scores], WEIGHT_ERR: [s.weight_err for s in scores]}
    if kl_probe is not None:
        losses[KL] = [kl_probe.mean_kl({name: s.quantized.dequantized}) for s in scores]
    if kept is not None:
        kept.update({str(index): s.quantized for index, s in enumerate(scores)})
    return LayerResult(name, [s.bits for s in scores], losses, measurements, seconds + time.perf_counter() - start)


def layer_inputs(weight: torch.Tensor, stats: InputStatistics) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 CPU weight and finished input Hessian the quantizers take (the block ran on its device)."""
    return weight.detach().float().cpu(), stats.hessian.finish().cpu()


@torch.inference_mode()
def profile_layer(
    name: str,
    weight: torch.Tensor,
    stats: InputStatistics,
    quantizers: Sequence[Quantizer],
    block: int,
    num_blocks: int,
    kl_probe: KLProbe | None = None,
    kept: dict[str, QuantizedTensor] | None = None,
) -> LayerResult:
    """Measure one layer and quantize it alone with every quantizer (see the module doc); with
    ``kept``, each quantizer's result is put there under its index ("0", "1", ...)."""
    start = time.perf_counter()
    w, hessian = layer_inputs(weight, stats)
    measurements = measure_layer(name, w, hessian, stats.absmax.cpu(), block, num_blocks)
    scores = score_options(quantizers, w, hessian)
    return layer_result(name, measurements, scores, kl_probe, kept, time.perf_counter() - start)


# ----------------------------------------------------------------------------- cache and resume


def model_fingerprint(model: nn.Module) -> str:
    """Short hash of the config and every parameter's name, shape, sum and sum of squares."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(config.to_json_string(use_diff=False).encode())
    with torch.inference_mode():
        for name, tensor in model.state_dict().items():
            total, squares = _sums(tensor)
            digest.update(f"{name}{tuple(tensor.shape)}{total:.10e}{squares:.10e}".encode())
    return digest.hexdigest()[:16]


FINGERPRINT_CHUNK = 1 << 22
"""Elements summed at a time in float64 (32 MB): a whole-tensor float64 copy of an 8B model's embedding is 4 GB, two
of them (the sum of squares) were the profile's peak."""


def _sums(tensor: torch.Tensor) -> tuple[float, float]:
    """Sum and sum of squares of ``tensor`` in float64, a chunk at a time (the same digits, at the 10 kept, as the
    whole-tensor sums on both real models: their cached profiles keep their ids)."""
    total = squares = 0.0
    for chunk in tensor.detach().reshape(-1).split(FINGERPRINT_CHUNK):
        part = chunk.double()
        total += float(part.sum())
        squares += float((part * part).sum())
    return total, squares


def profile_cache_id(key: TableKey, options: Sequence[Option], fingerprint: str, measure_kl: bool, kl_samples: int) -> str:
    """Hash of everything a cached table depends on."""
    ident = {
        "key": asdict(key),
        "options": [o.as_dict() for o in options],
        "fingerprint": fingerprint,
        "kl_samples": kl_samples if measure_kl else 0,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def profile_cache_path(model: str, cache_id: str) -> Path:
    """``$BITALLOC_CACHE/profiles/<model>-<cache id>.npz``."""
    return cache_dir(PROFILE_CACHE) / f"{model_slug(model)}-{cache_id}.npz"


def model_slug(model: str) -> str:
    """A file-name-safe short form of a model spec (a path's last part): cache files stay inside the cache."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model).name or model).strip("._")[:48] or "model"


def cached_table(path: Path, key: TableKey, labels: Sequence[str], names: Sequence[str]) -> SensitivityTable | None:
    """The table cached at ``path`` if it was made for ``key``, these option labels and these layers; None when there
    is none, or it is for something else or unreadable (then it is recomputed and overwritten)."""
    if not path.is_file():
        return None
    try:
        table = SensitivityTable.load(path)
    except BitallocError as exc:
        log.warning("recomputing: %s", exc)
        return None
    return table if table.key == key and table.labels == list(labels) and table.names == list(names) else None


def cached_table_path(table: SensitivityTable) -> Path:
    """Where :func:`profile_model` caches ``table``."""
    cache_id = table.metadata.get("cache_id")
    if not cache_id:
        raise BitallocError("this sensitivity table was not made by bitalloc profile (no cache id)")
    return profile_cache_path(table.key.model, cache_id)


class PartialProfile:
    """The finished layers of an interrupted profile: one JSON file per layer in a directory."""

    def __init__(self, directory: Path, cache_id: str, labels: Sequence[str]) -> None:
        self.directory = directory
        self.header = {"cache_id": cache_id, "labels": list(labels), "profile_version": PROFILE_VERSION}

    def _layer_path(self, name: str) -> Path:
        return self.directory / f"{name}.json"

    def load(self) -> dict[str, LayerResult]:
        """The layers saved so far (an unreadable or mismatched state counts as none)."""
        header_path = self.directory / "header.json"
        if not header_path.is_file():
            return {}
        try:
            if json.loads(header_path.read_text()) != self.header:
                log.warning("ignoring partial profile %s: made for other settings", self.directory)
                return {}
        except (OSError, json.JSONDecodeError):
            return {}
        done = {}
        for path in sorted(self.directory.glob("*.json")):
            if path.name == "header.json":
                continue
            try:
                result = LayerResult.from_json(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
                log.warning("ignoring unreadable partial result %s", path.name)
                continue
            if len(result.bits) == len(self.header["labels"]) and all(len(v) == len(result.bits) for v in result.losses.values()):
                done[result.name] = result
        return done

    def save(self, result: LayerResult) -> None:
        header_path = self.directory / "header.json"
        if not header_path.is_file():
            self.directory.mkdir(parents=True, exist_ok=True)
            write_json(header_path, self.header)
        write_json(self._layer_path(result.name), result.to_json())

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


# ----------------------------------------------------------------------------- the profile


def collect_and_run(
    block: nn.Module, wanted: Sequence[str], hidden: list[torch.Tensor], kwargs: dict[str, Any]
) -> tuple[dict[str, InputStatistics], list[torch.Tensor]]:
    """Run ``block`` on every hidden batch, collecting the input statistics of the ``wanted``
    linears (layers fed the same tensor, like q/k/v, share one accumulator); returns the block's
    outputs too."""
    modules = layer_linears(block)
    stats: dict[str, InputStatistics] = {}
    last: list[Any] = [None, None]  # the last input tensor seen and its statistics

    def make_hook(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            if last[0] is x:  # the previous linear's input (held in ``last``, so identity is safe)
                stats[name] = last[1]
                return
            if name not in stats:
                stats[name] = InputStatistics(modules[name].in_features)
            stats[name].add(x)
            last[0], last[1] = x, stats[name]

        return hook

    handles = [modules[name].register_forward_pre_hook(make_hook(name)) for name in wanted]
    try:
        outputs = [run_block(block, h, kwargs) for h in hidden]
    finally:
        for handle in handles:
            handle.remove()
    return stats, outputs


def _build_table(
    key: TableKey,
    names: Sequence[str],
    options: Sequence[Option],
    results: Mapping[str, LayerResult],
    metadata: dict[str, Any],
) -> SensitivityTable:
    rows = [results[n] for n in names]
    loss_names = list(rows[0].losses)
    measurements = [r.measurements for r in rows]
    metadata = {**metadata, "layer_seconds": sum(r.seconds for r in rows)}
    return SensitivityTable(
        names=list(names),
        numel=np.array([m.numel for m in measurements], dtype=np.int64),
        tie_group=tie_groups(list(names)),
        options=list(options),
        bits=np.array([r.bits for r in rows], dtype=np.int64),
        losses={loss: np.array([r.losses[loss] for r in rows], dtype=np.float64) for loss in loss_names},
        key=key,
        features=feature_matrix(measurements),
        feature_names=list(FEATURE_NAMES),
        feature_schema=FEATURE_SCHEMA,
        metadata=metadata,
    )


def profile_model(
    loaded: LoadedModel,
    corpus: Corpus,
    options: Sequence[Option] | None = None,
    samples: int = DEFAULT_SAMPLES,
    seqlen: int = DEFAULT_SEQLEN,
    seed: int = 0,
    measure_kl: bool = False,
    kl_samples: int = DEFAULT_KL_SAMPLES,
    cache: bool = True,
    recompute: bool = False,
    progress: bool = True,
    keep_weights: bool = True,
    scale_fold: ScaleFoldSettings | None = None,
    gptq_by_rtn: bool = False,
    device: torch.device = CPU,
    ray: RaySettings | None = None,
) -> SensitivityTable:
    """The sensitivity table of ``loaded`` for ``options`` (default: :func:`allocator.table.options.default_options`).

    With ``cache`` a table made before with the same settings is loaded instead of recomputed
    (``recompute`` forces a fresh one), and finished layers of an interrupted run are reused.
    The table's path in the cache is :func:`cached_table_path`. With ``keep_weights`` (and
    ``cache``) every (layer, option) weight is kept beside it (:mod:`allocator.measure.option_weights`);
    a cached table whose weights are missing is completed.

    With ``scale_fold`` the layers are profiled on the scale-folded model
    (:func:`allocator.quantize.scalefold.compute_scale_fold` on the same calibration samples, scored with RTN
    3-bit g128 when searching, as ``quantize --scale-fold`` does for a bit map). The settings enter
    the table's key (appended to its code version, so the cache id and every digest of the key
    differ from the unfolded table's) and its metadata. No option weights are kept then: they would
    be the folded model's, which a consumer swapping them into the reference would misread.

    With ``gptq_by_rtn`` every loss (and kept weight) of a GPTQ option is measured on RTN onto the same grid
    (:mod:`allocator.measure.proxies`): the profile skips GPTQ's per-option column loop; the options, their bits
    and the bit maps solved on the table stay GPTQ. This too enters the key's code version and the metadata.

    Each decoder block runs on ``device`` in fp32 (:mod:`allocator.model.placement`), the model staying where and in the
    dtype it is stored; the device does not enter the key (the same table, up to float rounding, on any device).

    With ``ray`` the options are quantized on a Ray cluster (:mod:`allocator.measure.distributed`): the same table as
    the serial run, so it does not enter the key either.
    """
    start = time.perf_counter()
    options = list(options) if options is not None else default_options()
    if not options:
        raise BitallocError("a profile needs at least one option")
    if measure_kl and not 1 <= kl_samples <= samples:
        raise BitallocError(f"the KL is measured on 1 to {samples} (the calibration samples) windows, got {kl_samples}")
    quantizers = [pricing_quantizer(o.settings, gptq_by_rtn) for o in options]
    model = loaded.model
    linears = quantizable_linears(model)
    names = list(linears)
    if not names:
        raise BitallocError(f"{loaded.name} has no linear layers in its decoder blocks")
    code_version = CODE_VERSION + (scale_fold.key_suffix() if scale_fold is not None else "") + (GPTQ_BY_RTN_SUFFIX if gptq_by_rtn else "")
    key = TableKey(model=loaded.name, corpus=corpus.name, samples=samples, seqlen=seqlen, code_version=code_version, seed=seed)
    fingerprint = model_fingerprint(model)
    cache_id = profile_cache_id(key, options, fingerprint, measure_kl, kl_samples)
    path = profile_cache_path(loaded.name, cache_id)
    labels = [o.label for o in options]
    kept = OptionWeights.beside(path, labels) if cache and keep_weights and scale_fold is None else None
    cached = cached_table(path, key, labels, names) if cache and not recompute else None
    if cached is not None:
        if kept is None or not kept.missing(names):
            log.info("using the cached profile %s", path)
            return cached
        log.info("completing the kept weights of the cached profile %s", path)
    partial = PartialProfile(path.with_suffix(".partial"), cache_id, labels)
    if recompute:
        partial.remove()
        if kept is not None:
            shutil.rmtree(kept.directory, ignore_errors=True)
    done = partial.load() if cache else {}
    if kept is not None:  # a layer counts as done only with its weights kept
        done = {name: result for name, result in done.items() if kept.has(name)}
    if done:
        log.info("resuming the profile: %d of %d layers done", len(done), len(names))
    total_numel = sum(m.weight.numel() for m in linears.values())
    metadata = {
        "profile_version": PROFILE_VERSION,
        "cache_id": cache_id,
        "model_fingerprint": fingerprint,
        "measure_kl": measure_kl,
        "kl_samples": kl_samples if measure_kl else 0,
        "calibration_tokens": samples * seqlen,
        "add_bos": loaded.add_bos,
        "other_bytes": model_size_bytes(model) - total_numel * OTHER_TENSOR_BITS // 8,
        "losses": {k: v for k, v in LOSS_DESCRIPTIONS.items() if k != KL or measure_kl},
    }
    if scale_fold is not None:
        metadata["scale_fold"] = scale_fold.as_dict()
    if gptq_by_rtn:
        metadata["gptq_by_rtn"] = True
    if len(done) < len(names):
        tokens = calibration_samples(loaded.tokenizer, corpus.calibration, samples, seqlen, loaded.add_bos, seed)
        log.info("profiling %d layers x %d options on %d x %d calibration tokens", len(names) - len(done), len(options), samples, seqlen)
        overlay: dict[str, torch.Tensor] = {}
        if scale_fold is not None:
            overlay = compute_scale_fold(model, tokens, scale_fold, None, progress)[1]
        with swapped_weights(model, overlay):  # the folded model computes the same function
            _profile_layers(model, tokens, quantizers, done, len(names), partial if cache else None, measure_kl, kl_samples, progress, kept,
                            device, ray)
    metadata["seconds"] = time.perf_counter() - start  # wall time of this call (a resumed profile: its own part)
    table = _build_table(key, names, options, done, metadata)
    if cache:
        table.save(path)
        partial.remove()
    return table


@torch.inference_mode()
def _profile_layers(
    model: PreTrainedModel,
    tokens: torch.Tensor,
    quantizers: Sequence[Quantizer],
    done: dict[str, LayerResult],
    total: int,
    partial: PartialProfile | None,
    measure_kl: bool,
    kl_samples: int,
    progress: bool,
    kept: OptionWeights | None = None,
    device: torch.device = CPU,
    ray: RaySettings | None = None,
) -> None:
    """Profile every layer not in ``done`` (adding it there, and to ``partial`` at once); with ``ray``, each layer's
    options are quantized on the cluster (:mod:`allocator.measure.distributed`) while the next blocks run here."""
    kl_probe = KLProbe(model, tokens[:kl_samples], device=device) if measure_kl else None
    inputs = capture_block_inputs(model, tokens, device=device)
    hidden = inputs.hidden_states
    prefix = decoder_prefix(model)
    layers = decoder_layers(model)
    qualified = [{local: f"{prefix}.{i}.{local}" for local in layer_linears(layer)} for i, layer in enumerate(layers)]
    last_needed = max(i for i, block in enumerate(qualified) if any(q not in done for q in block.values()))
    scorer = RayLayerScorer(quantizers, ray) if ray is not None else None
    with tqdm(total=total, initial=len(done), desc="profile layers", disable=not progress) as bar:

        def record(result: LayerResult, weights: dict[str, QuantizedTensor] | None) -> None:
            if kept is not None and weights is not None:
                kept.save(result.name, {kept.labels[int(i)]: w for i, w in weights.items()})
            done[result.name] = result
            if partial is not None:
                partial.save(result)
            bar.set_postfix_str(result.name, refresh=False)
            bar.update()

        def record_scored(finished: list[tuple[str, Any, list[OptionScore], float]]) -> None:
            for name, measurements, scores, seconds in finished:
                weights: dict[str, QuantizedTensor] | None = {} if kept is not None else None
                record(layer_result(name, measurements, scores, kl_probe, weights, seconds), weights)

        try:
            for index in range(last_needed + 1):
                wanted = [local for local, q in qualified[index].items() if q not in done]
                with working_block(layers[index], device) as block:
                    stats, hidden = collect_and_run(block, wanted, hidden, inputs.block_kwargs[index])
                    weights_of = {local: module.weight.detach().float().cpu() for local, module in layer_linears(block).items()}
                for local in wanted:
                    name = qualified[index][local]
                    if local not in stats:  # never called on the calibration samples (an unused expert, ...)
                        log.warning("%s saw no calibration input; its Hessian is zero", name)
                        stats[local] = InputStatistics(weights_of[local].shape[1])
                    if scorer is None:
                        weights: dict[str, QuantizedTensor] | None = {} if kept is not None else None
                        record(profile_layer(name, weights_of[local], stats[local], quantizers, index, len(layers), kl_probe, weights), weights)
                        continue
                    w, hessian = layer_inputs(weights_of[local], stats[local])
                    measurements = measure_layer(name, w, hessian, stats[local].absmax.cpu(), index, len(layers))
                    record_scored(scorer.submit(name, w, hessian, measurements))
                    record_scored(scorer.collect())
                del stats
            if scorer is not None:
                record_scored(scorer.collect(everything=True))
        finally:
            if scorer is not None:
                scorer.close()


TIMING_KEYS = frozenset({"seconds", "layer_seconds"})
"""Metadata keys (at any depth) that hold wall-clock times: the profile's and the KL measurement's."""


def without_timings(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """``metadata`` without its wall-clock times (:data:`TIMING_KEYS`), nested records included."""
    return {key: without_timings(value) if isinstance(value, Mapping) else value
            for key, value in metadata.items() if key not in TIMING_KEYS}


def save_table(table: SensitivityTable, path: Path) -> Path:
    """Write ``table`` to ``path`` (atomically) without its wall-clock times, so that same-seed profiles
    write the same bytes (the cached copy keeps them: the benchmarks report profiling time from it);
    refuses a directory."""
    path = Path(path)
    if path.is_dir():
        raise BitallocError(f"{path} is a directory; give a file name for the table")
    return replace(table, metadata=without_timings(table.metadata)).save(path)


__all__ = [
    "CODE_VERSION",
    "HESSIAN_ERR",
    "KL",
    "KLProbe",
    "LayerResult",
    "WEIGHT_ERR",
    "cached_table_path",
    "profile_layer",
    "profile_model",
    "save_table",
]
