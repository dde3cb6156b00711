"""Learned allocation policies (SAC) vs the ILP and uniform GPTQ -> results/policy.md.

Inputs: one sensitivity table per model (``bitalloc profile``; its kept per-(layer, option) weights
in ``<table>.weights/`` beside it or beside its cache entry), e.g.::

    python benchmarks/policy.py --profiles smollm2-135m=A.npz,gemma3-270m=B.npz --ship

Stages, each saved as JSON under results/policy/ as soon as it is done, so a rerun skips what is
finished (and an interrupted training run continues from its last checkpoint):

1. ``train-<model>.json``: SAC (:func:`policies.sac.train`, default settings; ``--timesteps``
   60000 by default) on the first model's table only; the run directory is ``$BITALLOC_CACHE/policy-bench/<model>-<hash>/``; wall time of
   every session;
2. the same on every further model's table only (Gemma3);
3. ``table.json``: the table backend. Every policy on every table (its own and zero-shot on the
   others) at 2.0/2.5/3.0/3.5 bpw: predicted loss of :func:`policies.apply.apply_policy` against the
   ILP optimum (:func:`allocator.solvers.solve`), gap in %; the same for every checkpoint of each run
   (gap over training steps and training time: the time to get within 1% of the ILP);
4. ``measured-<model>.json``: at ``--budgets`` (2.5, 3.0) on every model: its own policy, the
   zero-shot policy of every other model, the ILP, and uniform GPTQ w2/w3/w4 g128, measured like
   ``bitalloc pareto`` does (the profile's kept weights swapped into the float model, the same
   evaluation windows; equal allocations measured once): perplexity, ppl ratio, KL.

Then ``training_curve.png`` (episode reward and ILP gap over training) and results/policy.md, whose
"Reading" section is computed from these numbers. ``--ship`` ships the first model's policy as
``policies/pretrained/<model>-sac.{zip,json}`` (:func:`policies.shipping.ship_policy`; ``bitalloc solve
--policy smollm2-135m-sac``).

``--dry-run`` runs stages 1-3 (and plans stage 4 without measuring) on synthetic tables shaped like
the two models, into ``$BITALLOC_CACHE/policy-bench/dry-run/`` unless ``--out`` says otherwise:
a check of the mechanics, not a result.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from _common import RESULTS, provenance

from allocator.errors import BitallocError
from allocator.jobs.pareto import Measured, allocation_hash, measure_allocations, plan_sweep
from allocator.solvers import UNIFORM, Budget, Constraints, solve
from allocator.solvers.repair import repair
from allocator.storage import cache_dir, write_json
from allocator.table.sensitivity import SensitivityTable
from envs.bitalloc_env import BitAllocEnv
from policies.apply import apply_policy, rollout
from policies.artifact import LoadedPolicy, file_sha256, load_policy
from policies.best_checkpoint import read_best
from policies.sac import CHECKPOINTS, LOGS, POLICY_FILE, TrainConfig, latest_checkpoint, train
from policies.selection import checkpoint_steps, checkpoint_zips, select_best
from policies.shipping import ship_policy

SCHEMA = 1
MODELS = ("smollm2-135m", "gemma3-270m")
TABLE_BUDGETS = (2.0, 2.5, 3.0, 3.5)
UNIFORM_LABELS = ("gptq-w2g128", "gptq-w3g128", "gptq-w4g128")
WITHIN = 1.0
"""Table-backend target: predicted loss within this many % of the ILP optimum ..."""
TRAIN_MINUTES = 15.0
"""... within this much training wall time."""
ZERO_SHOT_PPL = 2.0
"""Measured target: a zero-shot policy's perplexity within this many % of the target's own ILP."""
CURVE = "training_curve.png"
SYNTHETIC_SHAPES = {"smollm2-135m": (30 * 7, 576, 11), "gemma3-270m": (18 * 7, 640, 12)}
"""Dry run: (layers, hidden, seed) of the synthetic stand-in tables."""


@dataclass
class Source:
    """One model's sensitivity table."""

    name: str
    table: SensitivityTable
    path: Path | None
    """Where it was loaded from (None for a synthetic dry-run table)."""


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def gap_percent(loss: float, optimum: float) -> float:
    """How much ``loss`` exceeds ``optimum``, in % of it."""
    return (loss - optimum) / optimum * 100.0 if optimum > 0 else (0.0 if loss <= optimum else math.inf)


# -- inputs ---------------------------------------------------------------------------------------


def load_sources(args: argparse.Namespace) -> dict[str, Source]:
    if args.dry_run:
        sources = {}
        for name in args.models:
            layers, hidden, seed = SYNTHETIC_SHAPES.get(name, (14 * 7, 256, len(sources)))
            table = SensitivityTable.synthetic(num_layers=layers, hidden=hidden, seed=seed, missing=0.0)
            sources[name] = Source(name, table, None)
        return sources
    if not args.profiles:
        raise BitallocError("give --profiles smollm2-135m=TABLE.npz,gemma3-270m=TABLE.npz (tables from bitalloc profile), or --dry-run")
    sources = {}
    for item in args.profiles.split(","):
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise BitallocError(f"--profiles: expected NAME=PATH, got {item!r}")
        sources[name.strip()] = Source(name.strip(), SensitivityTable.load(Path(path.strip())), Path(path.strip()))
    return sources


def train_config(args: argparse.Namespace, loss: str) -> TrainConfig:
    return TrainConfig(timesteps=args.timesteps, seed=args.seed, bpw_range=tuple(args.bpw_range),
                       constraints=Constraints(loss=loss), checkpoint_every=args.checkpoint_every, action_mapping=args.action_mapping)


def run_directory(source: Source, config: TrainConfig) -> Path:
    """The run directory of ``source``'s training: same table and settings (all but the step count),
    same directory, so a rerun with more --timesteps continues it."""
    key = json.dumps({"table": source.table.key.digest(), "settings": config.run_settings()}, sort_keys=True)
    return cache_dir("policy-bench", f"{source.name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}")


# -- stage 1/2: training --------------------------------------------------------------------------


