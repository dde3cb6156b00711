"""Does today's code profile the real models as the cached tables say? -> results/same_results.md.

For each model, the table ``bitalloc run`` reads from the profile cache (its ``main`` options on 64 x 512
calibration tokens) is compared with a profile made now by the current code without the cache (the cached table's date is that of its
first kept option weight, written when its profile ran): every stored bit
count, every loss the profile itself computes and every feature, bit for bit (the cached table may also hold the
measured KL, which a bare profile does not compute: it is not compared). The cache file's date says which code
made it, so an identical result means nothing that changed since (device placement, storage dtypes, the packed
option cache, block-wise runs) moved the profile's numbers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time

from _common import RESULTS, chosen_models, provenance, table_differences

from allocator.jobs.run import RUN_OPTIONS
from allocator.measure.profile import cached_table_path, profile_model
from allocator.model.corpus import load_corpus
from allocator.model.loading import load_model
from allocator.storage import write_json
from allocator.table.options import parse_options

MODELS = {"smollm2-135m": {}, "gemma3-270m": {}}
SAMPLES, SEQLEN = 64, 512


def compare(model: str) -> dict:
    loaded = load_model(model)
    corpus = load_corpus("enwiki")
    options = parse_options(RUN_OPTIONS)
    before = time.time()
    cached = profile_model(loaded, corpus, options, samples=SAMPLES, seqlen=SEQLEN, progress=False)
    path = cached_table_path(cached)
    weights = path.with_suffix(".weights")
    files = list(weights.iterdir()) if weights.is_dir() else [path]
    made = min(f.stat().st_mtime for f in files)  # the first kept weight: when the profile ran (the .npz is rewritten as losses are added)
    if made >= before:
        raise SystemExit(f"{model}: no cached table to compare (the profile ran now)")
    tick = time.perf_counter()
    fresh = profile_model(loaded, corpus, options, samples=SAMPLES, seqlen=SEQLEN, cache=False, progress=False)
    return {"model": model, "cached_table": path.name,
            "cached_written": dt.datetime.fromtimestamp(made, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "layers": len(fresh.names), "options": fresh.labels,
            "compared_losses": [name for name in fresh.losses if name in cached.losses], "seconds": time.perf_counter() - tick,
            "differences": table_differences(cached, fresh)}


def report(records: list[dict]) -> str:
    lines = ["# The real models' profiles: cached tables against today's code", "", (__doc__ or "").split("\n\n", 1)[1].strip(), "",
             "| model | cached table (profiled) | layers x options | losses compared | result |", "|---|---|---|---|---|"]
    for r in records:
        result = "identical" if not r["differences"] else "differ: " + ", ".join(f"{k} (max rel. {v:.1e})" for k, v in r["differences"].items())
        lines.append(f"| {r['model']} | {r['cached_table']} ({r['cached_written']}) | {r['layers']} x {len(r['options'])} | "
                     f"{', '.join(r['compared_losses'])} | {result} |")
    for r in records:
        lines += ["", f"### {r['model']}", "", r["provenance"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--render", action="store_true", help="only rewrite same_results.md from the saved records")
    args = parser.parse_args()
    directory = RESULTS / "same_results"
    if not args.render:
        directory.mkdir(parents=True, exist_ok=True)
        for model in chosen_models(args.models, MODELS):
            record = {"provenance": provenance(), **compare(model)}
            write_json(directory / f"{model}.json", record)
            print(model, "identical" if not record["differences"] else record["differences"], flush=True)
    records = [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]
    (RESULTS / "same_results.md").write_text(report(records))
    print(RESULTS / "same_results.md")


if __name__ == "__main__":
    main()
