"""bitalloc: from a model to a per-layer bit map and back (loading, calibration, evaluation, CLI)."""

__version__ = "0.1.0"
