"""The flows that both the CLI and the benchmarks call: the main job (run), side-by-side comparison, Pareto sweeps."""
