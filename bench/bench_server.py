"""Benchmark the live server over HTTP: one-at-a-time baseline versus the continuous-batching engine.

    python bench/bench_server.py            # default model, writes docs/benchmarks.md and bench/results/*.json
    python bench/bench_server.py --quick    # fewer requests, for a smoke run

In one run, side by side on the same machine:
1. the baseline most Gradio apps have, one request at a time: this server with MAX_BATCH_SIZE=1;
2. the engine (MAX_BATCH_SIZE=32) with 1, 4, 16 and 32 concurrent clients.
Every level sends the same seeded, ragged workload (prompts of 8-300 tokens, max_new_tokens 16-256). It also measures
a bare `model.generate` for one request, a 16-token request arriving while a 512-token one runs, the memory
bandwidth bound for batch-1 decoding, and how often a greedy request gives the same text alone and batched. On a CPU
with bfloat16 matrix units (AMX) it also runs the engine with DTYPE=bfloat16 (an opt-in). The machine is shared and
noisy: compare ratios and medians.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import marked_sections  # noqa: E402

WORDS = [
    "the",
    "city",
    "river",
    "market",
    "morning",
    "bread",
    "story",
    "light",
    "garden",
    "winter",
    "summer",
    "engine",
    "model",
    "token",
    "window",
    "bridge",
    "music",
    "teacher",
    "student",
    "letter",
    "mountain",
    "forest",
    "ocean",
    "station",
    "train",
    "evening",
    "coffee",
    "paper",
    "history",
    "science",
    "friend",
    "language",
    "picture",
    "kitchen",
    "village",
    "harbor",
    "signal",
    "planet",
    "machine",
]


@dataclass
class Job:
    prompt: str
    max_new_tokens: int
    seed: int


@dataclass
class Outcome:
    ok: bool
    status: int
    latency_s: float
    ttft_s: float
    prompt_tokens: int
    completion_tokens: int


@dataclass
class LevelResult:
    label: str
    server: str
    clients: int
    requests: int
    failed: int
    wall_s: float
    generated_tokens: int
    tokens_per_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    latency_p50_s: float
    latency_p95_s: float
    peak_rss_mb: float


def make_jobs(count: int, seed: int) -> list[Job]:
    """Ragged prompts (about 8-300 tokens: words of this list are one or two tokens) and ragged output lengths."""
    rng = random.Random(seed)
    jobs = []
    for index in range(count):
        words = rng.randint(6, 220)
        prompt = "Continue this text. " + " ".join(rng.choice(WORDS) for _ in range(words))
        jobs.append(Job(prompt, rng.randint(16, 256), seed * 1000 + index))
    return jobs


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """`python app.py` in a subprocess with the given settings; samples its resident memory while running."""

    def __init__(self, name: str, env: dict[str, str], root: Path = ROOT) -> None:
        """`root`: the checkout whose app.py runs (bench_revisions.py starts an older one beside this one)."""
        self.name = name
        self.port = free_port()
        environment = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(self.port)}
        # a generous timeout: the one-at-a-time baseline keeps requests waiting for minutes, and a 504 would drop them
        environment.update(
            {"LOG_LEVEL": "WARNING", "GRADIO_ANALYTICS_ENABLED": "False", "REQUEST_TIMEOUT_S": "1800", **env}
        )
        self.process = subprocess.Popen(
            [sys.executable, str(root / "app.py")], env=environment, cwd=root, stdout=subprocess.DEVNULL
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.peak_rss_mb = 0.0
        self._sampling = False
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} server exited with {self.process.returncode}")
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} server did not become ready")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def start_sampling(self) -> None:
        self.peak_rss_mb = self.rss_mb()
        self._sampling = True

        def sample() -> None:
            while self._sampling:
                self.peak_rss_mb = max(self.peak_rss_mb, self.rss_mb())
                time.sleep(0.05)

        threading.Thread(target=sample, daemon=True).start()

    def stop_sampling(self) -> float:
        self._sampling = False
        return self.peak_rss_mb

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def send(client: httpx.AsyncClient, job: Job, temperature: float = 0.7) -> Outcome:
    started = time.perf_counter()
    body = {"prompt": job.prompt, "max_new_tokens": job.max_new_tokens, "temperature": temperature, "seed": job.seed}
    response = await client.post("/generate", json=body)
    latency = time.perf_counter() - started
    if response.status_code != 200:
        return Outcome(False, response.status_code, latency, float("nan"), 0, 0)
    data = response.json()
    return Outcome(
        True,
        200,
        latency,
        data["timings"]["time_to_first_token_s"],
        data["usage"]["prompt_tokens"],
        data["usage"]["completion_tokens"],
    )


async def run_level(server: Server, label: str, clients: int, jobs: list[Job]) -> LevelResult:
    queue: asyncio.Queue[Job] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    outcomes: list[Outcome] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            outcomes.append(await send(client, queue.get_nowait()))

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=server.url, timeout=900, limits=limits) as client:
        server.start_sampling()
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - started
        peak = server.stop_sampling()
    good = [outcome for outcome in outcomes if outcome.ok]
    generated = sum(outcome.completion_tokens for outcome in good)
    result = LevelResult(
        label=label,
        server=server.name,
        clients=clients,
        requests=len(outcomes),
        failed=len(outcomes) - len(good),
        wall_s=round(wall, 2),
        generated_tokens=generated,
        tokens_per_s=round(generated / wall, 2),
        ttft_p50_s=round(percentile([o.ttft_s for o in good], 0.5), 3),
        ttft_p95_s=round(percentile([o.ttft_s for o in good], 0.95), 3),
        latency_p50_s=round(percentile([o.latency_s for o in good], 0.5), 3),
        latency_p95_s=round(percentile([o.latency_s for o in good], 0.95), 3),
        peak_rss_mb=round(peak, 1),
    )
    print(json.dumps(asdict(result)), flush=True)
    return result


async def single_client_greedy(server: Server, jobs: list[Job]) -> dict[str, float]:
    """The bare-generate requests through the server, one at a time, greedy (so the very same tokens)."""
    async with httpx.AsyncClient(base_url=server.url, timeout=900) as client:
        outcomes = [await send(client, job, temperature=0.0) for job in jobs]
    return {
        "tokens": sum(outcome.completion_tokens for outcome in outcomes),
        "latency_total_s": round(sum(outcome.latency_s for outcome in outcomes), 2),
    }


async def short_behind_long(server: Server) -> dict[str, float]:
    """Latency of a 16-token request alone, and while a 512-token request is running."""
    short = Job("Write one sentence about the sea.", 16, 5)
    # counting keeps even a small model going for all 512 tokens (a story would end early at its EOS)
    long = Job("Count from 1 to 1000, separated by commas: 1, 2, 3, 4,", 512, 6)
    async with httpx.AsyncClient(base_url=server.url, timeout=900) as client:
        alone = (await send(client, short, temperature=0.0)).latency_s
        long_task = asyncio.create_task(send(client, long, temperature=0.0))
        await asyncio.sleep(1.0)
        behind = (await send(client, short, temperature=0.0)).latency_s
        long_outcome = await long_task
    return {
        "short_alone_s": round(alone, 3),
        "short_while_long_runs_s": round(behind, 3),
        "ratio": round(behind / alone, 2),
        "long_completion_tokens": long_outcome.completion_tokens,
    }


def bare_generate(jobs: list[Job], threads: int) -> dict[str, float]:
    """The same requests, greedy, through a bare `model.generate` one at a time in this process (the floor)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inference.loader import resolve_location
    from inference.settings import Settings

    torch.set_num_threads(threads)
    _, location = resolve_location(Settings())
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(location)
    latencies, tokens = [], 0
    for job in jobs:
        ids = tokenizer(job.prompt, return_tensors="pt")
        started = time.perf_counter()
        output = model.generate(
            **ids, max_new_tokens=job.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        latencies.append(time.perf_counter() - started)
        tokens += output.shape[1] - ids["input_ids"].shape[1]
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    return {
        "tokens": tokens,
        "latency_total_s": round(sum(latencies), 2),
        "tokens_per_s": round(tokens / sum(latencies), 2),
        "weights_mb": round(weights_bytes / 2**20, 1),
    }


def memory_bandwidth_gb_s() -> float:
    """Copy bandwidth of this machine (read + write), median of a few 256 MiB copies."""
    import torch

    source = torch.ones(64 * 2**20, dtype=torch.float32)
    target = torch.empty_like(source)
    timings = []
    for _ in range(7):
        started = time.perf_counter()
        target.copy_(source)
        timings.append(time.perf_counter() - started)
    return round(2 * source.numel() * 4 / statistics.median(timings) / 1e9, 2)


AGREEMENT_PROMPTS = [
    "The capital of Italy is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "A haiku about autumn leaves:\n",
    "Once upon a time",
    "The best way to learn Python is",
    "Photosynthesis is",
    "In 1969, humans",
    "My favourite recipe for pancakes:",
    "The three laws of motion are",
    "SELECT name FROM",
    "Dear hiring manager,",
    "The mitochondria",
    "Ten tips for better sleep:\n1.",
    "import numpy as np\n",
    "The weather today",
]


def alone_versus_batched(dtype: str, threads: int) -> dict[str, Any]:
    """Greedy, 64 new tokens: each prompt alone, then all 16 in one batch; how many texts come out identical."""
    from inference.engine import Engine
    from inference.params import SamplingParams
    from inference.settings import Settings

    settings = Settings(dtype=dtype, quantization="none", torch_threads=threads, max_batch_size=len(AGREEMENT_PROMPTS))  # type: ignore[arg-type]
    engine = Engine(settings)
    engine.start()
    prompts = [engine.prepare_completion(text) for text in AGREEMENT_PROMPTS]
    params = SamplingParams(max_new_tokens=64, temperature=0.0)
    alone = [asyncio.run(engine.generate(prompt, params)).text for prompt in prompts]

    async def together() -> list[str]:
        return [result.text for result in await asyncio.gather(*(engine.generate(p, params) for p in prompts))]

    batched = asyncio.run(together())
    engine.shutdown()
    return {"dtype": dtype, "identical": sum(a == b for a, b in zip(alone, batched, strict=True)), "of": len(prompts)}


def alone_versus_batched_in_subprocess(dtype: str, threads: int) -> dict[str, Any]:
    output = subprocess.run(
        [sys.executable, __file__, "--agreement", dtype],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TORCH_THREADS": str(threads)},
    )
    return dict(json.loads(output.stdout.strip().splitlines()[-1]))


def write_report(results: dict[str, Any], path: Path) -> None:
    levels: list[dict[str, Any]] = results["levels"]
    baseline = next(level for level in levels if level["server"] == "baseline" and level["clients"] == 16)
    lines = [
        "# Benchmarks",
        "",
        f"Latest run: {results['date']} on {results['machine']}. Default model "
        f"({results['model']}), float32 on the CPU, TORCH_THREADS={results['threads']}.",
        "Command: `python bench/bench_server.py` (a live server over HTTP, each configuration started in turn). The",
        "machine is shared and noisy: read ratios and medians, not single numbers.",
        "",
        "## Throughput and latency",
        "",
        "Same seeded ragged workload for every row: prompts of 8-300 tokens, max_new_tokens 16-256, temperature 0.7;",
        "each client sends its next request when its last one is answered (two requests per client, six for one).",
        "`baseline` is this server with MAX_BATCH_SIZE=1 (one request at a time, like a plain Gradio app);",
        "`engine` is the continuous-batching engine (MAX_BATCH_SIZE=32).",
        "",
        "| server | clients | requests | generated tokens | tokens/s | vs baseline (16 clients) | TTFT p50 / p95 (s) "
        "| latency p50 / p95 (s) | peak RSS (MB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for level in levels:
        ratio = level["tokens_per_s"] / baseline["tokens_per_s"] if baseline["tokens_per_s"] else float("nan")
        lines.append(
            f"| {level['server']} | {level['clients']} | {level['requests']} ({level['failed']} failed) "
            f"| {level['generated_tokens']} | {level['tokens_per_s']:.1f} | {ratio:.2f}x "
            f"| {level['ttft_p50_s']:.2f} / {level['ttft_p95_s']:.2f} "
            f"| {level['latency_p50_s']:.2f} / {level['latency_p95_s']:.2f} | {level['peak_rss_mb']:.0f} |"
        )
    bare, single = results["bare_generate"], results["single_client_greedy"]
    short = results["short_behind_long"]
    bound = results["bandwidth_gb_s"] * 1e3 / bare["weights_mb"] / 1.048576
    lines += [
        "",
        "## One client versus a bare `model.generate`",
        "",
        f"The 1-client workload, greedy, through a bare `model.generate` in one process: "
        f"{bare['latency_total_s']:.1f} s for {bare['tokens']} tokens ({bare['tokens_per_s']:.1f} tokens/s). "
        f"The same requests through the engine server over HTTP, one at a time: {single['latency_total_s']:.1f} s "
        f"for {single['tokens']} tokens: **{single['latency_total_s'] / bare['latency_total_s']:.2f}x** the bare "
        "time (target: within 1.15x; token counts differ only if float rounding flips a greedy choice).",
        "",
        "## A short request while a long one runs",
        "",
        f"A 16-token request alone: {short['engine']['short_alone_s']:.2f} s; submitted while a 512-token request "
        f"runs: {short['engine']['short_while_long_runs_s']:.2f} s (**{short['engine']['ratio']:.2f}x**, target "
        f"within 3x). One at a time (baseline): {short['baseline']['short_while_long_runs_s']:.2f} s "
        f"({short['baseline']['ratio']:.1f}x).",
        "",
        "## The bound at batch 1",
        "",
        f"Decoding one token reads every weight once: {bare['weights_mb']:.0f} MB in float32. This machine copies "
        f"memory at {results['bandwidth_gb_s']:.1f} GB/s (read + write, torch tensor copy), so batch-1 decoding is "
        f"bound near {bound:.0f} tokens/s; the bare `generate` reaches {bare['tokens_per_s']:.1f} tokens/s. "
        "Batching amortizes those weight reads over many rows, which is where the "
        "aggregate gains above come from.",
        "",
        "## Alone versus batched",
        "",
        f"{len(AGREEMENT_PROMPTS)} prompts, greedy, 64 new tokens each: run one at a time, then all together in one "
        "batch. The texts that came out identical:",
        "",
        "| dtype | identical alone and batched |",
        "| --- | --- |",
    ]
    for check in results["alone_versus_batched"]:
        lines.append(f"| {check['dtype']} | {check['identical']} of {check['of']} |")
    if len(results["alone_versus_batched"]) == 1:
        lines += ["", "This CPU has no bfloat16 matrix units (AMX): the `DTYPE=bfloat16` opt-in was not measured.", ""]
    else:
        lines += _bfloat16_note()
    for name in ("benchmarks-threads.md", "benchmarks-attack.md"):  # written by bench_threads.py, bench_attack.py
        extra = path.parent / name
        if extra.exists():
            lines += [extra.read_text().strip(), ""]
    kept = marked_sections(path)  # other scripts' sections (bench_speed.py's) stay as they are
    path.write_text("\n".join([*lines, *kept, ""]))


def _bfloat16_note() -> list[str]:
    return [
        "",
        "float32 is the default on the CPU for this reason. Where the CPU multiplies bfloat16 in hardware (AMX), the",
        "`engine (bfloat16)` rows above show what `DTYPE=bfloat16` buys (compared with the same float32 one-at-a-time",
        "baseline, which is faster than a bfloat16 one at batch 1): more tokens/s under load in less memory, at the",
        "price of texts that may differ between a request alone and in a crowd (padding and batch shapes change the",
        "order of float sums, and bfloat16 rounding turns those differences into different tokens).",
        "",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests per level (smoke run)")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--agreement", metavar="DTYPE", help=argparse.SUPPRESS)  # child: one alone-vs-batched check
    args = parser.parse_args()
    scale = 0.5 if args.quick else 1.0
    threads = int(os.environ.get("TORCH_THREADS", "0")) or (os.cpu_count() or 1)
    if args.agreement:
        print(json.dumps(alone_versus_batched(args.agreement, threads)))
        return 0
    from inference.loader import cpu_has_bf16_matrix_units

    dtypes = ["float32", "bfloat16"] if cpu_has_bf16_matrix_units() else ["float32"]
    # two requests per client (six alone): clients stay busy until near the end, instead of the crowd thinning out
    sizes = {1: max(3, int(6 * scale)), 4: int(8 * scale), 16: int(32 * scale), 32: int(64 * scale)}
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "threads": threads,
        "levels": [],
    }
    results["bandwidth_gb_s"] = memory_bandwidth_gb_s()
    results["bare_generate"] = bare_generate(make_jobs(sizes[1], seed=1), threads)
    print("bare generate:", results["bare_generate"], flush=True)
    short: dict[str, Any] = {}

    baseline = Server("baseline", {"MAX_BATCH_SIZE": "1", "QUANTIZATION": "none"})
    try:
        results["levels"].append(asyncio.run(run_level(baseline, "baseline-1", 1, make_jobs(sizes[1], seed=1))))
        results["levels"].append(asyncio.run(run_level(baseline, "baseline-16", 16, make_jobs(sizes[16], seed=16))))
        short["baseline"] = asyncio.run(short_behind_long(baseline))
    finally:
        baseline.stop()

    engine = Server("engine", {"MAX_BATCH_SIZE": "32", "QUANTIZATION": "none"})
    try:
        for clients in (1, 4, 16, 32):
            jobs = make_jobs(sizes[clients], seed=clients)
            results["levels"].append(asyncio.run(run_level(engine, f"engine-{clients}", clients, jobs)))
        results["single_client_greedy"] = asyncio.run(single_client_greedy(engine, make_jobs(sizes[1], seed=1)))
        short["engine"] = asyncio.run(short_behind_long(engine))
    finally:
        engine.stop()

    if "bfloat16" in dtypes:  # the opt-in, at the loads where batching matters
        fast = Server("engine (bfloat16)", {"MAX_BATCH_SIZE": "32", "DTYPE": "bfloat16"})
        try:
            for clients in (16, 32):
                jobs = make_jobs(sizes[clients], seed=clients)
                results["levels"].append(asyncio.run(run_level(fast, f"engine-bf16-{clients}", clients, jobs)))
        finally:
            fast.stop()
    results["alone_versus_batched"] = [alone_versus_batched_in_subprocess(dtype, threads) for dtype in dtypes]
    print(json.dumps(results["alone_versus_batched"]), flush=True)

    results["levels"] = [asdict(level) for level in results["levels"]]
    results["short_behind_long"] = short
    print(json.dumps(short), flush=True)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"server-{int(time.time())}.json").write_text(json.dumps(results, indent=2))
    write_report(results, args.report)
    print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
