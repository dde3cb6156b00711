"""llama.cpp's own presets and bitalloc's bit maps as GGUF files, run in llama.cpp -> results/gguf.md.

Every file is made by llama.cpp's quantizer from the same F32 reference GGUF (the shipped GGUF
dequantized: the weights bitalloc's float reference holds) and evaluated by llama.cpp
(llama-cpp-python) on exactly the token ids of bitalloc's HF evaluation; the HF fp32 reference runs
on the same windows for the KL. bpw is measured from each file's tensor bytes.

    python benchmarks/gguf_presets.py                                   # presets + bit maps solved at --bpw from the default profile
    python benchmarks/gguf_presets.py --models smollm2-135m --bitmaps a.json b.json --bpw ""
    python benchmarks/gguf_presets.py --models smollm2-135m --tokens 1024 --presets Q4_K_M --bpw "" --out-md /tmp/smoke.md
    python benchmarks/gguf_presets.py --scale-fold search                # every file also made from the scale-folded model

With ``--scale-fold ALPHA|search`` every preset and bit map is made twice, from the reference and
from its scale fold (allocator/gguf/fold.py; the fold a profile or a mixed bit map gets: every site,
alpha scored with RTN 3-bit g128), and the folded F32 file itself is evaluated (it must match the
reference); results go to results/gguf_scalefold.md unless --out-md says otherwise.

Each model's rows are saved to results/gguf/<model>.json as soon as they are measured (pass --fresh
to measure again).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, provenance

from allocator.gguf.export import ExportResult, export_bitmap, export_float, export_preset, tensor_plan
from allocator.gguf.files import float_gguf, gguf_tensor_shapes, measure_gguf, source_gguf
from allocator.gguf.fold import write_folded_gguf
from allocator.gguf.imatrix import cached_imatrix, needs_imatrix
from allocator.gguf.llama_eval import REFERENCE, evaluate_ggufs
from allocator.jobs.compare import EvalSettings, calibration_tokens, evaluation_tokens
from allocator.model.corpus import load_corpus
from allocator.model.loading import load_model
from allocator.quantize.scalefold import ScaleFoldSettings, compute_scale_fold, parse_alpha
from allocator.solvers import Budget, Constraints, solve
from allocator.storage import cache_dir, write_json
from allocator.table.bitmap import BitMap
from allocator.table.sensitivity import SensitivityTable

MODELS = ("smollm2-135m", "gemma3-270m")
PRESETS = "Q2_K,Q3_K_S,Q3_K_M,Q4_K_M,IQ2_XXS,IQ3_XXS"
FLOAT_ROW = "F32 (llama.cpp)"


def _bitmaps_for(model: str, args: argparse.Namespace, loaded: Any) -> dict[str, BitMap]:
    """Bit maps of ``model``: the given JSON files made for it, plus one per --bpw solved from its profile."""
    maps = {}
    for path in args.bitmaps:
        bitmap = BitMap.load(path)
        if bitmap.model == model:
            maps[f"bitalloc {Path(path).stem} ({bitmap.solver.name} {bitmap.predicted_bpw:.2f})"] = bitmap
    budgets = [float(b) for b in args.bpw.split(",") if b.strip()]
    if budgets:
        from allocator.measure.profile import profile_model

        table = profile_model(loaded, load_corpus("enwiki"), samples=args.samples, progress=True)  # cached after the first run
        loss = args.loss if args.loss != "auto" else ("kl" if "kl" in table.loss_names else None)
        for bpw in budgets:
            bitmap = solve(table, Budget.bpw(bpw), Constraints(loss=loss), solver=args.solver)
            maps[f"bitalloc {args.solver}@{bpw:g} ({bitmap.loss_name})"] = bitmap
    return maps


def _saved_native_table(config: dict[str, Any], model: str) -> str | None:
    """The native table a saved run of ``model`` used (its --native entry), or None."""
    specs = [spec.split("=", 1) for spec in (config.get("native") or "").split(",") if "=" in spec]
    return dict(specs).get(model)


def _native_profile(table: SensitivityTable | None) -> dict[str, Any] | None:
    """How a GGUF-native table was measured (for the results header)."""
    if table is None:
        return None
    meta = table.metadata
    return {"types": meta.get("ggml_types"), "kl": meta.get("kl_measurement"), "imatrix": meta.get("imatrix"),
            "minutes": round(float(meta.get("layer_seconds", 0.0)) / 60, 1), "seed": table.key.seed}


def measure_model(model: str, args: argparse.Namespace, settings: EvalSettings) -> dict[str, Any]:
    start = time.perf_counter()
    work = Path(args.work) if args.work else cache_dir("gguf", "bench")
    work.mkdir(parents=True, exist_ok=True)
    loaded = load_model(model)
    windows = evaluation_tokens(loaded, load_corpus("enwiki"), settings)
    shapes = gguf_tensor_shapes(float_gguf(source_gguf(model)))
    presets = [p.strip().upper() for p in args.presets.split(",") if p.strip()]
    bitmaps = _bitmaps_for(model, args, loaded)
    needs = any(needs_imatrix(preset=p) for p in presets) or any(
        needs_imatrix(bitmap=b, plan=tensor_plan(b, shapes)) for b in bitmaps.values())
    imatrix = None
    native_table = SensitivityTable.load(args.native_tables[model]) if model in args.native_tables else None
    needs = needs or (native_table is not None and bool(native_table.metadata.get("imatrix")))
    if args.imatrix == "all" or (args.imatrix == "auto" and needs):
        imatrix = cached_imatrix(model, loaded, "enwiki", args.imatrix_samples, settings.seqlen)
    exports: dict[str, ExportResult] = {FLOAT_ROW: export_float(model)}
    requested: dict[str, float | None] = {FLOAT_ROW: None}
    make_seconds: dict[str, float] = {FLOAT_ROW: 0.0}
    folds: dict[str, Any] = {"": None}
    fold_seconds = None
    if args.scale_fold is not None:
        tick = time.perf_counter()
        settings_fold = ScaleFoldSettings(alpha=parse_alpha(args.scale_fold))
        samples = calibration_tokens(loaded, load_corpus("enwiki"), EvalSettings(seqlen=settings.seqlen, samples=args.samples))
        fold, _ = compute_scale_fold(loaded.model, samples, settings_fold, progress=True)
        fold_seconds = time.perf_counter() - tick
        suffix = f" +{settings_fold.label()}"
        folds[suffix] = fold
        name = FLOAT_ROW + suffix
        path = work / f"{model}-F32{suffix.strip()}.gguf"
        write_folded_gguf(float_gguf(source_gguf(model)), fold, path)
        exports[name], requested[name], make_seconds[name] = ExportResult(path, measure_gguf(path), {}, False, True), None, fold_seconds
    for suffix, fold in folds.items():
        for preset in presets:
            use = imatrix if (args.imatrix == "all" or needs_imatrix(preset=preset)) else None
            name = preset + (" +imatrix" if use is not None else "") + suffix
            tick = time.perf_counter()
            exports[name] = export_preset(preset, model, work / f"{model}-{preset}{suffix.strip()}.gguf", use, scale_fold=fold)
            make_seconds[name], requested[name] = time.perf_counter() - tick, None
        for i, (label, bitmap) in enumerate(bitmaps.items()):
            use = imatrix if (args.imatrix == "all" or needs_imatrix(bitmap=bitmap, plan=tensor_plan(bitmap, shapes))) else None
            tick = time.perf_counter()
            exports[label + suffix] = export_bitmap(bitmap, work / f"{model}-bitmap{i}{suffix.strip()}.gguf", model, use, scale_fold=fold)
            make_seconds[label + suffix], requested[label + suffix] = time.perf_counter() - tick, bitmap.predicted_bpw
    native = args.native_tables.get(model)
    if native is not None:
        # GGUF-native maps (llama.cpp's types as options, bitalloc profile --ggml-types) solved at each
        # preset's real bpw: the equal-size comparison
        table = native_table
        for preset in presets:
            target = next(e for n, e in exports.items() if n.split(" +")[0] == preset).stats.linear_bpw
            bitmap = solve(table, Budget.bpw(target), Constraints(loss="kl"), solver=args.solver)
            name = f"bitalloc native {args.solver} @ {preset} bpw"
            tick = time.perf_counter()
            exports[name] = export_bitmap(bitmap, work / f"{model}-native-{preset}.gguf", model, imatrix if table.metadata.get("imatrix") else None)
            make_seconds[name], requested[name] = time.perf_counter() - tick, bitmap.predicted_bpw
    names = list(exports)
    measured: dict[str, Any] = {}
    for first in range(0, len(names), args.chunk):  # the HF reference runs once per chunk of files
        chunk = {n: exports[n].path for n in names[first:first + args.chunk]}
        measured.update(evaluate_ggufs(chunk, windows, loaded.model, threads=args.threads, decode_tokens=args.decode_tokens))
    reference_ppl = measured[REFERENCE].perplexity
    rows = [{"variant": REFERENCE, "bpw": None, "requested_bpw": None, "linear_types": {}, "file_mb": None,
             "file_bpw": None, **measured[REFERENCE].as_dict(), "ppl_ratio": 1.0, "make_seconds": 0.0}]
    for name in names:
        stats = exports[name].stats
        rows.append({"variant": name, "bpw": stats.linear_bpw, "requested_bpw": requested[name],
                     "linear_types": stats.linear_type_counts(), "file_mb": stats.file_bytes / 1e6, "file_bpw": stats.file_bpw,
                     **measured[name].as_dict(), "ppl_ratio": measured[name].perplexity / reference_ppl,
                     "make_seconds": make_seconds[name]})
    return {"model": model, "settings": vars(settings), "rows": rows, "wall_seconds": time.perf_counter() - start,
            "provenance": provenance(), "config": {"presets": presets, "bitmaps": sorted(bitmaps), "imatrix": args.imatrix,
                                                   "imatrix_samples": args.imatrix_samples, "threads": args.threads,
                                                   "scale_fold": args.scale_fold, "fold_seconds": fold_seconds, "fold_samples": args.samples,
                                                   "native": args.native, "native_profile": _native_profile(native_table)}}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(data: dict[str, Any]) -> str:
    lines = ["| variant | linear bpw (real) | bit map bpw | linear types | file MB | ppl | ppl ratio | KL | prefill tok/s | decode tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        types = ", ".join(f"{k} x{n}" for k, n in r["linear_types"].items()) or "-"
        lines.append(f"| {r['variant']} | {_fmt(r['bpw'], '.3f')} | {_fmt(r['requested_bpw'], '.3f')} | {types} | "
                     f"{_fmt(r['file_mb'], '.1f')} | {r['perplexity']:.3f} | {r['ppl_ratio']:.3f} | {_fmt(r['kl'], '.4f')} | "
                     f"{r['prefill_tok_s']:.0f} | {_fmt(r['decode_tok_s'], '.1f')} |")
    return "\n".join(lines)


def _native_header(native: dict[str, Any]) -> str:
    kl = native.get("kl") or {}
    return (f"- native profile: `bitalloc profile --model MODEL --ggml-types --kl-samples {kl.get('windows')} --kl-seqlen {kl.get('seqlen')}` "
            f"(types {', '.join(native.get('types') or [])}; KL on {kl.get('windows')} x {kl.get('seqlen')} calibration tokens; "
            f"importance matrix {native.get('imatrix')}; the run that wrote the table took {native.get('minutes')} min, type columns "
            f"cached by an earlier run not counted)\n")


def fold_reading(data: dict[str, Any]) -> str:
    """Each file against its scale-folded twin (computed from the rows)."""
    suffix = next((" +" + r["variant"].split(" +")[-1] for r in data["rows"] if r["variant"].startswith(FLOAT_ROW + " +")), None)
    if suffix is None:
        return ""
    rows = {r["variant"]: r for r in data["rows"]}
    lines, better = [], 0
    pairs = [(n, n + suffix) for n in rows if n + suffix in rows]
    for plain, folded in pairs:
        a, b = rows[plain], rows[folded]
        change = b["perplexity"] / a["perplexity"] - 1
        better += change < 0 and plain != FLOAT_ROW
        lines.append(f"- {plain} ({a['bpw']:.3f} bpw): ppl {a['perplexity']:.4g} -> {b['perplexity']:.4g} ({change:+.1%}), "
                     f"KL {a['kl']:.4f} -> {b['kl']:.4f}")
    lines.append(f"\nThe fold lowers perplexity for {better} of {len(pairs) - 1} quantized files "
                 f"(the F32 pair checks the folded file computes the reference function).")
    return "Reading (computed from the table):\n\n" + "\n".join(lines) + "\n"


def native_reading(data: dict[str, Any]) -> str:
    """Each preset against the GGUF-native map solved at its real bpw (computed from the rows)."""
    rows = {r["variant"]: r for r in data["rows"]}
    lines, wins = [], 0
    natives = [n for n in rows if n.startswith("bitalloc native")]
    for name in natives:
        preset = name.split("@ ")[1].removesuffix(" bpw")
        base = next((r for n, r in rows.items() if n.split(" +")[0] == preset), None)
        if base is None:
            continue
        a, b = base, rows[name]
        wins += b["perplexity"] < a["perplexity"]
        lines.append(f"- {a['variant']} {a['bpw']:.3f} bpw: ppl {a['perplexity']:.4g}, KL {a['kl']:.4f}; native map {b['bpw']:.3f} bpw: "
                     f"ppl {b['perplexity']:.4g} ({b['perplexity'] / a['perplexity'] - 1:+.1%}), KL {b['kl']:.4f}")
    if not lines:
        return ""
    lines.append(f"\nThe native map (solved at the preset's bpw or below) has the lower perplexity in {wins} of {len(lines)} cases.")
    return "Reading (computed from the table):\n\n" + "\n".join(lines) + "\n"


FOLD_NOTE = """\
- Scale fold (+sf-...): the fold `bitalloc export --scale-fold` computes (allocator/quantize/scalefold.py; for a preset or a mixed
  map every site, alpha scored with RTN 3-bit g128) applied to the F32 GGUF (allocator/gguf/fold.py), then llama.cpp
  quantizes it with the folded importance matrix. Fold sites whose consumer tensors llama.cpp writes as a codebook type
  (iq1/iq2/iq3: IQ2_XXS's ffn_down, the 1-bit options of the bit maps) are left unfolded. With every site folded (commit
  ea39cfd, saved as gguf_scalefold/smollm2-135m.all-sites.json) SmolLM2's IQ2_XXS went from ppl 23.77 to 47.57 and the two
  ILP maps from 30.80 to 68.34 and 21.47 to 49.03, while the scalar-type presets gained as they do with the exception.
