"""Uniform RTN and GPTQ at 2/3/4 bits against the float reference -> results/uniform.md.

Each model's rows are saved to results/uniform/<model>.json as soon as they are measured, so an
interrupted run resumes with the models not yet done (pass --fresh to measure again).
"""

from __future__ import annotations

import argparse
import json
import time

from _common import RESULTS, evaluation_protocol, model_section, provenance

from allocator.evaluate.report import markdown_table, rows_to_json
from allocator.evaluate.rows import VariantRow
from allocator.jobs.compare import EvalSettings, compare_variants
from allocator.model.corpus import load_corpus
from allocator.model.loading import load_model
from quantizers import build_quantizer

MODELS = ("smollm2-135m", "gemma3-270m")


def variants():
    configs = [("rtn", b, 128) for b in (2, 3, 4)] + [("rtn", 4, 32)]
    configs += [("gptq", b, 128) for b in (2, 3, 4)] + [("gptq", 4, 32)]
    quantizers = [build_quantizer(name, bits=bits, group_size=group) for name, bits, group in configs]
    return {q.label(): q for q in quantizers}


NOTES = """\
Notes
- bpw is the stored size of all decoder linear layers (packed codes + fp16 scales + packed zero points) per
  weight; model MB adds embeddings/LM head/norms at fp16 (tied tensors once).
- Asymmetric min-max grids, one scale and zero per group of 128 (or 32) input columns. SmolLM2's width 576
  is not a multiple of 128: each row has four groups of 128 and one of 64 (as in the GPTQ reference
  implementation), which the bpw counts.
- The SmolLM2 reference is itself dequantized from a Q4_1 GGUF (a 4-bit grid on blocks of 32), so 4-bit g32
  on SmolLM2 can look near-lossless: it nearly re-finds the grid the weights already lie on. Gemma3's
  reference comes from Q4_K_M (mixed 4/6-bit super-blocks of 256), so the same caveat applies more weakly.
- GPTQ: Hessian from calibration windows of the enwiki calibration split (never overlapping the evaluation
  split), 1% damping, block size 128, true-sequential within each decoder block, no act-order.
- KL is the mean per-token KL(reference || quantized) in nats over the same windows as the perplexity.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--fresh", action="store_true", help="ignore saved per-model results")
    args = parser.parse_args()
    settings = EvalSettings(tokens=args.tokens, samples=args.samples)
    corpus = load_corpus("enwiki")
    saved_dir = RESULTS / "uniform"
    sections = []
    for model_name in args.models.split(","):
        saved = saved_dir / f"{model_name}.json"
        data = json.loads(saved.read_text()) if saved.is_file() and not args.fresh else None
        if data is None or data["settings"] != vars(settings):
            start = time.perf_counter()
            loaded = load_model(model_name)
            rows = compare_variants(loaded, corpus, variants(), settings)
            rows_to_json(saved, rows, {"model": model_name, "settings": vars(settings), "wall_seconds": time.perf_counter() - start,
                                       "provenance": provenance()})
            data = json.loads(saved.read_text())
        rows = [VariantRow(**row) for row in data["rows"]]
        sections.append(model_section(model_name, data, markdown_table(rows)))
    header = "# Uniform quantization: RTN and GPTQ at 2/3/4 bits\n\n" + evaluation_protocol(settings)
    (RESULTS / "uniform.md").write_text(header + "\n".join(sections) + "\n" + NOTES)


if __name__ == "__main__":
    main()