def _last_elapsed(csv_path: Path) -> float:
    rows = read_progress(csv_path)
    return rows[-1]["time"] if rows else 0.0


def stage_train(source: Source, args: argparse.Namespace, loss: str, results: Path) -> dict[str, Any]:
    """Train (or continue) SAC on ``source``'s table alone; returns the stage record."""
    import torch

    config = train_config(args, loss)
    run_dir = run_directory(source, config)
    path = results / f"train-{source.name}.json"
    key = {"model": source.name, "table_key": source.table.key.digest(), "loss": loss, "timesteps": config.timesteps,
           "seed": config.seed, "settings": config.run_settings(), "run_dir": str(run_dir)}
    previous = read_json(path) or {}
    policy = run_dir / POLICY_FILE
    if previous.get("key") == key and previous.get("status") == "done" and policy.is_file() \
            and previous.get("policy_sha256") == file_sha256(policy):
        print(f"[train {source.name}] done before ({previous['wall_seconds'] / 60:.1f} min); skipped")
        return previous
    same_run = {k: v for k, v in (previous.get("key") or {}).items() if k != "timesteps"} == {k: v for k, v in key.items() if k != "timesteps"}
    sessions = list(previous.get("sessions", [])) if same_run else []
    logs = run_dir / LOGS
    current = logs / "progress.csv"
    killed = bool(sessions) and sessions[-1].get("status") == "running"  # a session that never recorded its end
    elapsed = 0.0
    if current.is_file():  # sb3 rewrites progress.csv on every learn(): keep the earlier sessions' curves
        archive = logs / f"progress.session{len(list(logs.glob('progress.session*.csv'))) + 1:03d}.csv"
        current.rename(archive)
        elapsed = _last_elapsed(archive)
    if killed:  # its training time up to its last log line (a lower bound)
        sessions[-1].update(status="interrupted", wall_seconds=elapsed)
    found = latest_checkpoint(run_dir / CHECKPOINTS) if (run_dir / CHECKPOINTS).is_dir() else None
    start_steps = checkpoint_steps(found[0]) if found else 0
    sessions.append({"status": "running", "from_steps": start_steps, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
    record = {"schema": SCHEMA, "stage": "train", "key": key, "status": "training", "provenance": provenance(),
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "table": _table_summary(source.table), "sessions": sessions}
    write_json(path, record)
    print(f"[train {source.name}] SAC on its table alone, {config.timesteps} steps (from {start_steps}), run dir {run_dir}")
    begin = time.perf_counter()
    try:
        zip_path = train([source.table], run_dir, config, resume=True, progress=args.progress)
    except KeyboardInterrupt:
        sessions[-1].update(status="interrupted", wall_seconds=time.perf_counter() - begin)
        write_json(path, record)
        raise
    sessions[-1].update(status="done", wall_seconds=time.perf_counter() - begin, to_steps=config.timesteps)
    record.update(status="done", policy=str(zip_path), policy_sha256=file_sha256(zip_path),
                  wall_seconds=sum(s.get("wall_seconds", 0.0) for s in sessions))
    write_json(path, record)
    print(f"[train {source.name}] {record['wall_seconds'] / 60:.1f} min")
    return record


def _table_summary(table: SensitivityTable) -> dict[str, Any]:
    return {"model": table.key.model, "table_key": table.key.digest(), "layers": table.num_layers, "options": table.labels,
            "losses": table.loss_names, "feature_schema": table.feature_schema, "synthetic": bool(table.metadata.get("synthetic"))}


# -- the training curve ---------------------------------------------------------------------------


def read_progress(path: Path) -> list[dict[str, float]]:
    """(steps, seconds, episode reward mean) rows of one sb3 progress.csv (rows without them skipped)."""
    rows = []
    try:
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                try:
                    rows.append({"steps": float(row["time/total_timesteps"]), "time": float(row["time/time_elapsed"]),
                                 "reward": float(row.get("rollout/ep_rew_mean") or "nan")})
                except (KeyError, TypeError, ValueError):
                    continue
    except OSError:
        return []
    return rows


def training_curve(run_dir: Path, record: dict[str, Any] | None = None) -> list[dict[str, float]]:
    """The whole run's curve: the sessions' progress.csv files in order, each cut at the step the
    next one resumed from (its checkpoint: ``from_steps`` in the stage record when the sessions line up
    with the files, else the next file's first logged step), with the elapsed time made cumulative
    from the time interpolated at that step."""
    logs = run_dir / LOGS
    files = sorted(logs.glob("progress.session*.csv")) + ([logs / "progress.csv"] if (logs / "progress.csv").is_file() else [])
    sessions = [read_progress(f) for f in files]
    recorded = (record or {}).get("sessions", [])
    starts = [s.get("from_steps") for s in recorded] if len(recorded) == len(sessions) else [None] * len(sessions)
    curve: list[dict[str, float]] = []
    offset = 0.0
    for i, rows in enumerate(sessions):
        if not rows:
            continue
        end = None
        if i + 1 < len(sessions) and sessions[i + 1]:
            end = starts[i + 1] if starts[i + 1] is not None else sessions[i + 1][0]["steps"]
        kept = [r for r in rows if end is None or r["steps"] <= end]
        curve += [{**r, "time": r["time"] + offset} for r in kept]
        if end is not None:
            begin = starts[i] or 0  # the session's clock starts at 0 at the step it resumed from
            xs, ts = [begin] + [r["steps"] for r in rows], [0.0] + [r["time"] for r in rows]
            offset += float(np.interp(end, xs, ts))
    return curve


def seconds_at(curve: list[dict[str, float]], steps: float, record: dict[str, Any] | None = None) -> float | None:
    """Training seconds at ``steps`` (interpolated from the logged rows; extrapolated at the ends).
    Without logged rows (a run shorter than sb3's logging interval): the run's wall time pro rata."""
    if not curve:
        if record and record.get("wall_seconds") and record["key"]["timesteps"]:
            return float(record["wall_seconds"] * steps / record["key"]["timesteps"])
        return None
    xs = np.array([r["steps"] for r in curve])
    ts = np.array([r["time"] for r in curve])
    if len(xs) == 1 or steps <= xs[0]:
        return float(ts[0] * steps / xs[0]) if xs[0] > 0 else float(ts[0])
    if steps >= xs[-1]:
        rate = (ts[-1] - ts[0]) / (xs[-1] - xs[0]) if xs[-1] > xs[0] else 0.0
        return float(ts[-1] + (steps - xs[-1]) * rate)
    return float(np.interp(steps, xs, ts))


def plot_training(records: dict[str, dict], table: dict[str, Any], path: Path, title_note: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name, record in records.items():
        curve = training_curve(Path(record["key"]["run_dir"]), record)
        rows = [r for r in curve if not math.isnan(r["reward"])]
        left.plot([r["steps"] for r in rows], [r["reward"] for r in rows], marker="o" if len(rows) < 20 else None, markersize=3,
                  label=f"trained on {name}")
        checkpoints = table.get("checkpoints", {}).get(name, [])
        for target, style in ((name, "-"), *[(t, ":") for t in table.get("tables", {}) if t != name]):
            points = [(c["seconds"] / 60, c["tables"][target]["mean_gap"]) for c in checkpoints
                      if c.get("seconds") is not None and target in c["tables"]]
            if points:
                what = "own table" if target == name else f"zero-shot on {target}"
                right.plot([p[0] for p in points], [max(p[1], 1e-3) for p in points], style, marker="o", markersize=3,
                           label=f"{name} policy, {what}")
    left.set_xlabel("environment steps")
    left.set_ylabel("episode reward (mean of the last 100 episodes)")
    left.set_title(f"SAC training reward{title_note}")
    left.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    right.axhline(WITHIN, color="gray", linestyle="--", linewidth=1, label=f"{WITHIN:g}% of the ILP optimum")
    right.axvline(TRAIN_MINUTES, color="gray", linestyle=":", linewidth=1, label=f"{TRAIN_MINUTES:g} min")
    right.set_yscale("log")
    right.set_xlabel("training wall time (min)")
    right.set_ylabel(f"predicted-loss gap to the ILP, mean over {'/'.join(f'{b:g}' for b in TABLE_BUDGETS)} bpw (%)")
    right.set_title("checkpoints on the table backend")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


# -- stage 3: the table backend --------------------------------------------------------------------


def feature_shift(policy: LoadedPolicy, table: SensitivityTable) -> dict[str, float]:
    """How far ``table``'s layer features lie from the policy's training tables: mean |z| under the
    policy's normalization, and the share of values it clips."""
    norm = policy.card.normalization
    raw = np.nan_to_num(np.asarray(table.features, dtype=np.float64))
    z = (raw - np.asarray(norm.mean)) / np.asarray(norm.std)
    return {"mean_abs_z": float(np.abs(z).mean()), "clipped_share": float((np.abs(z) > norm.clip).mean())}


class Optima:
    """ILP bit maps per (model, budget), solved once."""

    def __init__(self, sources: dict[str, Source], loss: str) -> None:
        self.sources, self.constraints, self.cache = sources, Constraints(loss=loss), {}

    def get(self, name: str, bpw: float):  # -> BitMap | str (why infeasible)
        if (name, bpw) not in self.cache:
            try:
                self.cache[name, bpw] = solve(self.sources[name].table, Budget.bpw(bpw), self.constraints)
            except BitallocError as exc:
                self.cache[name, bpw] = str(exc)
        return self.cache[name, bpw]


def compare(policy: LoadedPolicy, source: Source, bpw: float, optima: Optima) -> dict[str, Any]:
    """The policy's allocation of ``source`` at ``bpw`` against the ILP's."""
    ilp = optima.get(source.name, bpw)
    if isinstance(ilp, str):
        return {"budget": bpw, "infeasible": ilp}
    bitmap = apply_policy(policy, source.table, Budget.bpw(bpw), optima.constraints)
    ours, best = bitmap.options(), ilp.options()
    info = bitmap.solver.info
    return {"budget": bpw, "policy_loss": bitmap.predicted_loss, "ilp_loss": ilp.predicted_loss,
            "gap": gap_percent(bitmap.predicted_loss, ilp.predicted_loss), "policy_bpw": bitmap.predicted_bpw,
            "ilp_bpw": ilp.predicted_bpw, "rollout_bpw": info["rollout_bpw"], "changed_by_repair": info["changed_by_repair"],
            "units": info["units"], "layers_unlike_ilp": sum(ours[m] != best[m] for m in ours), "layers": len(ours),
            "policy_seconds": bitmap.solver.seconds, "ilp_seconds": ilp.solver.seconds,
            "ilp_optimal": bool(ilp.solver.info.get("optimal", False))}


def paced_baseline(source: Source, bpw: float, optima: Optima) -> dict[str, Any]:
    """The price mapping with every action 0.5 (nothing learned: the LP relaxation of the units left
    sets each price), repaired as a policy's rollout is, against the ILP."""
    ilp = optima.get(source.name, bpw)
    if isinstance(ilp, str):
        return {"budget": bpw, "infeasible": ilp}
    env = BitAllocEnv([source.table], constraints=optima.constraints, action_mapping="price")
    info = rollout(env, lambda _: np.array([0.5], dtype=np.float32), {"bpw": bpw})
    problem = env.problem
    loss = problem.total_cost(repair(problem, info["raw_choice"]))
    return {"budget": bpw, "loss": loss, "ilp_loss": ilp.predicted_loss, "gap": gap_percent(loss, ilp.predicted_loss),
            "rollout_bpw": info["raw_bits"] / problem.total_numel}


def select_policy(source: Source, record: dict[str, Any]) -> Path:
    """The run's best checkpoint (:func:`policies.selection.select_best`: ``best_policy.zip``, chosen now
    for a run trained before training kept one)."""
    run_dir = Path(record["key"]["run_dir"])
    chosen_before = read_best(run_dir)
    best = select_best(run_dir, [source.table])
    if chosen_before is None:
        chosen = read_best(run_dir) or {}
        print(f"[select {source.name}] best checkpoint: {chosen.get('steps')} steps (score {chosen.get('score', math.nan):.4f})")
    return best


def stage_table(sources: dict[str, Source], trained: dict[str, dict], loss: str, results: Path, args: argparse.Namespace,
                selected: dict[str, Path]) -> dict[str, Any]:
    path = results / "table.json"
    runs = {name: Path(r["key"]["run_dir"]) for name, r in trained.items()}
    zips = {name: checkpoint_zips(run_dir) for name, run_dir in runs.items()}
    key = {"loss": loss, "budgets": list(TABLE_BUDGETS), "tables": {n: s.table.key.digest() for n, s in sources.items()},
           "policies": {n: file_sha256(selected[n]) for n in trained},
           "checkpoints": {n: [[steps, file_sha256(p)] for steps, p in z] for n, z in zips.items()}, "every_checkpoint": not args.final_only}
    previous = read_json(path)
    if previous and previous.get("key") == key:
        print("[table] done before; skipped")
        return previous
    optima = Optima(sources, loss)
    start = time.perf_counter()
    finals, shifts = [], {}
    for name in trained:
        policy = load_policy(selected[name])
        shifts[name] = {target: feature_shift(policy, s.table) for target, s in sources.items()}
        for target, source in sources.items():
            for bpw in TABLE_BUDGETS:
                finals.append({"policy": name, "table": target, "zero_shot": target != name, **compare(policy, source, bpw, optima)})
    paced = [{"table": target, **paced_baseline(source, bpw, optima)} for target, source in sources.items() for bpw in TABLE_BUDGETS]
    checkpoints: dict[str, list] = {}
    for name in trained:
        curve = training_curve(runs[name], trained[name])
        listed = zips[name] if not args.final_only else zips[name][-1:]
        checkpoints[name] = []
        for steps, zip_path in listed:
            policy = load_policy(zip_path)
            entry = {"steps": steps, "seconds": seconds_at(curve, steps, trained[name]), "file": zip_path.name, "tables": {}}
            for target, source in sources.items():
                rows = [compare(policy, source, bpw, optima) for bpw in TABLE_BUDGETS]
                gaps = [r["gap"] for r in rows if "gap" in r]
                entry["tables"][target] = {"gaps": {f"{r['budget']:g}": r.get("gap") for r in rows},
                                           "mean_gap": float(np.mean(gaps)) if gaps else None, "max_gap": max(gaps) if gaps else None}
            checkpoints[name].append(entry)
            print(f"[table] {name} policy at {steps} steps: own-table gap mean {_f(entry['tables'][name]['mean_gap'], '.2f')}%")
    record = {"schema": SCHEMA, "stage": "table", "key": key, "provenance": provenance(), "tables": {n: _table_summary(s.table) for n, s in sources.items()},
              "final": finals, "paced": paced, "feature_shift": shifts, "checkpoints": checkpoints, "wall_seconds": time.perf_counter() - start}
    write_json(path, record)
    return record


def time_to_within(entries: list[dict], name: str) -> dict[str, Any] | None:
    """The first checkpoint whose own-table gap is within WITHIN % at every table budget."""
    for entry in entries:
        worst = entry["tables"].get(name, {}).get("max_gap")
        if worst is not None and worst <= WITHIN:
            return entry
    return None


# -- stage 4: measured -----------------------------------------------------------------------------


def kept_weights(source: Source):  # -> OptionWeights
    """The profile's kept weights: beside the given table, else beside its cache entry (as pareto finds them)."""
    from allocator.measure.option_weights import OptionWeights
    from allocator.measure.profile import cached_table_path

    table = source.table
    candidates = [OptionWeights.beside(source.path, table.labels)] if source.path is not None else []
    try:
        candidates.append(OptionWeights.beside(cached_table_path(table), table.labels))
    except BitallocError:
        pass
    for weights in candidates:
        if not weights.missing(table.names):
            return weights
    where = ", ".join(str(w.directory) for w in candidates) or "(none)"
    raise BitallocError(f"{source.name}: the profile's kept weights are incomplete or missing ({where}); run bitalloc profile again")


def plan_measured(name: str, sources: dict[str, Source], policies: dict[str, LoadedPolicy], budgets: list[float],
                  optima: Optima) -> tuple[list[dict[str, Any]], dict[str, dict[str, str]]]:
    """The allocations of ``name`` to measure: own and zero-shot policies and the ILP at each budget,
    and the uniform GPTQ options; equal allocations share one hash."""
    source = sources[name]
    table = source.table
    points: list[dict[str, Any]] = []
    allocations: dict[str, dict[str, str]] = {}

    def add(kind: str, bitmap=None, bpw: float | None = None, policy_from: str | None = None, option: str | None = None,
            options: dict[str, str] | None = None, predicted: float | None = None, achieved: float | None = None) -> None:
        options = bitmap.options() if bitmap is not None else options
        key = allocation_hash(options)
        allocations[key] = options
        points.append({"kind": kind, "target_bpw": bpw, "policy_from": policy_from, "option": option, "allocation": key,
                       "bpw": bitmap.predicted_bpw if bitmap is not None else achieved,
                       "predicted_loss": bitmap.predicted_loss if bitmap is not None else predicted,
                       "rollout_bpw": bitmap.solver.info.get("rollout_bpw") if bitmap is not None else None})

    for bpw in budgets:
        ilp = optima.get(name, bpw)
        if isinstance(ilp, str):
            print(f"[measured {name}] {bpw:g} bpw skipped: {ilp}")
            continue
        add("ilp", ilp, bpw)
        for origin, policy in policies.items():
            kind = "own policy" if origin == name else "zero-shot"
            add(kind, apply_policy(policy, table, Budget.bpw(bpw), optima.constraints), bpw, policy_from=origin)
    uniform = {p.option: p for p in plan_sweep(table, [], [], optima.constraints)[0] if p.solver == UNIFORM}
    for label in UNIFORM_LABELS:
        if label in uniform:  # an option of this table, available for every layer
            point = uniform[label]
            add("uniform", option=label, options={n: label for n in table.names}, predicted=point.predicted_loss, achieved=point.bpw)
    return points, allocations


def eval_tokens(args: argparse.Namespace, model: str) -> int:
    """Evaluation tokens for ``model``: ``--tokens`` unless ``--model-tokens`` names it."""
    overrides = dict(item.split("=", 1) for item in args.model_tokens.split(",") if item.strip())
    return int(overrides.get(model, args.tokens))


def stage_measured(name: str, sources: dict[str, Source], policies: dict[str, LoadedPolicy], loss: str, results: Path,
                   args: argparse.Namespace, optima: Optima) -> dict[str, Any]:
    path = results / f"measured-{name}.json"
    table = sources[name].table
    evaluation = {"corpus": args.corpus, "seqlen": args.seqlen, "tokens": eval_tokens(args, name)}
    key = {"model": name, "table_key": table.key.digest(), "loss": loss, "eval": evaluation}
    points, allocations = plan_measured(name, sources, policies, args.budgets, optima)
    previous = read_json(path) or {}
    done: dict[str, Measured] = {}
    reference = None
    if previous.get("key") == key:
        reference = previous.get("reference_perplexity")
        for p in previous.get("points", []):
            if p.get("kl") is not None:
                done[p["allocation"]] = Measured(p["perplexity"], p["ppl_ratio"], p["kl"])
    record = {"schema": SCHEMA, "stage": "measured", "key": key, "provenance": previous.get("provenance") or provenance(),
              "reference_perplexity": reference, "points": points, "measured": False,
              "wall_seconds": previous.get("wall_seconds", 0.0) if previous.get("key") == key else 0.0}

    def fill() -> None:
        for p in points:
            m = done.get(p["allocation"])
            p.update(perplexity=m.perplexity if m else None, ppl_ratio=m.ppl_ratio if m else None, kl=m.kl if m else None)

    fill()
    todo = [k for k in allocations if k not in done]
    if not todo:
        print(f"[measured {name}] all {len(allocations)} distinct allocations measured before; skipped")
    if args.no_measure:
        print(f"[measured {name}] {len(allocations)} distinct allocations planned, {len(todo)} not measured (measuring off)")
        write_json(path, record)
        return record
    if todo:
        from allocator.jobs.compare import EvalSettings, evaluation_tokens
        from allocator.measure.profile import model_fingerprint
        from allocator.model.corpus import load_corpus
        from allocator.model.loading import load_model

        start = time.perf_counter()
        weights = kept_weights(sources[name])
        loaded = load_model(table.key.model)
        if table.metadata.get("model_fingerprint") not in (None, model_fingerprint(loaded.model)):
            raise BitallocError(f"{table.key.model} is not the model this profile was made from (weights differ)")
        windows = evaluation_tokens(loaded, load_corpus(args.corpus), EvalSettings(seqlen=args.seqlen, tokens=evaluation["tokens"]))
        print(f"[measured {name}] {len(allocations)} distinct allocations from {len(points)} points; {len(todo)} to measure")
        base = record["wall_seconds"]

        def on_chunk(measured: dict[str, Measured], reference_ppl: float) -> None:
            record["reference_perplexity"] = reference_ppl
            record["wall_seconds"] = base + time.perf_counter() - start
            fill()
            write_json(path, record)

        measure_allocations(loaded.model, windows, weights, allocations, done, on_chunk, args.chunk, args.progress)
        del loaded
    record["measured"] = all(k in done for k in allocations)
    fill()
    write_json(path, record)
    return record


# -- the report ------------------------------------------------------------------------------------


def _f(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _t(seconds: float | None) -> str:
    """A duration: seconds below a minute, minutes above."""
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def training_section(trained: dict[str, dict], table: dict[str, Any]) -> list[str]:
    lines = ["## Training (table backend, SAC defaults of `policies.sac.TrainConfig`)", "",
             f"![training curve](policy/{CURVE})", "",
             "| trained on | steps | wall time | steps/s | threads | sessions | own-table gap at the end (mean / max) | "
             f"first checkpoint within {WITHIN:g}% at every budget | selected checkpoint |", "|---|---|---|---|---|---|---|---|---|"]
    for name, record in trained.items():
        entries = table["checkpoints"].get(name, [])
        final = entries[-1]["tables"][name] if entries else {}
        hit = time_to_within(entries, name)
        reached = f"{hit['steps']} steps, {_t(hit['seconds'])}" if hit else "not reached"
        steps = record["key"]["timesteps"]
        best = read_best(Path(record["key"]["run_dir"])) or {}
        chosen = f"{best['steps']} steps (score {best['score']:.3f})" if best else "-"
        lines.append(f"| {name} | {steps} | {_t(record['wall_seconds'])} | {steps / record['wall_seconds']:.0f} | "
                     f"{record['threads']} of {record['cpus']} cores | {len(record['sessions'])} | "
                     f"{_f(final.get('mean_gap'), '.2f')}% / {_f(final.get('max_gap'), '.2f')}% | {reached} | {chosen} |")
    lines += ["", "Gap over training (predicted loss of each checkpoint over the ILP optimum, in %, at "
              + "/".join(f"{b:g}" for b in TABLE_BUDGETS) + " bpw; time: training wall time interpolated from the sb3 log):", ""]
    targets = list(table["tables"])
    lines += ["| policy | steps | min | " + " | ".join(f"on {t}: mean / max" for t in targets) + " |",
              "|---|---|---|" + "---|" * len(targets)]
    for name, entries in table["checkpoints"].items():
        for e in entries:
            cells = [f"{_f(e['tables'][t]['mean_gap'], '.2f')} / {_f(e['tables'][t]['max_gap'], '.2f')}" for t in targets]
            lines.append(f"| {name} | {e['steps']} | {_f(e['seconds'] and e['seconds'] / 60, '.2f')} | " + " | ".join(cells) + " |")
    return lines


def table_section(table: dict[str, Any]) -> list[str]:
    lines = ["## Table backend: predicted loss against the ILP optimum", "",
             "Each run's selected policy (its best checkpoint, as SB3's EvalCallback keeps a best model: the lowest mean "
             "ln(loss / LP bound) of its deterministic allocations of its own training table at 2/2.5/3/3.5 bpw; "
             "`policies.sac.policy_score`) applied (deterministically, then repaired to the budget) to its own table and, zero-shot, to the "
             "other model's. The ILP is solved by HiGHS to a 1e-9 relative gap (whether it proved optimality is counted under Reading), "
             "so a gap below 0 would mean the policy found a better allocation than the solver returned.", "",
             "| policy | applied to | budget | policy loss | ILP loss | gap | rollout bpw | bpw | units changed by repair | "
             "layers unlike the ILP | policy ms | ILP ms |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table["final"]:
        where = r["table"] + (" (zero-shot)" if r["zero_shot"] else "")
        if "infeasible" in r:
            lines.append(f"| {r['policy']} | {where} | {r['budget']:g} | infeasible: {r['infeasible']} |||||||||")
            continue
        lines.append(f"| {r['policy']} | {where} | {r['budget']:g} | {r['policy_loss']:.5g} | {r['ilp_loss']:.5g} | {r['gap']:.2f}% | "
                     f"{r['rollout_bpw']:.3f} | {r['policy_bpw']:.3f} | {r['changed_by_repair']}/{r['units']} | "
                     f"{r['layers_unlike_ilp']}/{r['layers']} | {r['policy_seconds'] * 1000:.0f} | {r['ilp_seconds'] * 1000:.0f} |")
    if table.get("paced"):
        lines += ["", "Nothing learned: the `price` action mapping with every action 0.5, so that each unit's price is the one at which "
                  "the LP relaxation of the units left spends the bits left (then repaired like a policy's rollout). What a trained "
                  "policy adds is its difference to this row:", "",
                  "| table | budget | loss | ILP loss | gap | rollout bpw |", "|---|---|---|---|---|---|"]
        for r in table["paced"]:
            if "infeasible" in r:
                lines.append(f"| {r['table']} | {r['budget']:g} | infeasible: {r['infeasible']} ||||")
                continue
            lines.append(f"| {r['table']} | {r['budget']:g} | {r['loss']:.5g} | {r['ilp_loss']:.5g} | {r['gap']:.2f}% | {r['rollout_bpw']:.3f} |")
    lines += ["", "Layer features of each table under each policy's normalization (fitted on its training table): mean |z| and "
              "share of values beyond the clip:", ""]
    for name, shifts in table["feature_shift"].items():
        lines.append(f"- {name} policy: " + "; ".join(f"{t}: {s['mean_abs_z']:.2f}, {s['clipped_share'] * 100:.1f}% clipped"
                                                       for t, s in shifts.items()))
    return lines


def measured_section(name: str, record: dict[str, Any]) -> list[str]:
    points = record["points"]
    ilp = {p["target_bpw"]: p for p in points if p["kind"] == "ilp"}
    ev = record["key"]["eval"]
    lines = [f"### {name}", "", f"- reference perplexity: {_f(record['reference_perplexity'], '.3f')}; "
             f"{ev['tokens'] // ev['seqlen']} windows of {ev['seqlen']} tokens ({ev['corpus']} evaluation split); "
             f"{_t(record['wall_seconds'])} of evaluation", "",
             "| budget | allocation | bpw | predicted loss | ppl | ppl ratio | KL | ppl vs ILP | KL vs ILP |",
             "|---|---|---|---|---|---|---|---|---|"]

    def label(p: dict) -> str:
        if p["kind"] == "uniform":
            return f"uniform {p['option']}"
        if p["kind"] == "ilp":
            return "ILP"
        return f"{p['kind']} (trained on {p['policy_from']})"

    for p in sorted((p for p in points if p["kind"] != "uniform"), key=lambda p: (p["target_bpw"], p["kind"] != "ilp", p["kind"])):
        base = ilp.get(p["target_bpw"])
        vs = kl_vs = "-"
        if p["kind"] != "ilp" and base and p["perplexity"] is not None and base["perplexity"] is not None:
            vs = f"{(p['perplexity'] / base['perplexity'] - 1) * 100:+.2f}%"
            kl_vs = f"{(p['kl'] / base['kl'] - 1) * 100:+.1f}%" if base["kl"] > 0 else "-"
        lines.append(f"| {p['target_bpw']:g} | {label(p)} | {p['bpw']:.3f} | {p['predicted_loss']:.5g} | {_f(p['perplexity'], '.2f')} | "
                     f"{_f(p['ppl_ratio'], '.3f')} | {_f(p['kl'], '.4f')} | {vs} | {kl_vs} |")
    for p in sorted((p for p in points if p["kind"] == "uniform"), key=lambda p: p["bpw"]):
        lines.append(f"| - | {label(p)} | {p['bpw']:.3f} | {p['predicted_loss']:.5g} | {_f(p['perplexity'], '.2f')} | "
                     f"{_f(p['ppl_ratio'], '.3f')} | {_f(p['kl'], '.4f')} | - | - |")
    sequential = RESULTS / "uniform" / f"{name}.json"
    if sequential.is_file():
        rows = [r for r in json.loads(sequential.read_text()).get("rows", []) if r.get("name") in UNIFORM_LABELS]
        if rows:
            lines += ["", "Sequential uniform GPTQ (results/uniform.md, each block on the quantized prefix, its own windows): "
                      + "; ".join(f"{r['name']} {r['bpw']:.3f} bpw ppl {r['perplexity']:.2f}" for r in rows) + "."]
    return lines


def reading(trained: dict[str, dict], table: dict[str, Any], measured: dict[str, dict]) -> list[str]:
    """Statements computed from the numbers above."""
    out = []
    for name, record in trained.items():
        entries = table["checkpoints"].get(name, [])
        hit = time_to_within(entries, name)
        final = entries[-1]["tables"][name] if entries else {}
        if hit:
            if hit["seconds"] is None:
                verdict = "the training time at that step is unknown"
            else:
                verdict = ("meets" if hit["seconds"] / 60 <= TRAIN_MINUTES else "misses") + f" the target ({WITHIN:g}% in under {TRAIN_MINUTES:g} min)"
            out.append(f"- Training on {name}: every table budget within {WITHIN:g}% of the ILP first at {hit['steps']} steps, "
                       f"{_t(hit['seconds'])} of training -> {verdict}. "
                       f"The whole run took {_t(record['wall_seconds'])} for {record['key']['timesteps']} steps.")
        else:
            out.append(f"- Training on {name}: no checkpoint of {record['key']['timesteps']} steps ({_t(record['wall_seconds'])}) "
                       f"got every table budget within {WITHIN:g}% of the ILP (at the end: mean {_f(final.get('mean_gap'), '.2f')}%, "
                       f"max {_f(final.get('max_gap'), '.2f')}%) -> misses the target.")
    finals = [r for r in table["final"] if "gap" in r]
    ties = [r for r in finals if abs(r["gap"]) < 0.01]
    lowest = min((r["gap"] for r in finals), default=None)
    text = (f"- Table backend: the policies match the ILP (|gap| < 0.01%) in {len(ties)} of {len(finals)} (policy, table, budget) cases; "
            f"the smallest gap is {_f(lowest, '.3f')}%")
    if finals and all("ilp_optimal" in r for r in finals):
        text += f"; HiGHS proved the ILP optimal in {sum(r['ilp_optimal'] for r in finals)} of these {len(finals)} solves"
    out.append(text + ".")
    for target in table["tables"]:
        rows = {origin: [r["gap"] for r in finals if r["table"] == target and r["policy"] == origin] for origin in table["checkpoints"]}
        parts = [f"{'own' if origin == target else 'zero-shot from ' + origin} policy mean {np.mean(g):.2f}% / max {max(g):.2f}%"
                 for origin, g in rows.items() if g]
        if parts:
            out.append(f"- Predicted-loss gap to the ILP on {target} over {'/'.join(f'{b:g}' for b in TABLE_BUDGETS)} bpw: " + "; ".join(parts) + ".")
    paced = {(r["table"], r["budget"]): r["gap"] for r in table.get("paced", []) if "gap" in r}
    if paced:
        compared = [(r, paced[r["table"], r["budget"]]) for r in finals if (r["table"], r["budget"]) in paced]
        better = [(r, g) for r, g in compared if r["gap"] < g - 0.01]
        worse = [(r, g) for r, g in compared if r["gap"] > g + 0.01]
        out.append(f"- Against the price mapping with nothing learned (every action 0.5): the policies are closer to the ILP in "
                   f"{len(better)} of {len(compared)} (policy, table, budget) cases, further in {len(worse)}, equal (within 0.01%) in the "
                   f"rest" + ("; largest gains: " + "; ".join(f"{r['policy']} policy on {r['table']} at {r['budget']:g} bpw {g:.2f}% -> "
                                                                f"{r['gap']:.2f}%" for r, g in sorted(better, key=lambda x: x[0]['gap'] - x[1])[:3])
                              if better else "") + ". With this mapping each unit's price comes from the table being allocated (its LP "
                   "relaxation), so a policy carries to another model the small corrections it learned, not the model's sensitivities.")
    losing = [r for r in finals if r["gap"] > WITHIN]
    for r in losing:
        where = f"{r['policy']} policy on {r['table']}{' (zero-shot)' if r['zero_shot'] else ''} at {r['budget']:g} bpw"
        off = (r["rollout_bpw"] - r["budget"]) / r["budget"] * 100
        seen = (f"its rollout spent {r['rollout_bpw']:.3f} bpw ({off:+.1f}% of the budget), the repair to the budget changed "
                f"{r['changed_by_repair']} of {r['units']} units, and {r['layers_unlike_ilp']} of {r['layers']} layers end up unlike the ILP's choice")
        out.append(f"- RL loses to the ILP by {r['gap']:.2f}% for the {where}: {seen}.")
    for name, shifts in table["feature_shift"].items():
        for target, s in shifts.items():
            if target != name:
                own = shifts[name]
                out.append(f"- {target}'s layer features seen by the {name} policy: mean |z| {s['mean_abs_z']:.2f} "
                           f"(its own table: {own['mean_abs_z']:.2f}), {s['clipped_share'] * 100:.1f}% clipped "
                           f"(own: {own['clipped_share'] * 100:.1f}%).")
    for name, record in measured.items():
        points = [p for p in record["points"] if p["perplexity"] is not None]
        ilp = {p["target_bpw"]: p for p in points if p["kind"] == "ilp"}
        for p in sorted(points, key=lambda p: (p["target_bpw"] or 0.0, p["kind"] != "own policy")):
            base = ilp.get(p["target_bpw"])
            if p["kind"] not in ("own policy", "zero-shot") or base is None:
                continue
            diff = (p["perplexity"] / base["perplexity"] - 1) * 100
            what = "own policy" if p["kind"] == "own policy" else "zero-shot policy"
            text = (f"- {name} at {p['target_bpw']:g} bpw, {what} (trained on {p['policy_from']}): ppl {p['perplexity']:.2f} "
                    f"vs ILP {base['perplexity']:.2f} ({diff:+.2f}%), KL {p['kl']:.4f} vs {base['kl']:.4f}")
            if p["kind"] == "zero-shot":
                text += f" -> {'meets' if diff <= ZERO_SHOT_PPL else 'misses'} the zero-shot target (within {ZERO_SHOT_PPL:g}% ppl)"
            better = [what for what, ours, theirs in (("ppl", p["perplexity"], base["perplexity"]), ("KL", p["kl"], base["kl"])) if ours < theirs]
            if p["predicted_loss"] > base["predicted_loss"] and better:
                text += (f"; measured {' and '.join(better)} below the ILP's despite a higher predicted loss "
                         "(the additive table loss is only a proxy for what is measured)")
            out.append(text + ".")
        uniform = sorted((p for p in points if p["kind"] == "uniform"), key=lambda p: p["bpw"])
        for bpw, base in sorted(ilp.items()):
            below = [u for u in uniform if u["bpw"] <= bpw + 1e-9]
            above = [u for u in uniform if u["bpw"] > bpw + 1e-9]
            parts = []
            if below:
                parts.append(f"uniform {below[-1]['option']} ({below[-1]['bpw']:.3f} bpw) ppl {below[-1]['perplexity']:.2f}")
            if above:
                parts.append(f"uniform {above[0]['option']} ({above[0]['bpw']:.3f} bpw) ppl {above[0]['perplexity']:.2f}")
            if parts:
                out.append(f"- {name} at {bpw:g} bpw: ILP ppl {base['perplexity']:.2f} against " + " and ".join(parts) + ".")
    return out


def write_report(path: Path, args: argparse.Namespace, loss: str, sources: dict[str, Source], trained: dict[str, dict],
                 table: dict[str, Any], measured: dict[str, dict]) -> None:
    dry = " (DRY RUN on synthetic stand-in tables: mechanics only, not a result)" if args.dry_run else ""
    first = next(iter(trained))
    head = [f"# Learned allocation policies (SAC) vs ILP vs uniform GPTQ{dry}", "", provenance().rstrip(), "",
            "Tables: " + "; ".join(f"{n}: {s.table.num_layers} linears x {s.table.num_options} options ({', '.join(s.table.labels)}), "
                                    f"key {s.table.key.digest()[:12]}" for n, s in sources.items())
            + f". Loss trained and solved on: `{loss}`. Each policy is trained on one model's table only "
            f"({args.timesteps} steps, seed {args.seed}, budgets drawn from {args.bpw_range[0]:g}-{args.bpw_range[1]:g} bpw) and applied "
            f"to every table; `{first}-sac` is shipped in policies/pretrained/ (`bitalloc solve --policy {first}-sac`) when run with --ship.",
            ""]
    body = training_section(trained, table) + [""] + table_section(table) + [""]
    body += ["## Measured: perplexity and KL", "",
             "Every allocation is measured as `bitalloc pareto` measures it: the profile's kept weights (each layer quantized alone "
             "on the reference inputs) swapped into the float model, on the same evaluation windows, so policy, ILP and uniform "
             "compare like with like; equal allocations are measured once.", ""]
    if measured and any(r.get("reference_perplexity") is not None for r in measured.values()):
        for name, record in measured.items():
            body += measured_section(name, record) + [""]
    else:
        body += ["Not measured in this run (" + ("dry run" if args.dry_run else "--no-measure") + "); planned allocations are in "
                 "policy/measured-*.json.", ""]
    body += ["## Reading", "", *reading(trained, table, {n: r for n, r in measured.items() if r.get("reference_perplexity") is not None}), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(head + body))
    tmp.replace(path)


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", help="NAME=TABLE.npz,... (the first one's policy is the one shipped); default order: SmolLM2, Gemma3")
    parser.add_argument("--loss", help="table loss to train and solve on (default: the first table's first loss)")
    parser.add_argument("--timesteps", type=int, default=60000,
                        help="SAC environment steps per run (default 60000)")
    parser.add_argument("--checkpoint-every", type=int, default=3000,
                        help="steps between checkpoints (default 3000; each one is scored in stage 3, and keeps a replay buffer)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--action-mapping", choices=("price", "index"), default="price", help="envs/FEATURES.md (default price)")
    parser.add_argument("--bpw-range", type=float, nargs=2, default=[1.5, 4.0], metavar=("LOW", "HIGH"))
    parser.add_argument("--budgets", default="2.5,3.0", help="measured budgets in bpw (default 2.5,3.0)")
    parser.add_argument("--tokens", type=int, default=16384, help="evaluation tokens (default 16384)")
    parser.add_argument("--model-tokens", default="", metavar="MODEL=N,...",
                        help="evaluation tokens per model where they differ from --tokens (Gemma3's 262k-entry head is slow on 2 cores)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--corpus", default="enwiki")
    parser.add_argument("--chunk", type=int, default=4, help="allocations evaluated per reference pass")
    parser.add_argument("--no-measure", action="store_true", help="skip the measurement (stage 4 only plans)")
    parser.add_argument("--final-only", action="store_true", help="stage 3: score the final policies only, not every checkpoint")
    parser.add_argument("--ship", action="store_true", help="copy the first model's policy to policies/pretrained/<model>-sac.{zip,json}")
    parser.add_argument("--out", type=Path, help="results directory (default benchmarks/results; dry run: $BITALLOC_CACHE/policy-bench/dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="stages 1-3 on synthetic tables shaped like the models (stage 4 planned only)")
    parser.add_argument("--progress", action="store_true", help="progress bars")
    args = parser.parse_args(argv)
    args.budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    args.models = [item.partition("=")[0].strip() for item in args.profiles.split(",")] if args.profiles else list(MODELS)
    if args.dry_run:
        args.no_measure = True
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sources = load_sources(args)
        loss = args.loss or next(iter(sources.values())).table.default_loss
        for source in sources.values():
            source.table.loss(loss)  # an unknown loss fails here, in one line
        out = args.out or (cache_dir("policy-bench", "dry-run") if args.dry_run else RESULTS)
        results = out / "policy"
        results.mkdir(parents=True, exist_ok=True)
        trained = {name: stage_train(source, args, loss, results) for name, source in sources.items()}
        selected = {name: select_policy(sources[name], record) for name, record in trained.items()}
        table = stage_table(sources, trained, loss, results, args, selected)
        policies = {name: load_policy(path) for name, path in selected.items()}
        optima = Optima(sources, loss)
        measured = {name: stage_measured(name, sources, policies, loss, results, args, optima) for name in sources}
        plot_training(trained, table, results / CURVE, " (dry run, synthetic tables)" if args.dry_run else "")
        if args.ship:
            first = next(iter(trained))
            target = ship_policy(selected[first], f"{first}-sac", (results / "pretrained") if args.dry_run else None)
            print(f"shipped {target} (+ {target.with_suffix('.json').name})")
        write_report(out / "policy.md", args, loss, sources, trained, table, measured)
        print(out / "policy.md")
        return 0
    except BitallocError as exc:
        print(f"policy benchmark: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("policy benchmark: interrupted; run the same command again to continue (finished stages are skipped, "
              "training resumes from its last checkpoint)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
