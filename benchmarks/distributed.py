"""The profile, the single-layer KL and the Fisher pass serially and on a local Ray cluster, on a real model -> results/distributed.md.

``--stage profile``: profiles the model with ``bitalloc run``'s option set (``main``) on 64 x 512 calibration tokens
twice in one process, without the cache: serially, then on a local Ray cluster of ``--cpus`` worker CPUs started for
it (the process runs the blocks, the workers every layer's quantizers: :mod:`allocator.measure.distributed`).
``--stage kl``: profiles once (kept weights, in a scratch cache), then measures every (layer, option)'s single-layer
KL as ``bitalloc run`` does (1 x 128 tokens) serially and on the local Ray cluster (each worker a copy of the model:
:mod:`allocator.measure.distributed_kl`).
``--stage fisher``: the Fisher pass of ``bitalloc profile --fisher`` (both variants, its default 16 x 512 calibration
tokens) serially and on the local Ray cluster (each worker a copy of the model, chunks of windows returned in order:
:mod:`allocator.measure.distributed_fisher`), nothing cached. Records both wall times (Ray's start included) and whether the results are
identical, bit for bit (every stored bit count, loss and feature; every KL; every Fisher diagonal entry), and where
not, the largest relative difference. Nothing else should share the CPU while
it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import RESULTS, provenance, table_differences

from allocator.measure.distributed import RaySettings
from allocator.measure.fisher import fisher_diagonals
from allocator.measure.fisher_losses import DEFAULT_FISHER_SEQLEN, DEFAULT_FISHER_WINDOWS
from allocator.measure.layer_kl import add_kl_losses
from allocator.measure.profile import cached_table_path, profile_model
from allocator.model.corpus import load_corpus
from allocator.model.loading import load_model
from allocator.model.tokens import calibration_samples
from allocator.storage import write_json
from allocator.table.losses import KL_MEASURED
from allocator.table.options import parse_options

OPTION_SPECS = ["main"]
SAMPLES, SEQLEN = 64, 512
KL_WINDOWS, KL_SEQLEN = 1, 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cpus", type=int, default=2, help="worker CPUs of the local Ray cluster")
    parser.add_argument("--stage", choices=list(STAGES), default="profile")
    parser.add_argument("--render", action="store_true", help="only rewrite distributed.md from the saved records")
    args = parser.parse_args()
    directory = RESULTS / "distributed"
    if not args.render:
        record = STAGES[args.stage](args.model, args.cpus)
        directory.mkdir(parents=True, exist_ok=True)
        suffix = "" if args.stage == "profile" else f"-{args.stage}"
        write_json(directory / f"{args.model}-{args.cpus}cpus{suffix}.json", {"provenance": provenance(), **record})
    (RESULTS / "distributed.md").write_text(report(sorted(directory.glob("*.json"))))
    print(RESULTS / "distributed.md")


def compare_profiles(model: str, cpus: int) -> dict:
    loaded = load_model(model)
    corpus = load_corpus("enwiki")
    options = parse_options(OPTION_SPECS)
    tick = time.perf_counter()
    serial = profile_model(loaded, corpus, options, samples=SAMPLES, seqlen=SEQLEN, cache=False)
    serial_seconds = time.perf_counter() - tick
    tick = time.perf_counter()
    on_ray = profile_model(loaded, corpus, options, samples=SAMPLES, seqlen=SEQLEN, cache=False, ray=RaySettings(address="local", num_cpus=cpus))
    ray_seconds = time.perf_counter() - tick
    return {"stage": "profile", "model": model, "cpus": cpus, "layers": len(serial.names), "options": serial.labels,
            "serial_seconds": serial_seconds, "ray_seconds": ray_seconds, "differences": sorted(table_differences(serial, on_ray))}


def compare_kl(model: str, cpus: int) -> dict:
    loaded = load_model(model)
    corpus = load_corpus("enwiki")
    previous = os.environ.get("BITALLOC_CACHE")
    with tempfile.TemporaryDirectory(prefix="bitalloc-distributed-") as scratch:
        os.environ["BITALLOC_CACHE"] = scratch  # the kept weights the KL reads, made here and dropped after
        table = profile_model(loaded, corpus, parse_options(OPTION_SPECS), samples=SAMPLES, seqlen=SEQLEN)
        path = cached_table_path(table)
        tick = time.perf_counter()
        serial = add_kl_losses(loaded, table, path, corpus.calibration, windows=KL_WINDOWS, seqlen=KL_SEQLEN)
        serial_seconds = time.perf_counter() - tick
        tick = time.perf_counter()
        on_ray = add_kl_losses(loaded, table, path, corpus.calibration, windows=KL_WINDOWS, seqlen=KL_SEQLEN,
                               ray=RaySettings(address="local", num_cpus=cpus))
        ray_seconds = time.perf_counter() - tick
    if previous is None:
        os.environ.pop("BITALLOC_CACHE")
    else:
        os.environ["BITALLOC_CACHE"] = previous
    a, b = serial.loss(KL_MEASURED), on_ray.loss(KL_MEASURED)
    same = np.array_equal(a, b, equal_nan=True)
    relative = float(np.nanmax(np.abs(a - b) / np.maximum(np.abs(a), 1e-30)))
    return {"stage": "kl", "model": model, "cpus": cpus, "layers": len(table.names), "options": table.labels,
            "serial_seconds": serial_seconds, "ray_seconds": ray_seconds,
            "differences": [] if same else [f"kl (max relative difference {relative:.1e})"]}


def compare_fisher(model: str, cpus: int) -> dict:
    loaded = load_model(model)
    corpus = load_corpus("enwiki")
    windows = calibration_samples(loaded.tokenizer, corpus.calibration, DEFAULT_FISHER_WINDOWS, DEFAULT_FISHER_SEQLEN, loaded.add_bos, seed=0)
    tick = time.perf_counter()
    serial = fisher_diagonals(loaded.model, windows, seed=0)
    serial_seconds = time.perf_counter() - tick
    tick = time.perf_counter()
    on_ray = fisher_diagonals(loaded.model, windows, seed=0, ray=RaySettings(address="local", num_cpus=cpus))
    ray_seconds = time.perf_counter() - tick
    found = []
    for variant, fisher in serial.items():
        pairs = [(fisher.diagonal[name].double(), on_ray[variant].diagonal[name].double()) for name in fisher.diagonal]
        if all(a.equal(b) for a, b in pairs):
            continue
        entry = max(float(((a - b).abs() / a.abs().clamp_min(1e-30)).max()) for a, b in pairs)
        layer = max(float(abs(a.sum() - b.sum()) / a.sum()) for a, b in pairs)
        found.append(f"{variant} Fisher (max relative difference: entry {entry:.1e}, layer sum {layer:.1e})")
    return {"stage": "fisher", "model": model, "cpus": cpus, "layers": len(serial[next(iter(serial))].diagonal),
            "options": [f"{windows.shape[0]} x {windows.shape[1]} tokens, variants {', '.join(serial)}"],
            "serial_seconds": serial_seconds, "ray_seconds": ray_seconds, "differences": found}


STAGES = {"profile": compare_profiles, "kl": compare_kl, "fisher": compare_fisher}


def report(paths: list[Path]) -> str:
    lines = ["# The profile, the single-layer KL and the Fisher pass on Ray against the serial run", "", (__doc__ or "").split("\n\n", 1)[1].strip(), "",
             "| stage | model | work (layers x options) | Ray worker CPUs | serial s | Ray s | speed-up | results |", "|---|---|---|---|---|---|---|---|"]
    provenances = []
    for path in paths:
        r = json.loads(path.read_text())
        same = "identical" if not r["differences"] else "differ in " + ", ".join(r["differences"])
        work = f"{r['layers']} x {len(r['options'])}" if r.get("stage") != "fisher" else f"{r['layers']} layers, {r['options'][0]}"
        lines.append(f"| {r.get('stage', 'profile')} | {r['model']} | {work} | {r['cpus']} | "
                     f"{r['serial_seconds']:.0f} | {r['ray_seconds']:.0f} | {r['serial_seconds'] / r['ray_seconds']:.2f}x | {same} |")
        provenances += [f"### {path.stem}", "", r["provenance"]]
    return "\n".join(lines + [""] + provenances)


if __name__ == "__main__":
    main()
