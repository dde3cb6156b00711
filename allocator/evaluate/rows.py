"""The measured row of one model variant (reference or quantized), as comparisons report it."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class VariantRow:
    name: str
    bpw: float | None
    """Stored bits per weight of the quantized linears (None for the float reference)."""
    model_mb: float
    perplexity: float
    ppl_ratio: float
    kl: float
    quantize_seconds: float
    eval_seconds: float
    eval_tokens: int

    def as_dict(self) -> dict:
        return asdict(self)
