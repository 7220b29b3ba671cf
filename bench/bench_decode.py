"""The decode step alone, no server: milliseconds per step at batch 1 and 16, per forward pass and weight format.

    python bench/bench_decode.py            # default model; writes its section of docs/benchmarks.md

Compares transformers' forward in float32 (what the engine used before) with the lean Llama forward in float32,
float16 weights, int8 and int4 (each as TorchScript, float16 and int8 also eager; the quantized ones, as the server
runs them, with our attention kernel over a float16 KV cache, int4's layers each in one C++ call; int4 also with
torch's attention, and with each layer's torch ops as before the one-call layer), in rounds of a few steps of each
(so a noisy neighbour slows all alike), medians. Batches of 16 rows run twice: every prompt of one length (no
padding), and ragged (16 lengths, as a server's rows are, each row attending over its own keys).
Also measures this machine's memory bandwidth and, from the bytes each format reads per step, the weight-read bound:
batch-1 decoding cannot be faster than reading every weight once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_description, memory_bandwidth_gb_s  # noqa: E402
from bench.report import replace_section  # noqa: E402
from inference import batch as batching  # noqa: E402
from inference import integer_kernels  # noqa: E402
from inference.decoders import Decoder, TransformersDecoder, _factory  # noqa: E402
from inference.fast_llama import LlamaDecoder  # noqa: E402
from inference.quantization import QuantizedFormat, input_absmax  # noqa: E402

PROMPT_TOKENS = 64
# Steps each decoder runs back to back in a round, as a server runs one decoder (after one untimed step); rounds
# rotate over the decoders, so a noisy neighbour slows all alike.
BLOCK = 4


def weight_bytes(decoder: Decoder) -> int:
    """Bytes one decode step reads: every projection and the LM head (the embedding reads one row per token)."""
    if isinstance(decoder, TransformersDecoder):
        embedding = decoder.model.get_input_embeddings().weight
        tied = decoder.model.get_output_embeddings().weight.data_ptr() == embedding.data_ptr()
        total = sum(p.numel() * p.element_size() for p in decoder.model.parameters())
        return total if tied else total - embedding.numel() * embedding.element_size()
    assert isinstance(decoder, LlamaDecoder)
    modules = [module for layer in decoder.layers for module in (layer.qkv, layer.out, layer.gate_up, layer.down)]
    return sum(_module_bytes(module) for module in [*modules, decoder.lm_head])


def _module_bytes(module: torch.nn.Module) -> int:
    if hasattr(module, "weight"):
        weight: torch.Tensor = module.weight
        return weight.numel() * weight.element_size()
    size = module.in_features * module.out_features
    kind = getattr(module, "original_name", type(module).__name__)  # a scripted module keeps its class's name there
    if kind in ("Int4Linear", "Q4Linear"):  # half a byte a weight, and a 16-bit scale and zero per group of 32
        return size // 2 + size // 32 * 4
    if kind == "Q8Linear":  # a byte a weight and a float16 scale per group of 32
        return size + size // 32 * 2
    return size * (1 if kind == "Int8Linear" else 2)


def start_batch(decoder: Decoder, rows: int, ragged: bool = False) -> batching.RunningBatch:
    """`rows` prompts of PROMPT_TOKENS tokens prefilled together; `ragged`: of PROMPT_TOKENS + 4 * row tokens instead,
    each prefilled alone and joining in turn (a padded batch)."""
    batch = batching.RunningBatch(max_rows=rows)
    prompts = [[1 + (row * 7 + i) % 1000 for i in range(PROMPT_TOKENS + 4 * row * ragged)] for row in range(rows)]
    for group in [[prompt] for prompt in prompts] if ragged else [prompts]:
        prefilled, logits = batching.prefill(decoder, group)
        batch.add(prefilled, logits.argmax(-1, keepdim=True))
    return batch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core)")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inference.loader import resolve_location
    from inference.settings import Settings

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    _, location = resolve_location(Settings())
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(location)
    calibration = (ROOT / "inference" / "data" / "calibration.txt").read_text()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    absmax = input_absmax(model, torch.tensor([tokenizer(calibration)["input_ids"][:512]]), names)
    kernel = integer_kernels.load() is None  # the server's choice: our attention kernel where it builds

    def lean(
        fmt: QuantizedFormat, compiled: bool = True, attention_kernel: bool = kernel, one_call: bool = True
    ) -> LlamaDecoder:
        make = _factory(fmt, absmax)
        return LlamaDecoder(
            model, make, torch.float16, compiled=compiled, attention_kernel=attention_kernel, one_call_layers=one_call
        )

    decoders: dict[str, Decoder] = {
        "transformers float32": TransformersDecoder(model),
        "lean float32": LlamaDecoder(model),
        "lean float16 eager": lean("float16", compiled=False),
        "lean float16": lean("float16"),
        "lean int8 eager": lean("int8", compiled=False),
        "lean int8": lean("int8"),
        "lean int4, torch's attention": lean("int4", attention_kernel=False),
        "lean int4, layers of torch ops": lean("int4", one_call=False),
        "lean int4": lean("int4"),
    }
    results: dict[str, Any] = {"cpu": cpu_description(), "threads": threads, "rows": {}}
    bandwidths: list[float] = []
    for rows, ragged in ((1, False), (16, False), (16, True)):
        label = f"{rows} ragged" if ragged else str(rows)
        batches = {name: start_batch(decoder, rows, ragged) for name, decoder in decoders.items()}
        times: dict[str, list[float]] = {name: [] for name in decoders}
        for _ in range(args.steps // BLOCK):
            if rows == 1:  # the bandwidth of the same moments as the batch-1 steps it bounds (the host's varies)
                bandwidths.append(memory_bandwidth_gb_s(repeats=1))
            for name, decoder in decoders.items():
                batch = batches[name]
                for step in range(BLOCK + 1):
                    started = time.perf_counter()
                    logits = batch.step(decoder)
                    batch.next_tokens = logits.argmax(-1, keepdim=True)
                    if step:  # the first of a block follows another decoder's steps: untimed
                        times[name].append(time.perf_counter() - started)
        results["rows"][label] = {name: round(statistics.median(t) * 1000, 2) for name, t in times.items()}
        print(json.dumps({"rows": label, "ms_per_step": results["rows"][label]}), flush=True)
    bandwidth = results["bandwidth_gb_s"] = statistics.median(bandwidths)
    lines = [
        "## The decode step alone (`bench/bench_decode.py`)",
        "",
        f"On {results['cpu']}, torch threads {threads}, memory read bandwidth {bandwidth:.1f} GB/s (median of its",
        "measurements between the batch-1 rounds): milliseconds per decode step (medians of "
        f"{args.steps // BLOCK * BLOCK}: rounds of {BLOCK} steps of each decoder back to back after an untimed one),",
        f"default model, {PROMPT_TOKENS}-token prompts (ragged:",
        f"{PROMPT_TOKENS} + 4 x row tokens, a padded batch). The bound is the time to read every weight once at that",
        "bandwidth: batch-1 decoding can't be faster. The quantized formats decode with our attention kernel over a",
        "float16 KV cache where it builds (as the server does); float32 with torch's.",
        "",
        "| forward, weights | MB read per step | bound at batch 1 (ms) | batch 1 (ms) | % of bound | batch 16 (ms) "
        "| batch 16 ragged (ms) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, decoder in decoders.items():
        megabytes = weight_bytes(decoder) / 1e6
        bound = megabytes / bandwidth  # MB / (GB/s) = ms
        one, sixteen, ragged = (results["rows"][label][name] for label in ("1", "16", "16 ragged"))
        lines.append(
            f"| {name} | {megabytes:.0f} | {bound:.1f} | {one:.1f} | {bound / one:.0%} | {sixteen:.1f} | {ragged:.1f} |"
        )
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    replace_section(args.report, "decode", markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
