"""Is ``bitalloc run``'s single-layer KL table better used smoothed? -> results/kl_smoothing.md.

results/loss_model_transfer.md's oracle rows (each layer's measured KL at one option plus option offsets taken from
*another* model) beat the ILP on the measured KL table itself in 4 of 6 cases: the table's single-layer KL on 128
tokens is noisy per (layer, option), and ``log kl[l, o] ≈ level[l] + offset[o]`` keeps what is reliable in it. Here
the same idea on a model's own table, nothing from another model:

- ``raw``: the table as ``bitalloc run`` solves it;
- ``rank one``: least squares of ``log kl`` on one level per layer plus one offset per option;
- ``rank one by kind``: the same with one offset per (module kind, option) (q/k/v/o/gate/up/down differ);
- ``anchored``: the level is the layer's own ``log kl`` at GPTQ 3-bit, offsets the mean differences to it;
- ``half``: the geometric mean of ``raw`` and ``rank one`` (half-way shrinkage).

(``rank one by kind`` and ``half`` were listed, not measured: the run was cut to ``--variants "rank one,anchored"`` at
2.5-3.5 bpw for time; 4.0 bpw changes 6-11 layers of 126-210.)

Each loss is solved by the ILP at each budget. Two measurements: ``kept`` (the profile's one-shot weights swapped
into the float model, every variant, cheap) and ``sequential`` (the variants named by ``--sequential``, quantized as
``bitalloc run`` quantizes, on peers.py's tokens: ``raw`` there is peers.md's ``bitalloc run`` row). Records:
results/kl_smoothing/<model>.json, saved as each measurement ends; a rerun measures only what is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

import numpy as np
from _common import RESULTS, chosen_models, provenance, resumed_lines
from peers import SETTINGS, sequential_row

from allocator.jobs.compare import EvalSettings, evaluation_tokens
from allocator.jobs.pareto import Measured, allocation_hash, measure_allocations
from allocator.jobs.run import RUN_KL_SEQLEN, RUN_OPTIONS
from allocator.measure.layer_kl import add_kl_losses
from allocator.measure.option_weights import OptionWeights
from allocator.measure.profile import cached_table_path, profile_model
from allocator.model.corpus import load_corpus
from allocator.model.loading import load_model
from allocator.solvers import Budget, Constraints, solve
from allocator.storage import write_json
from allocator.table.options import parse_options
from allocator.table.sensitivity import SensitivityTable
from policies.loss_model import anchor_level, option_offsets

OUT = RESULTS / "kl_smoothing"
BUDGETS = [2.5, 3.0, 3.5, 4.0]
ANCHOR = "gptq-w3g128-act-mse"
SMOOTHED = "kl_smoothed"
_FLOOR = 1e-8


def rank_one(logged: np.ndarray, groups: np.ndarray, sweeps: int = 50) -> np.ndarray:
    """Least-squares fit of ``logged[l, o]`` (NaN: no such option) by ``level[l] + offset[groups[l], o]``
    (alternating means; exact in one sweep on a full table with one group)."""
    known = np.isfinite(logged)
    values = np.where(known, logged, 0.0)
    level = np.zeros(logged.shape[0])
    offset = np.zeros((groups.max() + 1, logged.shape[1]))
    for _ in range(sweeps):
        for g in range(offset.shape[0]):
            rows = groups == g
            residual = (values[rows] - level[rows, None]) * known[rows]
            offset[g] = residual.sum(axis=0) / np.maximum(known[rows].sum(axis=0), 1)
        level = ((values - offset[groups]) * known).sum(axis=1) / np.maximum(known.sum(axis=1), 1)
    return level[:, None] + offset[groups]


def module_kinds(names: list[str]) -> np.ndarray:
    """Each layer's module kind (its name's last part: q_proj, down_proj, ...) as a group index."""
    kinds = [name.rsplit(".", 1)[-1] for name in names]
    return np.unique(kinds, return_inverse=True)[1]


def smoothed_losses(table: SensitivityTable) -> dict[str, np.ndarray]:
    """Every variant's loss over ``table``'s layers and options (NaN where an option does not apply)."""
    kl = np.asarray(table.loss("kl"), dtype=np.float64)
    applies = table.bits >= 0
    logged = np.where(applies, np.log(np.maximum(kl, _FLOOR)), np.nan)
    single = np.zeros(len(table.names), dtype=int)
    fit = rank_one(logged, single)
    anchored = anchor_level(table, ANCHOR)[:, None] + option_offsets(table, ANCHOR)[None, :]
    variants = {"raw": logged, "rank one": fit, "rank one by kind": rank_one(logged, module_kinds(table.names)),
                "anchored": anchored, "half": 0.5 * (logged + fit)}
    return {name: np.where(applies, np.exp(value), np.nan) for name, value in variants.items()}


def allocations(table: SensitivityTable, budgets: list[float], variants: list[str] | None = None) -> list[dict[str, Any]]:
    """Per variant and budget: the ILP's bit map (``bitmap``, kept in memory), its hash, how many layers differ from
    the raw table's map, and the sum of the raw table's KL over its choices (what the raw ILP minimizes)."""
    rows: list[dict[str, Any]] = []
    raw: dict[float, dict[str, str]] = {}
    for variant, loss in smoothed_losses(table).items():
        if variants is not None and variant not in variants and variant != "raw":
            continue
        priced = dataclasses.replace(table, losses={**table.losses, SMOOTHED: loss})
        for bpw in budgets:
            bitmap = solve(priced, Budget.bpw(bpw), Constraints(loss=SMOOTHED))
            options = bitmap.options()
            raw.setdefault(bpw, options)
            raw_sum = sum(float(table.loss("kl")[i, table.option_index(options[n])]) for i, n in enumerate(table.names))
            rows.append({"variant": variant, "budget": bpw, "allocation": allocation_hash(options), "bitmap": bitmap,
                         "differs": sum(options[n] != raw[bpw][n] for n in options), "raw_kl_sum": raw_sum})
    return rows


def run_model(model: str, budgets: list[float], sequential: list[str], variants: list[str] | None) -> dict[str, Any]:
    path = OUT / f"{model}.json"
    record = json.loads(path.read_text()) if path.is_file() else {"model": model, "provenance": provenance(), "kept": {}, "sequential": {}}
    record.setdefault("resumed", []).append(provenance())
    corpus = load_corpus("enwiki")
    loaded = load_model(model)
    table = profile_model(loaded, corpus, parse_options(RUN_OPTIONS), progress=False)
    table = add_kl_losses(loaded, table, cached_table_path(table), corpus.calibration, None, seqlen=RUN_KL_SEQLEN, progress=False)
    rows = allocations(table, budgets, variants)
    listed = {(r["variant"], r["budget"]) for r in rows}
    record["rows"] = [*(r for r in record.get("rows", []) if (r["variant"], r["budget"]) not in listed),
                      *({k: v for k, v in r.items() if k != "bitmap"} for r in rows)]  # rows of an earlier, wider run kept

    def save() -> None:
        write_json(path, record)

    save()

    windows = evaluation_tokens(loaded, corpus, EvalSettings(tokens=SETTINGS[model]["tokens"], true_sequential=False))
    kept = {k: Measured(**v) for k, v in record["kept"].items()}
    todo = {r["allocation"]: r["bitmap"].options() for r in rows if r["allocation"] not in kept}
    print(f"[{model}] {len(todo)} allocations to measure with kept weights", flush=True)
    weights = OptionWeights.beside(cached_table_path(table), table.labels)

    def on_chunk(measured: dict[str, Measured], reference: float) -> None:
        record["reference_perplexity"] = reference
        record["kept"].update({k: dataclasses.asdict(m) for k, m in measured.items()})
        save()

    measure_allocations(loaded.model, windows, weights, todo, kept, on_chunk, chunk=4, progress=False)
    for r in rows:
        if r["variant"] not in sequential or r["allocation"] in record["sequential"]:
            continue
        record["sequential"][r["allocation"]] = sequential_row(loaded, windows, corpus, r["bitmap"].assignment())
        save()
        print(f"[{model}] sequential {r['variant']} @{r['budget']:g}: {record['sequential'][r['allocation']]['perplexity']:.2f}", flush=True)
    return record


def report(records: list[dict[str, Any]]) -> str:
    lines = ["# bitalloc run's KL table, raw or smoothed", "", (__doc__ or "").split("\n\n", 1)[1].strip(), ""]
    for record in records:
        lines += [f"## {record['model']}", "", record["provenance"].rstrip(),
                  *resumed_lines(record),
                  f"- reference (fp32) perplexity {record.get('reference_perplexity', float('nan')):.3f}", "",
                  "| variant | budget | layers unlike raw | raw KL sum | ppl (kept) | vs raw | KL (kept) | ppl (sequential) | KL (sequential) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        rows = record["rows"]
        raw = {r["budget"]: record["kept"].get(r["allocation"]) for r in rows if r["variant"] == "raw"}
        for r in sorted(rows, key=lambda r: (r["budget"], r["variant"] != "raw")):
            kept, seq, base = record["kept"].get(r["allocation"]), record["sequential"].get(r["allocation"]), raw.get(r["budget"])
            versus = f"{kept['perplexity'] / base['perplexity'] - 1:+.1%}" if kept and base else "-"
            lines.append(f"| {r['variant']} | {r['budget']:g} | {r['differs']} | {r['raw_kl_sum']:.4f} | "
                         + (f"{kept['perplexity']:.2f} | {versus} | {kept['kl']:.4f}" if kept else "- | - | -") + " | "
                         + (f"{seq['perplexity']:.2f} | {seq['kl']:.4f}" if seq else "- | -") + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", default=",".join(SETTINGS))
    parser.add_argument("--sequential", default="raw", help="variants also measured as bitalloc run quantizes (comma-separated)")
    parser.add_argument("--variants", help="only these variants besides raw (comma-separated; default all)")
    parser.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS), help="bpw budgets (comma-separated)")
    parser.add_argument("--report", action="store_true", help="only rewrite the report from the saved records")
    args = parser.parse_args()
    models = chosen_models(args.models, SETTINGS)
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.report:
        for model in models:
            run_model(model, [float(b) for b in args.budgets.split(",")], [v.strip() for v in args.sequential.split(",") if v.strip()],
                      None if args.variants is None else [v.strip() for v in args.variants.split(",")])
    records = [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))]
    (RESULTS / "kl_smoothing.md").write_text(report(records))
    print(RESULTS / "kl_smoothing.md")


if __name__ == "__main__":
    main()