- Gemma3's Q4_K_M is the one file the fold hurts (14.30 -> 14.64): the Gemma3 reference is itself dequantized from a
  Q4_K_M GGUF, so the plain Q4_K_M file re-finds that grid (KL 0.0044, nearly lossless) and the fold moves the weights
  off it. SmolLM2's reference comes from a Q4_1 file, and there Q4_K_M gains (15.42 -> 14.96).
"""

NOTES = """\
Notes
- Every GGUF is made by llama.cpp's quantizer (llama-cpp-python 0.3.36, `llama_model_quantize`) from the same F32 GGUF:
  the shipped GGUF with every tensor dequantized, i.e. exactly the float reference bitalloc evaluates against.
- "linear bpw (real)" is measured from the tensor bytes of the decoder linears in the written file; "file MB" is the whole
  file (embeddings, norms and metadata included). A preset's name says little on these models: K/IQ types need rows that
  are a multiple of 256, and SmolLM2 (576) / Gemma3 (640) rows fall back to 32-block types (q4_0, q5_0, iq4_nl, ...), so
  "Q2_K" files are about 4.5 bpw per linear weight.
- bitalloc rows: the bit map fixes each linear's llama.cpp type (1-bit -> iq1_s, 2/3/4-bit -> q2_k/q3_k/q4_k, with the same
  row fallback); llama.cpp requantizes the float weights (bitalloc's GPTQ/BiLLM codes are not carried over); token
  embeddings at q8_0. "bit map bpw" is what bitalloc's own packed format would store for the same map.
- Perplexity and KL(reference || file) on the same token ids as bitalloc's HF evaluation (BOS first where the model wants
  it), one 512-token window per fresh context; KL is per predicted token, in nats, against the HF fp32 reference.
