"""The profile serially and on a local Ray cluster, on a real model -> results/distributed.md.

Profiles the model with ``bitalloc run``'s option set (``main``) on 64 x 512 calibration tokens twice in one
process, without the cache: serially, then on a local Ray cluster of ``--cpus`` worker CPUs started for it (the
process runs the blocks, the workers every layer's quantizers: :mod:`allocator.measure.distributed`). Records
both wall times (Ray's start included) and whether the two tables are identical, bit for bit (every stored bit
count, loss and feature). Nothing else should share the CPU while it runs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from _common import RESULTS, provenance

from allocator.measure.distributed import RaySettings
from allocator.measure.profile import profile_model
from allocator.model.corpus import load_corpus
from allocator.model.loading import load_model
from allocator.storage import write_json
from allocator.table.options import parse_options
from allocator.table.sensitivity import SensitivityTable

OPTION_SPECS = ["main"]
SAMPLES, SEQLEN = 64, 512


def differences(a: SensitivityTable, b: SensitivityTable) -> list[str]:
    """What differs between two tables (empty: identical)."""
    found = [] if np.array_equal(a.bits, b.bits) else ["bits"]
    found += [f"loss {loss}" for loss in a.losses if not np.array_equal(a.losses[loss], b.losses.get(loss))]
    return found + ([] if np.array_equal(a.features, b.features) else ["features"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cpus", type=int, default=2, help="worker CPUs of the local Ray cluster")
    parser.add_argument("--render", action="store_true", help="only rewrite distributed.md from the saved records")
    args = parser.parse_args()
    directory = RESULTS / "distributed"
    if not args.render:
        loaded = load_model(args.model)
        corpus = load_corpus("enwiki")
        options = parse_options(OPTION_SPECS)
        tick = time.perf_counter()
        serial = profile_model(loaded, corpus, options, samples=SAMPLES, seqlen=SEQLEN, cache=False)
        serial_seconds = time.perf_counter() - tick
        tick = time.perf_counter()
        on_ray = profile_model(loaded, corpus, options, samples=SAMPLES, seqlen=SEQLEN, cache=False,
                               ray=RaySettings(address="local", num_cpus=args.cpus))
        ray_seconds = time.perf_counter() - tick
        record = {"provenance": provenance(), "model": args.model, "cpus": args.cpus, "layers": len(serial.names),
                  "options": serial.labels, "serial_seconds": serial_seconds, "ray_seconds": ray_seconds,
                  "differences": differences(serial, on_ray)}
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / f"{args.model}-{args.cpus}cpus.json", record)
    (RESULTS / "distributed.md").write_text(report(sorted(directory.glob("*.json"))))
    print(RESULTS / "distributed.md")


def report(paths: list[Path]) -> str:
    lines = ["# The profile on Ray against the serial profile", "", (__doc__ or "").split("\n\n", 1)[1].strip(), "",
             "| model | layers x options | Ray worker CPUs | serial s | Ray s | speed-up | tables |", "|---|---|---|---|---|---|---|"]
    provenances = []
    for path in paths:
        r = json.loads(path.read_text())
        same = "identical" if not r["differences"] else "differ in " + ", ".join(r["differences"])
        lines.append(f"| {r['model']} | {r['layers']} x {len(r['options'])} | {r['cpus']} | {r['serial_seconds']:.0f} | "
                     f"{r['ray_seconds']:.0f} | {r['serial_seconds'] / r['ray_seconds']:.2f}x | {same} |")
        provenances += [f"### {path.stem}", "", r["provenance"]]
    return "\n".join(lines + [""] + provenances)


if __name__ == "__main__":
    main()
