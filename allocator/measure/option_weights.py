"""The quantized weights a profile made: every (layer, option), kept to build any bit map cheaply.

While profiling, every option quantizes every layer alone on the reference inputs; those weights
are what the table's losses describe. Keeping them (dequantized, fp16, one safetensors file per
layer, keyed by option label) makes any allocation over the same table a lookup instead of a
calibration run: ``bitalloc pareto`` evaluates whole sweeps of bit maps this way, and the
environment's measured-KL backend swaps them into the reference model.

These "one-shot" models differ from ``bitalloc quantize`` in one respect: there, GPTQ-family
quantizers see the already-quantized prefix (sequential, as in GPTQ); here every layer saw the
reference inputs. fp16 holds every 1-4-bit grid point of these options exactly up to the scale's
own fp16 rounding, which the stored forms share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from allocator.errors import BitallocError
from allocator.storage import atomic_path

SUFFIX = ".weights"


class OptionWeights:
    """A directory of ``<layer>.safetensors`` files, each holding one fp16 tensor per option label."""

    def __init__(self, directory: Path, labels: Sequence[str]) -> None:
        self.directory = Path(directory)
        self.labels = list(labels)

    @classmethod
    def beside(cls, table_path: Path, labels: Sequence[str]) -> OptionWeights:
        """The weights kept beside the table at ``table_path`` (``<table>.weights/``)."""
        return cls(Path(table_path).with_suffix(SUFFIX), labels)

    def path(self, layer: str) -> Path:
        return self.directory / f"{layer}.safetensors"

    def has(self, layer: str) -> bool:
        return self.path(layer).is_file()

    def missing(self, layers: Sequence[str]) -> list[str]:
        return [layer for layer in layers if not self.has(layer)]

    def save(self, layer: str, weights: Mapping[str, torch.Tensor]) -> None:
        """Write one layer's weights (label -> tensor) atomically."""
        if sorted(weights) != sorted(self.labels):
            raise ValueError(f"{layer}: expected weights for {self.labels}, got {sorted(weights)}")
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {label: w.detach().to(torch.float16).contiguous() for label, w in weights.items()}
        with atomic_path(self.path(layer)) as tmp:
            save_file(tensors, str(tmp))

    def load(self, layer: str, label: str) -> torch.Tensor:
        """One (layer, option) weight as float32."""
        if label not in self.labels:
            raise BitallocError(f"option {label!r} is not in this profile ({', '.join(self.labels)})")
        if not self.has(layer):
            raise BitallocError(f"no kept weights for {layer} in {self.directory} (profile again with weights kept)")
        try:
            return load_file(str(self.path(layer)))[label].float()
        except (SafetensorError, KeyError, OSError) as exc:
            raise BitallocError(f"unreadable kept weights {self.path(layer)}: {exc}") from None

    def assemble(self, assignment: Mapping[str, str]) -> dict[str, torch.Tensor]:
        """Module name -> float32 weight for an assignment of module name -> option label."""
        missing = self.missing(list(assignment))
        if missing:
            raise BitallocError(
                f"{len(missing)} layers have no kept weights in {self.directory} (first: {missing[0]}); "
                "run bitalloc profile again (it keeps them by default)"
            )
        return {layer: self.load(layer, label) for layer, label in assignment.items()}
