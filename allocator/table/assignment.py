"""The assignment: which quantizer settings every quantized module gets.

A bit map decides one (:meth:`allocator.table.bitmap.BitMap.assignment`), quantizing applies it,
and a packed model records it. It holds settings (JSON-able, ``{"quantizer": "gptq", "bits": 3,
...}``); :meth:`Assignment.quantizers` builds the quantizer objects that do the work.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from allocator.errors import BitallocError
from allocator.table.options import quantizer_from_settings
from quantizers import Quantizer

Settings = Mapping[str, Any]
"""One module's quantizer settings, as :meth:`quantizers.base.Quantizer.settings` writes them."""


class Assignment(Mapping[str, Settings]):
    """Module name -> quantizer settings (read-only; each value a plain dict copy)."""

    def __init__(self, settings: Mapping[str, Settings]) -> None:
        self._settings: dict[str, dict[str, Any]] = {module: dict(s) for module, s in settings.items()}

    @classmethod
    def uniform(cls, modules: Iterable[str], settings: Settings) -> Assignment:
        """The same settings for every module."""
        return cls({module: settings for module in modules})

    def __getitem__(self, module: str) -> dict[str, Any]:
        return dict(self._settings[module])

    def __iter__(self) -> Iterator[str]:
        return iter(self._settings)

    def __len__(self) -> int:
        return len(self._settings)

    def __repr__(self) -> str:
        return f"Assignment({len(self)} modules)"

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {module: dict(s) for module, s in self._settings.items()}

    def quantizers(self) -> dict[str, Quantizer]:
        """Module name -> quantizer (one instance per distinct setting); bad settings are a one-line
        :class:`~allocator.errors.BitallocError` naming the first module that has them."""
        built: dict[str, Quantizer] = {}
        out: dict[str, Quantizer] = {}
        for module, settings in self._settings.items():
            key = repr(sorted(settings.items()))
            if key not in built:
                try:
                    built[key] = quantizer_from_settings(settings)
                except BitallocError as exc:
                    raise BitallocError(f"{module}: {exc}") from None
            out[module] = built[key]
        return out
