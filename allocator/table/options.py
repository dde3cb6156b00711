"""Candidate options: the default set, parsing option specs, and options <-> quantizers.

An option (:class:`allocator.table.sensitivity.Option`) is a label plus the JSON settings that rebuild
its quantizer (:meth:`quantizers.Quantizer.settings`). Option specs, as ``bitalloc profile
--options`` takes them:

- ``default``: the default set (:data:`DEFAULT_OPTION_SPECS`): the 1-bit family at its defaults
  (``xnor-g128``, ``billm``, ``pbllm``, ``w1p1``) and GPTQ at 2, 3 and 4 bits, group size 128;
- ``main``: ``bitalloc run``'s set (:data:`MAIN_JOB_OPTION_SPECS`): ``xnor-g128``, ``w1p1`` and GPTQ at 2, 3 and
  4 bits with act order and mse-clipped g128 grids;
- ``binary``: the 1-bit family of the default set; ``gptq``: its GPTQ options;
- ``gptqN`` / ``rtnN`` (N = 1..8): that bit width at group size 128; ``autoroundN`` (N = 2..8): AutoRound's SignRound on
  the layer (:mod:`quantizers.autoround`; needs ``bitalloc[peers]``), symmetric, group size 128, its 200 iterations;
- ``keep8``: 8-bit symmetric per-row RTN, the "keep" option (about 8 bpw);
- a quantizer name (``xnor``, ``billm``, ``pbllm``, ``dyngroup``, ``w1p1``) for its own defaults;
- any of these or a label (``gptq-w3g128``, ``xnor-g128``) followed by ``:key=value,...`` to change
  settings (``gptq3:group_size=64``, ``pbllm:salient_fraction=0.05``). Values are ints, floats,
  ``true``/``false`` or ``none``; anything else is a string.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from allocator.errors import BitallocError
from allocator.table.sensitivity import Option
from quantizers import QUANTIZERS, Quantizer, build_quantizer

DEFAULT_GROUP_SIZE = 128

FLOAT_QUANTIZERS = frozenset({"none", "float", "fp16", "keep"})
"""Quantizer names in option settings that leave the weight in float16."""


def is_one_bit(quantizer: str) -> bool:
    """Whether the quantizer named ``quantizer`` in option settings is a 1-bit format."""
    return quantizer in QUANTIZERS and QUANTIZERS[quantizer].one_bit

KEEP_LABEL = "keep8"
KEEP_SETTINGS: dict[str, Any] = {"quantizer": "rtn", "bits": 8, "group_size": None, "symmetric": True}

BINARY_OPTION_SPECS = ("xnor:group_size=128", "billm", "pbllm", "w1p1")
GPTQ_OPTION_SPECS = ("gptq2", "gptq3", "gptq4")
BIT_WIDTH_PREFIXES = ("gptq", "rtn", "autoround")
"""Quantizer names that take a bit width in a spec (``gptq3``, ``autoround2``)."""
DEFAULT_OPTION_SPECS = BINARY_OPTION_SPECS + GPTQ_OPTION_SPECS
MAIN_JOB_OPTION_SPECS = ("xnor:group_size=128", "w1p1", *(f"gptq{b}:clip=mse,act_order=true" for b in (2, 3, 4)))
"""``bitalloc run``'s candidates: GPTQ with act order and mse-clipped grids, and of the 1-bit family the two that earn their
profiling time (in a probe on SmolLM2, BiLLM and PB-LLM cost 4x the rest of the profile for 2% ppl at 2.5 bpw; the set's
own allocations are measured in results/sensitivity.md and results/main_job.md)."""
GROUPS: dict[str, tuple[str, ...]] = {
    "default": DEFAULT_OPTION_SPECS,
    "main": MAIN_JOB_OPTION_SPECS,
    "binary": BINARY_OPTION_SPECS,
    "gptq": GPTQ_OPTION_SPECS,
}


def quantizer_from_settings(settings: Mapping[str, Any]) -> Quantizer:
    """Build the quantizer of an option's (or a bit-map entry's) settings; bad settings are a
    one-line :class:`BitallocError`."""
    if "quantizer" not in settings:
        raise BitallocError(f"option settings without a 'quantizer': {dict(settings)}")
    name = str(settings["quantizer"])
    if name not in QUANTIZERS:
        raise BitallocError(f"unknown quantizer {name!r}; choose from {', '.join(sorted(QUANTIZERS))}")
    rest = {k: v for k, v in settings.items() if k != "quantizer"}
    try:
        return build_quantizer(name, **rest)
    except (TypeError, ValueError) as exc:
        raise BitallocError(f"bad settings for {name}: {exc}") from None


def option_for(quantizer: Quantizer, label: str | None = None) -> Option:
    """The option that stores a layer with ``quantizer`` (label: its own, or ``keep8``)."""
    settings = quantizer.settings()
    if label is None:
        label = KEEP_LABEL if settings == KEEP_SETTINGS else quantizer.label()
    return Option(label, settings)


def _value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _base_settings(name: str) -> dict[str, Any] | None:
    """Settings of a spec name without overrides, or None if the name is not a single option."""
    if name == KEEP_LABEL:
        return dict(KEEP_SETTINGS)
    if name in QUANTIZERS:
        if name in BIT_WIDTH_PREFIXES:
            return None  # need a bit width: gptq3, rtn4, ...
        return {"quantizer": name}
    for prefix in BIT_WIDTH_PREFIXES:
        suffix = name[len(prefix) :]
        if name.startswith(prefix) and suffix.isdigit() and 1 <= int(suffix) <= 8:
            return {"quantizer": prefix, "bits": int(suffix), "group_size": DEFAULT_GROUP_SIZE}
    return None


def _known_labels() -> dict[str, dict[str, Any]]:
    """Labels of the named options (``gptq-w3g128``, ``xnor-g128``, ``billm-b128``, ...) -> settings."""
    names = [*DEFAULT_OPTION_SPECS, *QUANTIZERS, KEEP_LABEL, *(f"{p}{b}" for p in ("gptq", "rtn") for b in range(1, 9))]
    out: dict[str, dict[str, Any]] = {}
    for spec in names:
        if _base_settings(spec.partition(":")[0]) is None:
            continue
        for option in _parse_one(spec, allow_labels=False):
            out.setdefault(option.label, dict(option.settings))
    return out


def _parse_one(spec: str, allow_labels: bool = True) -> list[Option]:
    name, _, overrides = spec.strip().partition(":")
    if name in GROUPS:
        if overrides:
            raise BitallocError(f"option group {name!r} takes no settings (got {spec!r})")
        return [opt for s in GROUPS[name] for opt in _parse_one(s)]
    settings = _base_settings(name)
    if settings is None and allow_labels:
        settings = _known_labels().get(name)
    if settings is None:
        raise BitallocError(
            f"unknown option {spec!r}: use default, main, binary, gptq, gptqN, rtnN, autoroundN, keep8, a quantizer name "
            f"({', '.join(sorted(QUANTIZERS))}) or a label, optionally with :key=value,..."
        )
    if overrides:
        for item in overrides.split(","):
            key, equals, value = item.partition("=")
            if not equals or not key.strip() or key.strip() == "quantizer":
                raise BitallocError(f"bad option setting {item!r} in {spec!r} (expected key=value)")
            settings[key.strip()] = _value(value.strip())
    return [option_for(quantizer_from_settings(settings))]


def parse_options(specs: Iterable[str]) -> list[Option]:
    """Options of ``specs`` (see the module doc), in order; a duplicate label is an error."""
    options: list[Option] = []
    for spec in specs:
        for option in _parse_one(spec):
            if any(o.label == option.label for o in options):
                raise BitallocError(f"option {option.label!r} is listed twice")
            options.append(option)
    if not options:
        raise BitallocError("no options given")
    return options


def default_options(keep: bool = False) -> list[Option]:
    """The default candidate set, plus ``keep8`` when ``keep``."""
    return parse_options([*DEFAULT_OPTION_SPECS, *((KEEP_LABEL,) if keep else ())])


UNIFORM_QUANTIZERS = ("rtn", "gptq")
GROUPED_BINARY = ("xnor", "pbllm", "w1p1")
"""1-bit quantizers with a ``group_size`` setting (input columns sharing a scale)."""


def quantizer_from_flags(
    name: str,
    bits: int | None = None,
    group_size: int | None = None,
    group_size_given: bool = False,
    symmetric: bool = False,
    act_order: bool = False,
) -> Quantizer:
    """The quantizer ``bitalloc eval --quantizer NAME`` means with the given flags.

    RTN and GPTQ take ``bits`` (default 3), ``group_size`` (default 128) and ``symmetric``; GPTQ
    also ``act_order``. The 1-bit family runs at its defaults; of the flags only ``--group-size``
    applies, to xnor, pbllm and w1p1. A flag that does not apply is a one-line error.
    """
    if name not in QUANTIZERS:
        raise BitallocError(f"unknown quantizer {name!r}; choose from {', '.join(sorted(QUANTIZERS))}")
    if act_order and name != "gptq":
        raise BitallocError(f"--act-order applies to gptq only, not {name}")
    if name in UNIFORM_QUANTIZERS:
        bits = 3 if bits is None else bits
        if not 1 <= bits <= 8:
            raise BitallocError(f"--bits must be between 1 and 8, got {bits}")
        settings: dict[str, Any] = {
            "quantizer": name,
            "bits": bits,
            "group_size": group_size if group_size_given else DEFAULT_GROUP_SIZE,
            "symmetric": symmetric,
        }
        if name == "gptq":
            settings["act_order"] = act_order
        return quantizer_from_settings(settings)
    if bits is not None:
        raise BitallocError(f"--bits does not apply to {name}: the 1-bit family has a fixed code width")
    if symmetric:
        raise BitallocError(f"--sym does not apply to {name} (1-bit codes are symmetric already)")
    settings = {"quantizer": name}
    if group_size_given:
        if name not in GROUPED_BINARY:
            raise BitallocError(f"--group-size does not apply to {name}; it does to {', '.join(UNIFORM_QUANTIZERS + GROUPED_BINARY)}")
        settings["group_size"] = group_size
    return quantizer_from_settings(settings)


__all__: Sequence[str] = [
    "DEFAULT_OPTION_SPECS",
    "KEEP_LABEL",
    "default_options",
    "option_for",
    "parse_options",
    "quantizer_from_flags",
    "quantizer_from_settings",
]
