"""``bitalloc generate``: greedy text generation from a packed model (bitalloc quantize) or a float model."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from allocator.cli.parser import model_help, positive_int

NAME = "generate"
HELP = "greedy text generation from a packed model (bitalloc quantize) or a float model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--quantized", type=Path, help="packed model directory (from bitalloc quantize)")
    parser.add_argument("--model", help=model_help() + "; with --quantized, the model it was made for (default: the one its config names)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate at most (default 64; stops at EOS)")
    parser.add_argument("--engine", choices=["auto", "lean", "transformers"], default="auto",
                        help="lean: bitalloc's llama decoder (static KV cache, fused projections); transformers: HF generate; "
                        "auto (default): lean where the architecture allows")
    parser.add_argument("--float-activations", action="store_true",
                        help="decode packed layers with float activations (exact to the stored weights) instead of rounding them "
                        "to int8 per block of up to 128 columns, as llama.cpp does per 256 (faster)")


def run(args: argparse.Namespace) -> int:
    import torch

    from allocator.errors import BitallocError
    from allocator.model.loading import DEFAULT_MODEL, load_model
    from allocator.runtime.decoder import LlamaDecoder, supports
    from allocator.runtime.packed import load_quantized_model
    from quantizers.kernels import QuantLinear

    if not args.prompt.strip():
        raise BitallocError("--prompt is empty")
    if args.quantized is not None:
        loaded = load_quantized_model(args.quantized, load_model(args.model) if args.model else None).loaded
    else:
        loaded = load_model(args.model or DEFAULT_MODEL)
    model = loaded.model
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.int8_activations = not args.float_activations
    engine = args.engine if args.engine != "auto" else ("lean" if supports(model) else "transformers")
    if engine == "lean" and not supports(model):
        raise BitallocError(f"--engine lean runs llama-architecture models, not {model.config.model_type}; use --engine transformers")
    prompt = loaded.tokenizer(args.prompt).input_ids
    # the stop tokens transformers' generate uses: the generation config's EOS ids, else the tokenizer's
    configured = getattr(model.generation_config, "eos_token_id", None)
    stop = [configured] if isinstance(configured, int) else list(configured or [])
    if not stop and loaded.tokenizer.eos_token_id is not None:
        stop = [loaded.tokenizer.eos_token_id]
    if loaded.context_length is not None:
        room = loaded.context_length - len(prompt)
        if room <= 0:
            raise BitallocError(f"the prompt is {len(prompt)} tokens, more than {loaded.name}'s context of {loaded.context_length}")
        if args.max_new_tokens > room:
            raise BitallocError(f"--max-new-tokens {args.max_new_tokens} does not fit: {loaded.name}'s context of "
                                f"{loaded.context_length} tokens leaves {room} after the {len(prompt)}-token prompt")
    generated: list[int] = []
    shown = ""
    marks: list[float] = []

    def stream(token: int) -> None:
        nonlocal shown
        marks.append(time.perf_counter())
        generated.append(token)
        text = loaded.tokenizer.decode(generated, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        # wait for the rest of a multi-byte character, or for a decode that extends what is shown
        if not text.endswith("\ufffd") and text.startswith(shown):
            print(text[len(shown):], end="", flush=True)
            shown = text

    if engine == "lean":
        decoder = LlamaDecoder(model, len(prompt) + args.max_new_tokens)
        engine = "lean, C step" if decoder.native_step is not None else "lean, torch step"
        start = time.perf_counter()
        decoder.generate(prompt, args.max_new_tokens, stop=stop, on_token=stream)
    else:
        start = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(torch.tensor([prompt]), max_new_tokens=args.max_new_tokens, do_sample=False, use_cache=True,
                                    eos_token_id=stop or None, pad_token_id=stop[0] if stop else 0)
        for token in output[0, len(prompt):].tolist():
            stream(token)
            if token in stop:
                break  # the rest is padding
    final = loaded.tokenizer.decode(generated, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    print(final[len(shown):] if final.startswith(shown) else "", flush=True)  # what a trailing partial character held back
    if engine.startswith("lean") and len(marks) > 1:
        rate = f"prefill {len(prompt) / (marks[0] - start):.1f} tok/s, decode {(len(marks) - 1) / (marks[-1] - marks[0]):.1f} tok/s"
    else:
        rate = f"{len(generated) / (time.perf_counter() - start):.1f} tok/s overall"
    activations = "float" if args.float_activations else "int8"
    print(f"bitalloc: {len(prompt)} prompt tokens, {len(generated)} generated; {rate} ({engine} engine, {activations} decode "
          f"activations, {torch.get_num_threads()} threads)", file=sys.stderr)
    return 0
