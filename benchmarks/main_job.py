"""The README's main job, timed from an empty cache -> results/main_job.md.

Runs the README's ``bitalloc run --model M --bpw B`` (plus ``--out DIR`` to read its rows back, and
``--no-progress``) with ``$BITALLOC_CACHE`` pointed at a fresh directory (so the GGUF is dequantized, and the
profile, the single-layer KL, the quantization and the evaluation all run), and records the printed stage times, the rows and the wall time of the whole command
(process start included). Nothing else should share the CPU while it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, provenance

from allocator.storage import write_json

TARGETS = {"minutes": 10.0, "perplexity": 50.0}
"""Issue 22's targets for SmolLM2 at 2.5 bpw: from an empty cache in at most 10 min on 2 cores, ppl at most 50."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bpw", type=float, default=2.5)
    parser.add_argument("--loss-model", help="time `bitalloc run --loss-model NAME` instead (features pass + loss model, no profile, no KL)")
    parser.add_argument("--render", action="store_true", help="only rewrite main_job.md from the saved records")
    args = parser.parse_args()
    directory = RESULTS / "main_job"
    if args.render:
        (RESULTS / "main_job.md").write_text(report(sorted(directory.glob("*.json"))))
        return
    bitalloc = Path(sys.executable).with_name("bitalloc")
    with tempfile.TemporaryDirectory(prefix="bitalloc-main-job-") as scratch:
        out = Path(scratch) / "job"
        env = {**os.environ, "BITALLOC_CACHE": str(Path(scratch) / "cache")}
        extra = ["--loss-model", args.loss_model] if args.loss_model else []
        command = [str(bitalloc), "run", "--model", args.model, "--bpw", f"{args.bpw:g}", *extra, "--out", str(out), "--no-progress"]
        start = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"bitalloc run failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
        saved = json.loads((out / "rows.json").read_text())
    record = {"provenance": provenance(), "command": " ".join(["bitalloc run --model", args.model, "--bpw", f"{args.bpw:g}", *extra]),
              "loss_model": args.loss_model, "wall_seconds": wall,
              "stage_seconds": saved["stage_seconds"], "rows": saved["rows"], "settings": saved["settings"], "stdout": done.stdout}
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / f"{args.model}-{args.bpw:g}{'-' + args.loss_model if args.loss_model else ''}.json", record)
    (RESULTS / "main_job.md").write_text(report(sorted(directory.glob("*.json"))))
    print(RESULTS / "main_job.md")


def report(paths: list[Path]) -> str:
    """Every saved run, newest first (an earlier run is kept beside the newest under another file name)."""
    lines = ["# The main job from an empty cache", "", (__doc__ or "").split("\n\n", 1)[1].strip(), ""]
    records = [json.loads(path.read_text()) for path in paths]
    for record in sorted(records, key=lambda r: r["provenance"].split("- date: ")[-1][:16], reverse=True):
        quantized = record["rows"][-1]
        reference = record["rows"][0]
        minutes = record["wall_seconds"] / 60
        if record.get("loss_model"):  # not the main job: its targets do not apply
            time_target = ppl_target = ""
            lines += [f"## `{record['command']}`", "",
                      f"The main job with a loss model ({record['loss_model']}) pricing the features pass instead of the profile and the "
                      "single-layer KL. A shipped loss model was fitted on both real models, so its quality on either is in-sample; "
                      "its zero-shot quality (fitted on the other model) is in loss_model_transfer.md.", ""]
        else:
            time_target = f" (target <= {TARGETS['minutes']:g} min: {'met' if minutes <= TARGETS['minutes'] else 'missed'})"
            ppl_target = f"; target <= {TARGETS['perplexity']:g}: {'met' if quantized['perplexity'] <= TARGETS['perplexity'] else 'missed'}"
            lines += [f"## `{record['command']}`", ""]
        lines += [record["provenance"], f"- whole command: {minutes:.1f} min{time_target}",
                  f"- perplexity {quantized['perplexity']:.2f} at {quantized['bpw']:.4f} bpw (reference {reference['perplexity']:.2f}{ppl_target}), "
                  f"KL {quantized['kl']:.4f} on {quantized['eval_tokens']} evaluation tokens", "",
                  "| stage | seconds |", "|---|---|"]
        lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in record["stage_seconds"].items()]
        lines += [f"| whole command (process start, imports, writing --out) | {record['wall_seconds']:.1f} |", "",
                  "```", record["stdout"].strip(), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
