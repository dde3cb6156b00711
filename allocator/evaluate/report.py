"""Rendering evaluation rows as a terminal table, Markdown, and JSON."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from allocator.evaluate.rows import VariantRow
from allocator.storage import write_json

SCHEMA_VERSION = 1
COLUMNS = ("variant", "bpw", "model MB", "ppl", "ppl ratio", "KL", "quantize s", "eval s")


def _cells(row: VariantRow) -> list[str]:
    return [
        row.name,
        "float" if row.bpw is None else f"{row.bpw:.3f}",
        f"{row.model_mb:.1f}",
        f"{row.perplexity:.3f}",
        f"{row.ppl_ratio:.3f}",
        f"{row.kl:.4f}",
        f"{row.quantize_seconds:.1f}",
        f"{row.eval_seconds:.1f}",
    ]


def print_rows(rows: Sequence[VariantRow], title: str = "") -> None:
    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "variant" else "right")
    for row in rows:
        table.add_row(*_cells(row))
    Console(width=max(Console().width, 120)).print(table)


def markdown_table(rows: Sequence[VariantRow]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def rows_to_json(path: Path, rows: Sequence[VariantRow], context: dict[str, Any]) -> None:
    write_json(path, {"schema_version": SCHEMA_VERSION, **context, "rows": [row.as_dict() for row in rows]})
