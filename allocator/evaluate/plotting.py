"""Figures: measured perplexity against bits per weight (the Pareto plot of ``bitalloc pareto``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from allocator.solvers import UNIFORM
from allocator.storage import atomic_path


class MeasuredPoint(Protocol):
    """What the plot reads of a sweep point (:class:`allocator.jobs.pareto.SweepPoint`)."""

    solver: str
    option: str | None
    bpw: float
    perplexity: float | None

MARKERS = "os^vD<>pP*X"


def plot_pareto(points: Sequence[MeasuredPoint], path: Path, title: str, reference_ppl: float | None = None) -> Path:
    """Measured ppl (log scale) vs bpw: one line per solver, uniform options as labelled markers."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    measured = [p for p in points if p.perplexity is not None]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    solvers = sorted({p.solver for p in measured if p.solver != UNIFORM})
    for i, solver in enumerate(solvers):
        line = sorted((p for p in measured if p.solver == solver), key=lambda p: p.bpw)
        ax.plot([p.bpw for p in line], [p.perplexity for p in line], marker=MARKERS[i % len(MARKERS)], label=solver, alpha=0.8)
    uniform = sorted((p for p in measured if p.solver == UNIFORM), key=lambda p: p.bpw)
    if uniform:
        ax.scatter([p.bpw for p in uniform], [p.perplexity for p in uniform], color="black", marker="x", zorder=3, label="uniform (one option everywhere)")
        for p in uniform:
            ax.annotate(str(p.option), (p.bpw, p.perplexity), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if reference_ppl is not None:
        ax.axhline(reference_ppl, color="gray", linestyle="--", linewidth=1, label=f"float reference ({reference_ppl:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("honest bits per weight of the quantized linears")
    ax.set_ylabel("perplexity (evaluation split)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return Path(path)
