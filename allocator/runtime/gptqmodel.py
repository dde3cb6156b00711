"""A bit map as GPTQModel's per-module ``dynamic`` quantization config."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from allocator.errors import BitallocError
from allocator.table.options import FLOAT_QUANTIZERS, is_one_bit

if TYPE_CHECKING:
    from allocator.table.bitmap import BitMap


def gptqmodel_dynamic(bitmap: BitMap) -> dict[str, dict[str, Any]]:
    """GPTQModel ``QuantizeConfig(dynamic=...)``: ``"+:<escaped module name>$" -> {"bits", "group_size"}``
    (``group_size`` -1 for one group per row, ``sym`` when the option sets it); float options become
    ``"-:<name>$": {}`` (skip quantization). GPTQModel matches the keys with ``re.match``. Options
    GPTQModel cannot store (the 1-bit family) raise :class:`BitallocError`."""
    dynamic: dict[str, dict[str, Any]] = {}
    for module, entry in bitmap.modules.items():
        settings = entry.settings
        pattern = re.escape(module) + "$"
        quantizer = str(settings.get("quantizer", ""))
        bits = settings.get("bits")
        if quantizer in FLOAT_QUANTIZERS and bits in (None, 16):
            dynamic[f"-:{pattern}"] = {}
            continue
        if is_one_bit(quantizer) or not isinstance(bits, int) or bits not in (2, 3, 4, 8):
            raise BitallocError(f"GPTQModel cannot store option {entry.option!r} of {module} (bits 2, 3, 4 or 8 only)")
        group = settings.get("group_size")
        override: dict[str, Any] = {"bits": bits, "group_size": -1 if group is None else int(group)}
        if "symmetric" in settings:
            override["sym"] = bool(settings["symmetric"])
        dynamic[f"+:{pattern}"] = override
    return dynamic
