"""Wall time of the solvers on a synthetic sensitivity table (default 200 layers x 5 options).

Not a test: prints (and writes to results/solver_timing.md) the ILP time (target < 50 ms on 200 x 5)
and, for context, the other solvers' times and their loss relative to the ILP optimum. Times include building the reduced problem
(ties, limits, feasibility check), as recorded in each bit map.

    python benchmarks/solver_timing.py [--layers 200] [--budgets 1.5 2.5 3.5] [--seeds 3] [--repeats 3]
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

from allocator.sensitivity import SYNTHETIC_OPTIONS, SensitivityTable  # noqa: E402
from allocator.solvers import SOLVERS, Budget, solve  # noqa: E402

TARGET_MS = 50.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=200)
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.5, 2.5, 3.5], help="bpw budgets")
    parser.add_argument("--seeds", type=int, default=3, help="synthetic tables (seeds 0..N-1)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; the fastest counts")
    parser.add_argument("--noise", type=float, default=0.3, help="log-normal noise of the synthetic losses")
    parser.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=list(SOLVERS))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "solver_timing.md",
                        help="markdown results file (default benchmarks/results/solver_timing.md)")
    args = parser.parse_args()

    solve(SensitivityTable.synthetic(14), Budget.bpw(3.0), solver="ilp")  # warm imports
    if "ilp-cvxpy" in args.solvers:
        solve(SensitivityTable.synthetic(14), Budget.bpw(3.0), solver="ilp-cvxpy")
    print(f"{args.layers} layers x {len(SYNTHETIC_OPTIONS)} options ({', '.join(o.label for o in SYNTHETIC_OPTIONS)}), "
          f"ties on, noise {args.noise}, seeds 0..{args.seeds - 1}, budgets {args.budgets} bpw, best of {args.repeats}")
    print(f"machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M')}")
    load = os.getloadavg()[0]  # other jobs on the machine slow every solver alike
    times: dict[str, list[float]] = {name: [] for name in args.solvers}
    excess: dict[str, list[float]] = {name: [] for name in args.solvers}
    for seed in range(args.seeds):
        table = SensitivityTable.synthetic(args.layers, seed=seed, noise=args.noise)
        for bpw in args.budgets:
            optimum = None
            for name in ["ilp"] + [s for s in args.solvers if s != "ilp"]:
                best = float("inf")
                for _ in range(args.repeats):
                    bitmap = solve(table, Budget.bpw(bpw), solver=name)
                    best = min(best, bitmap.solver.seconds)
                if name == "ilp":
                    optimum = bitmap.predicted_loss
                if name in times:
                    times[name].append(best * 1e3)
                    excess[name].append(100 * (bitmap.predicted_loss / optimum - 1))
    rows = ["| solver | median ms | max ms | loss vs ILP, mean % | loss vs ILP, max % |", "|---|---:|---:|---:|---:|"]
    for name in args.solvers:
        t, e = times[name], excess[name]
        rows.append(f"| {name} | {statistics.median(t):.1f} | {max(t):.1f} | {statistics.mean(e):.3f} | {max(e):.3f} |")
    ilp_median = statistics.median(times["ilp"]) if "ilp" in times and times["ilp"] else float("nan")
    verdict = "meets" if ilp_median < TARGET_MS else "misses"
    summary = f"ILP: median {ilp_median:.1f} ms per solve on {args.layers}x{len(SYNTHETIC_OPTIONS)} ({verdict} the {TARGET_MS:.0f} ms target)"
    print("\n".join(rows))
    print(summary)
    if args.out is not None:
        setup = (f"{args.layers} layers x {len(SYNTHETIC_OPTIONS)} options ({', '.join(o.label for o in SYNTHETIC_OPTIONS)}), ties on, "
                 f"log-normal loss noise {args.noise}, synthetic tables of seeds 0..{args.seeds - 1}, budgets {args.budgets} bpw, "
                 f"best of {args.repeats} runs per case; times include building the reduced problem (ties, limits, feasibility). "
                 f"1-minute load average when the timing started: {load:.2f} (on {os.cpu_count()} cores).")
        text = "\n".join(["# Solver wall time on a synthetic sensitivity table", "", provenance().rstrip(), "", setup, "", *rows, "",
                          f"**{summary}**", ""])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