- "bitalloc native ... @ PRESET bpw" (with --native): a bit map whose options are llama.cpp's own tensor types
  (`bitalloc profile --ggml-types`: every type that fits a linear's rows, priced at the bytes llama.cpp writes, loss = the
  measured KL with only that linear at that type), solved by the ILP at the preset's measured linear bpw and exported with
  exactly those types (and the importance matrix the profile was measured with).
- Importance matrix (+imatrix): per input column mean of x^2 of each linear's inputs over calibration windows of the
  enwiki calibration split (never the evaluation split), passed as `llama_model_quantize_params.imatrix`; used where
  llama.cpp requires one (IQ1/IQ2/IQ3_XXS types) unless the run says otherwise.
- tok/s: llama.cpp on the CPU threads given; prefill = evaluation windows (logits of every position kept), decode = greedy
  single-token steps. Timings on a shared machine are indicative only.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--presets", default=PRESETS, help="comma-separated llama.cpp presets")
    parser.add_argument("--bitmaps", nargs="*", default=[], help="bit map JSON files (each used for the model it names)")
    parser.add_argument("--bpw", default="2.5,4.0", help="also solve bit maps at these budgets from the model's default profile ('' for none)")
    parser.add_argument("--solver", default="ilp")
    parser.add_argument("--loss", default="auto", help="table loss the bit maps minimize (auto: the measured kl if profiled, else the first)")
    parser.add_argument("--samples", type=int, default=64, help="calibration sequences of the profile")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--imatrix", choices=["auto", "all", "none"], default="auto")
    parser.add_argument("--imatrix-samples", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores)")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=4, help="GGUF files loaded at once (each holds 2 x seqlen x vocab logits)")
    parser.add_argument("--work", help="directory for the GGUF files (default $BITALLOC_CACHE/gguf/bench)")
    parser.add_argument("--out-md", help="default results/gguf.md (with --scale-fold: gguf_scalefold.md; with --native: gguf_native.md)")
    parser.add_argument("--native", default="", help="MODEL=TABLE.npz,...: GGUF-native profiles (bitalloc profile --ggml-types); "
                                                      "their maps solved at each preset's real bpw are measured too")
    parser.add_argument("--scale-fold", metavar="ALPHA", help="also make every file from the scale-folded model (a number in [0, 1] or 'search')")
    parser.add_argument("--fresh", action="store_true", help="ignore saved per-model results")
    args = parser.parse_args()
    if args.scale_fold is not None:
        parse_alpha(args.scale_fold)  # bad input fails before anything is measured
    specs = [spec.strip() for spec in args.native.split(",") if spec.strip()]
    if any("=" not in spec for spec in specs):
        parser.error("--native takes MODEL=TABLE.npz,...")
    args.native_tables = dict(spec.split("=", 1) for spec in specs)
    if args.out_md is None:
        args.out_md = str(RESULTS / ("gguf_scalefold.md" if args.scale_fold is not None else "gguf_native.md" if args.native else "gguf.md"))
    settings = EvalSettings(tokens=args.tokens)
    saved_dir = Path(args.out_md).with_suffix("")
    sections = []
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        saved = saved_dir / f"{model}.json"
        data = json.loads(saved.read_text()) if saved.is_file() and not args.fresh else None
        if data is None or data["settings"] != vars(settings) or data["config"].get("scale_fold") != args.scale_fold \
                or _saved_native_table(data["config"], model) != args.native_tables.get(model):
            data = measure_model(model, args, settings)
            write_json(saved, data)
        sections.append(f"## {model}\n\n{data['provenance']}- wall time: {data['wall_seconds'] / 60:.1f} min\n"
                        f"- imatrix: {data['config']['imatrix']} ({data['config']['imatrix_samples']} x {settings.seqlen} tokens)\n"
                        + (f"- scale fold: {data['config']['scale_fold']}, computed in {data['config']['fold_seconds'] / 60:.1f} min on "
                           f"{data['config'].get('fold_samples', args.samples)} x {settings.seqlen} calibration tokens\n"
                           if data["config"].get("scale_fold") else "")
                        + (_native_header(data["config"]["native_profile"]) if data["config"].get("native_profile") else "") + "\n"
                        f"{markdown(data)}\n\n{fold_reading(data)}{native_reading(data)}")
    header = ("# GGUF in llama.cpp: llama.cpp presets and bitalloc bit maps\n\n"
              f"Evaluation: enwiki evaluation split, {settings.tokens // settings.seqlen} non-overlapping windows of "
              f"{settings.seqlen} tokens, the same token ids for llama.cpp and the HF reference.\n\n")
    Path(args.out_md).write_text(header + "\n".join(sections) + "\n" + NOTES + (FOLD_NOTE if args.scale_fold is not None else ""))


if __name__ == "__main__":
    main()
