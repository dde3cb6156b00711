"""Wall time of the solvers on a synthetic sensitivity table (default 200 layers x 5 options).

Not a test: prints (and writes to results/solver_timing.md) the ILP time (target < 50 ms on 200 x 5)
and, for context, the other solvers' times and their loss relative to the ILP optimum. Times include building the reduced problem
(ties, limits, feasibility check), as recorded in each bit map.

    python benchmarks/solver_timing.py [--layers 200] [--budgets 1.5 2.5 3.5] [--seeds 3] [--repeats 3] [--profiles T.npz ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import provenance  # noqa: E402

from allocator.errors import BitallocError  # noqa: E402
from allocator.solvers import SOLVERS, Budget, solve  # noqa: E402
from allocator.table.sensitivity import SYNTHETIC_OPTIONS, SensitivityTable  # noqa: E402

TARGET_MS = 50.0


def time_solvers(tables: list[SensitivityTable], budgets: list[float], solvers: list[str], repeats: int) -> dict[str, tuple[list[float], list[float]]]:
    """Per solver: the fastest of ``repeats`` wall times (ms) and the loss above the ILP's (%) per (table, budget)."""
    out: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in solvers}
    for table in tables:
        for bpw in budgets:
            optimum = None
            for name in ["ilp"] + [s for s in solvers if s != "ilp"]:
                best = float("inf")
                for _ in range(repeats):
                    bitmap = solve(table, Budget.bpw(bpw), solver=name)
                    best = min(best, bitmap.solver.seconds)
                if name == "ilp":
                    optimum = bitmap.predicted_loss
                if name in out:
                    out[name][0].append(best * 1e3)
                    out[name][1].append(100 * (bitmap.predicted_loss / optimum - 1))
    return out


def markdown(results: dict[str, tuple[list[float], list[float]]]) -> list[str]:
    rows = ["| solver | median ms | max ms | loss vs ILP, mean % | loss vs ILP, max % |", "|---|---:|---:|---:|---:|"]
    for name, (t, e) in results.items():
        rows.append(f"| {name} | {statistics.median(t):.1f} | {max(t):.1f} | {statistics.mean(e):.3f} | {max(e):.3f} |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=200)
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.5, 2.5, 3.5], help="bpw budgets")
    parser.add_argument("--seeds", type=int, default=3, help="synthetic tables (seeds 0..N-1)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; the fastest counts")
    parser.add_argument("--noise", type=float, default=0.3, help="log-normal noise of the synthetic losses")
    parser.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=list(SOLVERS))
    parser.add_argument("--profiles", type=Path, nargs="*", default=[],
                        help="real sensitivity tables (.npz from bitalloc profile) timed the same way, each at the same budgets")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "solver_timing.md",
                        help="markdown results file (default benchmarks/results/solver_timing.md)")
    args = parser.parse_args()
    try:
        real = [SensitivityTable.load(path) for path in args.profiles]
    except (OSError, BitallocError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    solve(SensitivityTable.synthetic(14), Budget.bpw(3.0), solver="ilp")  # warm imports
    if "ilp-cvxpy" in args.solvers:
        solve(SensitivityTable.synthetic(14), Budget.bpw(3.0), solver="ilp-cvxpy")
    print(f"{args.layers} layers x {len(SYNTHETIC_OPTIONS)} options ({', '.join(o.label for o in SYNTHETIC_OPTIONS)}), "
          f"ties on, noise {args.noise}, seeds 0..{args.seeds - 1}, budgets {args.budgets} bpw, best of {args.repeats}")
    print(f"machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M')}")
    load = os.getloadavg()[0]  # other jobs on the machine slow every solver alike
    synthetic = [SensitivityTable.synthetic(args.layers, seed=seed, noise=args.noise) for seed in range(args.seeds)]
    results = time_solvers(synthetic, args.budgets, args.solvers, args.repeats)
    rows = markdown(results)
    ilp_times = results["ilp"][0] if "ilp" in results else []
    ilp_median = statistics.median(ilp_times) if ilp_times else float("nan")
    verdict = "meets" if ilp_median < TARGET_MS else "misses"
    summary = (f"ILP: median {ilp_median:.1f} ms per solve on {args.layers}x{len(SYNTHETIC_OPTIONS)} ({verdict} the {TARGET_MS:.0f} ms target; "
               f"slowest case {max(ilp_times, default=float('nan')):.1f} ms)")
    print("\n".join(rows))
    print(summary)
    real_sections: list[str] = []
    for path, table in zip(args.profiles, real):
        rows_real = markdown(time_solvers([table], args.budgets, args.solvers, args.repeats))
        title = (f"## {table.key.model}: {table.num_layers} layers x {table.num_options} options "
                 f"({', '.join(o.label for o in table.options)}), loss {table.default_loss}")
        print(title)
        print("\n".join(rows_real))
        real_sections += [title, "", f"table: `{path.name}`", "", *rows_real, ""]
    if args.out is not None:
        setup = (f"{args.layers} layers x {len(SYNTHETIC_OPTIONS)} options ({', '.join(o.label for o in SYNTHETIC_OPTIONS)}), ties on, "
                 f"log-normal loss noise {args.noise}, synthetic tables of seeds 0..{args.seeds - 1}, budgets {args.budgets} bpw, "
                 f"best of {args.repeats} runs per case; times include building the reduced problem (ties, limits, feasibility). "
                 f"1-minute load average when the timing started: {load:.2f} (on {os.cpu_count()} cores).")
        text = "\n".join(["# Solver wall time on a synthetic sensitivity table", "", provenance().rstrip(), "", setup, "", *rows, "",
                          f"**{summary}**", "", *real_sections])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
