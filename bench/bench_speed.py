"""Speed per weight format, side by side in one run: float32 one request at a time, then the engine in each format.

    python bench/bench_speed.py            # writes its section of docs/benchmarks.md and bench/results/speed-*.json
    python bench/bench_speed.py --quick    # fewer requests, for a smoke run
    python bench/bench_speed.py --avx2 --section speed-avx2   # on a newer CPU: only the kernels an AVX2 CPU has

The load users feel in the playground and what a llama.cpp server is measured with: the OpenAI chat route, streamed,
32 story prompts, 64 new tokens each, temperature 0.8, top_p 0.95, each client sending its next request when its
last one is answered (1 and 16 clients); plus bench_server.py's ragged load (prompts of 8-300 tokens, 16-256 new
tokens) at 16 and 32 clients. Every server is `python app.py` in a subprocess with default settings except
QUANTIZATION (and MAX_BATCH_SIZE=1 for the baselines): the first row is this app's float32 one-at-a-time baseline,
the second the same in transformers' forward (LEAN_FORWARD=false), the app as issue 11 found it. All servers run
from the start and the chat load runs in rounds (--rounds, 3) that visit every server in turn, so a noisy minute on
a shared machine slows every server in turn rather than one; ratios are taken within each round, medians reported.
Also per server: start-up (from `python app.py` to the first answered request, after `python -m inference.prepare`
as `make model` runs it: a later start, not the first), peak memory, and per format the
quality check at start-up, whether 16 greedy prompts give the same text alone and batched, and their answers.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_server import AGREEMENT_PROMPTS, Server, make_jobs, percentile, run_level  # noqa: E402
from bench.machine import cap_kernels_at_avx2, cpu_description, memory_bandwidth_gb_s  # noqa: E402
from bench.report import replace_section  # noqa: E402

SUBJECTS = [
    "a lighthouse keeper",
    "a lost robot",
    "a dragon who is afraid of fire",
    "two friends on a train",
    "a baker in a small town",
    "a cat who wants to fly",
    "an astronaut's first day",
    "a river that talks",
    "a detective in the rain",
    "a child's birthday",
    "an old violin",
    "a garden at night",
    "a pirate who hates the sea",
    "a library that never closes",
    "a snowman in spring",
    "a clockmaker",
    "a girl and a fox",
    "the last tree on Mars",
    "a shy ghost",
    "a storm at sea",
    "a chess game in the park",
    "a postman on a mountain",
    "a forgotten key",
    "a village festival",
    "a talking parrot",
    "a time traveller's mistake",
    "a bridge between two kingdoms",
    "the first snow",
    "a musician on the street",
    "a map with no names",
    "a kite that escaped",
    "a quiet island",
]
NEW_TOKENS = 64
# The baseline every ratio is to: float32, one request at a time, every prompt prefilled whole. Today's float32 runs
# the lean forward (fast_llama); issue 11 measured its targets against the app before that, transformers' forward
# (LEAN_FORWARD=false), which the second baseline keeps, so both ratios can be read.
BASELINE = "baseline (float32, one at a time)"
FOUND_BASELINE = "baseline as issue 11 found it (transformers' forward)"
FORMATS = ("none", "float16", "int8", "int4")


@dataclass
class ChatOutcome:
    ok: bool
    latency_s: float
    ttft_s: float
    completion_tokens: int


@dataclass
class ChatLevel:
    server: str
    clients: int
    requests: int
    failed: int
    tokens_per_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    peak_rss_mb: float


async def chat(client: httpx.AsyncClient, subject: str) -> ChatOutcome:
    """One streamed chat request; time to first token is when its first piece of text arrives."""
    body = {
        "model": "SmolLM2-135M-Instruct",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": NEW_TOKENS,
        "temperature": 0.8,
        "top_p": 0.95,
        "messages": [{"role": "user", "content": f"Write a short story about {subject}."}],
    }
    started = time.perf_counter()
    first, tokens = float("nan"), 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            return ChatOutcome(False, time.perf_counter() - started, first, 0)
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first != first and any(choice["delta"].get("content") for choice in chunk.get("choices", [])):
                first = time.perf_counter() - started
    return ChatOutcome(True, time.perf_counter() - started, first, tokens)


async def chat_level(server: Server, clients: int, requests: int) -> ChatLevel:
    subjects = [SUBJECTS[i % len(SUBJECTS)] for i in range(requests)]
    outcomes: list[ChatOutcome] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while subjects:
            outcomes.append(await chat(client, subjects.pop(0)))

    async with httpx.AsyncClient(base_url=server.url, timeout=900, limits=httpx.Limits(max_connections=64)) as client:
        server.start_sampling()
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - started
        peak = server.stop_sampling()
    good = [outcome for outcome in outcomes if outcome.ok]
    level = ChatLevel(
        server=server.name,
        clients=clients,
        requests=len(outcomes),
        failed=len(outcomes) - len(good),
        tokens_per_s=round(sum(o.completion_tokens for o in good) / wall, 2),
        ttft_p50_s=round(percentile([o.ttft_s for o in good], 0.5), 3),
        ttft_p95_s=round(percentile([o.ttft_s for o in good], 0.95), 3),
        peak_rss_mb=round(peak, 1),
    )
    print(json.dumps(asdict(level)), flush=True)
    return level


def prepared(env: dict[str, str]) -> None:
    """What `make model` does before a first start, with these settings: the model converted, its format's quality
    checked and its decoder built and saved (inference/saved_decoders.py), so a timed start is a later start."""
    environment = {**os.environ, "LOG_LEVEL": "WARNING", **env}
    subprocess.run([sys.executable, "-m", "inference.prepare"], env=environment, cwd=ROOT, check=True)


def started_server(name: str, env: dict[str, str]) -> tuple[Server, float]:
    """Start `python app.py`; seconds from its start to the first answered chat request (the model loaded)."""
    prepared(env)
    started = time.monotonic()
    server = Server(name, env)
    body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300).raise_for_status()
    return server, round(time.monotonic() - started, 1)


def model_weights(server: Server) -> dict[str, Any]:
    return dict(httpx.get(f"{server.url}/model-info", timeout=30).json()["weights"])


def greedy_agreement(fmt: str) -> dict[str, Any]:
    """In this process: the 16 greedy prompts alone, then all together in one batch; texts and how many agree."""
    from inference.engine import Engine
    from inference.params import SamplingParams
    from inference.settings import Settings

    engine = Engine(Settings(quantization=fmt, max_batch_size=len(AGREEMENT_PROMPTS)))  # type: ignore[arg-type]
    engine.start()
    prompts = [engine.prepare_completion(text) for text in AGREEMENT_PROMPTS]
    params = SamplingParams(max_new_tokens=64, temperature=0.0)
    alone = [asyncio.run(engine.generate(prompt, params)).text for prompt in prompts]

    async def together() -> list[str]:
        return [result.text for result in await asyncio.gather(*(engine.generate(p, params) for p in prompts))]

    batched = asyncio.run(together())
    engine.shutdown()
    identical = sum(a == b for a, b in zip(alone, batched, strict=True))
    answers = dict(zip(AGREEMENT_PROMPTS, alone, strict=True))
    return {"format": fmt, "identical": identical, "of": len(prompts), "answers": answers}


def greedy_agreement_in_subprocess(fmt: str) -> dict[str, Any]:
    output = subprocess.run(
        [sys.executable, __file__, "--agreement", fmt], capture_output=True, text=True, check=True, env=os.environ
    )
    return dict(json.loads(output.stdout.strip().splitlines()[-1]))


def available_formats() -> list[str]:
    from inference.quantization import fbgemm_available

    return list(FORMATS) if fbgemm_available() else ["none"]


def start_servers(results: dict[str, Any]) -> list[Server]:
    """Every server of the comparison, started one after another (each start timed alone) and left running, so the
    rounds can visit them in turn; an idle server costs the others nothing measurable (its scheduler sleeps)."""
    baseline = {"MAX_BATCH_SIZE": "1", "QUANTIZATION": "none", "PREFIX_CACHING": "false"}
    runs = [(BASELINE, baseline), (FOUND_BASELINE, {**baseline, "LEAN_FORWARD": "false"})]
    runs += [("engine (auto)", {"MAX_BATCH_SIZE": "32"})]
    runs += [(f"engine ({fmt})", {"MAX_BATCH_SIZE": "32", "QUANTIZATION": fmt}) for fmt in available_formats()]
    # the chat load again without the cached template opening, to show what it saves (ragged prompts have none)
    runs += [("engine (auto, PREFIX_CACHING=false)", {"MAX_BATCH_SIZE": "32", "PREFIX_CACHING": "false"})]
    servers: list[Server] = []
    auto_format = None
    try:
        for name, env in runs:
            if "QUANTIZATION" in env and not name.startswith("baseline") and env["QUANTIZATION"] == auto_format:
                continue  # auto's own choice is already running
            server, startup = started_server(name, env)
            servers.append(server)
            weights = model_weights(server)
            if "QUANTIZATION" not in env and "PREFIX_CACHING" not in env:
                auto_format = weights["format"]
                name = server.name = f"engine (auto: {auto_format})"
            results["startup_s"][name], results["weights"][name] = startup, weights
            print(json.dumps({"server": name, "startup_s": startup}), flush=True)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def summarize_rounds(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per server and level: medians over the rounds, and the median of each round's ratio to the baseline
    measured in that same round (a ratio of two medians could pair a quiet minute with a busy one)."""
    speed = {(level["server"], level["round"], level["clients"]): level["tokens_per_s"] for level in rounds}
    rows: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for level in rounds:
        rows.setdefault((level["server"], level["clients"]), []).append(level)

    def ratios(levels: list[dict[str, Any]], baseline: str) -> list[float]:
        pairs = [(level["tokens_per_s"], speed.get((baseline, level["round"], level["clients"]))) for level in levels]
        return [value / base for value, base in pairs if base]

    summary = []
    for (server, clients), levels in rows.items():
        to_baseline, to_found = ratios(levels, BASELINE), ratios(levels, FOUND_BASELINE)
        summary.append(
            {
                "server": server,
                "clients": clients,
                "rounds": len(levels),
                "failed": sum(level["failed"] for level in levels),
                "tokens_per_s": statistics.median(level["tokens_per_s"] for level in levels),
                "tokens_per_s_each": [level["tokens_per_s"] for level in levels],
                "ratio": statistics.median(to_baseline) if to_baseline else 0.0,
                "ratio_each": [round(ratio, 2) for ratio in to_baseline],
                "ratio_to_found": statistics.median(to_found) if to_found else 0.0,
                "ttft_p50_s": statistics.median(level["ttft_p50_s"] for level in levels),
                "ttft_p95_s": statistics.median(level["ttft_p95_s"] for level in levels),
                "peak_rss_mb": max(level["peak_rss_mb"] for level in levels),
            }
        )
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests per level (smoke run)")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--section", default="speed", help="the section of the report to write")
    parser.add_argument(
        "--avx2", action="store_true", help="cap every kernel at AVX2, as on a CPU without AVX-512 or AMX"
    )
    parser.add_argument("--rounds", type=int, default=3, help="chat rounds over every server (medians reported)")
    parser.add_argument("--agreement", metavar="FORMAT", help=argparse.SUPPRESS)  # child: one greedy check
    args = parser.parse_args()
    if args.avx2:
        cap_kernels_at_avx2()
    if args.agreement:
        print(json.dumps(greedy_agreement(args.agreement)))
        return 0
    scale = 0.5 if args.quick else 1.0
    chat_requests = {1: max(4, int(8 * scale)), 16: int(32 * scale)}
    ragged_requests = {16: int(32 * scale), 32: int(64 * scale)}
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_description(),
        "bandwidth_gb_s": memory_bandwidth_gb_s(),
        "torch_threads": os.cpu_count(),
        "rounds": args.rounds,
        "chat_rounds": [],
        "chat": [],
        "ragged": [],
        "startup_s": {},
        "weights": {},
        "agreement": [],
    }
    print(results["cpu"], flush=True)
    servers = start_servers(results)
    try:
        # Chat, in rounds: every round runs each level on every server, one after another, in an order that turns
        # each round (a neighbour that slows the machine for a minute then slows every server in turn, not one)
        for round_index in range(args.rounds):
            order = servers[round_index % len(servers) :] + servers[: round_index % len(servers)]
            for clients, requests in chat_requests.items():
                for server in order:
                    level = asyncio.run(chat_level(server, clients, requests))
                    results["chat_rounds"].append({"round": round_index, **asdict(level)})
        results["chat"] = summarize_rounds(results["chat_rounds"])
        # Ragged, once per server (its one-at-a-time baseline alone takes minutes)
        for server in servers:
            # ragged prompts have no chat template to cache (nothing to compare), and ragged ratios are to one
            # baseline
            if server.name.endswith("PREFIX_CACHING=false)") or server.name == FOUND_BASELINE:
                continue
            for clients, requests in ragged_requests.items():
                if server.name == BASELINE and clients == 32:
                    continue  # one at a time, 32 clients only wait longer than 16
                jobs = make_jobs(requests, seed=clients)
                results["ragged"].append(asdict(asyncio.run(run_level(server, server.name, clients, jobs))))
    finally:
        for server in servers:
            server.stop()
    results["agreement"] = [greedy_agreement_in_subprocess(fmt) for fmt in available_formats()]
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"speed-{int(time.time())}.json").write_text(json.dumps(results, indent=2))
    replace_section(args.report, args.section, render(results))
    print(f"wrote the {args.section} section of {args.report}")
    return 0


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "n/a"


def render(results: dict[str, Any]) -> str:
    rounds = results.get("rounds", 1)
    capped = " with kernels capped at AVX2" if "capped at AVX2" in results["cpu"] else ""
    lines = [
        f"## Speed per weight format{capped} (`bench/bench_speed.py`)",
        "",
        f"Run {results['date']} on {results['cpu']}; memory read bandwidth {results['bandwidth_gb_s']:.1f} GB/s.",
        "Each server is `python app.py` with the default settings except those in its name; the baseline is this",
        "app in float32 with MAX_BATCH_SIZE=1. Every server runs from the start; the chat load ran in",
        f"{rounds} rounds, each visiting every server in turn: tokens/s and TTFT are medians over the rounds, and",
        "`vs baseline` is the median of each round's ratio to the baseline at the same number of clients in that",
        "round (each round's ratio in brackets); `vs transformers'` is the same to the baseline as issue 11 found it",
        "(float32 in transformers' forward, LEAN_FORWARD=false). Peak RSS is the highest seen in any round.",
        "",
        "### Chat: 32 story prompts, 64 new tokens, temperature 0.8, top_p 0.95, streamed (`/v1/chat/completions`)",
        "",
        "| server | clients | tokens/s | vs baseline (rounds) | vs transformers' | TTFT p50 / p95 (s) | peak RSS (MB) "
        "| start-up (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for level in sorted(results["chat"], key=lambda level: level["clients"]):
        each = " / ".join(f"{ratio:.2f}" for ratio in level["ratio_each"])
        lines.append(
            f"| {level['server']} | {level['clients']} | {level['tokens_per_s']:.1f} "
            f"| **{level['ratio']:.2f}x** ({each}) | {level['ratio_to_found']:.2f}x "
            f"| {level['ttft_p50_s']:.2f} / {level['ttft_p95_s']:.2f} | {level['peak_rss_mb']:.0f} "
            f"| {results['startup_s'][level['server']]:.1f} |"
        )
    ragged_base = next((lv["tokens_per_s"] for lv in results["ragged"] if lv["server"] == BASELINE), 0)
    lines += [
        "",
        "### Ragged: prompts of 8-300 tokens, 16-256 new tokens, temperature 0.7 (`/generate`)",
        "",
        "| server | clients | tokens/s | vs baseline (16 clients) | TTFT p50 / p95 (s) | peak RSS (MB) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for level in results["ragged"]:
        lines.append(
            f"| {level['server']} | {level['clients']} | {level['tokens_per_s']:.1f} "
            f"| {_ratio(level['tokens_per_s'], ragged_base)} | {level['ttft_p50_s']:.2f} / {level['ttft_p95_s']:.2f} "
            f"| {level['peak_rss_mb']:.0f} |"
        )
    lines += [
        "",
        "### Quality per format",
        "",
        "The start-up check against float32 on the built-in text (`inference/data/quality_check.txt`), and 16 greedy",
        "prompts of 64 tokens run alone and then all in one batch.",
        "",
        "| format | perplexity (float32) | likeliest token kept | chosen by `auto` | identical alone and batched |",
        "| --- | --- | --- | --- | --- |",
    ]
    weights = {info["format"]: info for info in results["weights"].values()}
    for check in results["agreement"]:
        info = weights.get(check["format"], {})
        quality = info.get("quality")
        measured = f"{quality['perplexity']:.2f} ({quality['perplexity_float32']:.2f})" if quality else "-"
        kept = f"{quality['top1_agreement']:.1%}" if quality else "100%"
        lines.append(
            f"| {check['format']} | {measured} | {kept} | {'yes' if 'auto' in info.get('reason', '') else ''} "
            f"| {check['identical']} of {check['of']} |"
        )
    lines += ["", "Greedy answers per format (first 80 characters):", ""]
    lines += ["| prompt | " + " | ".join(c["format"] for c in results["agreement"]) + " |"]
    lines += ["| --- " * (1 + len(results["agreement"])) + "|"]
    for prompt in AGREEMENT_PROMPTS:
        cells = [c["answers"][prompt][:80].replace("\n", " ").replace("|", "/") for c in results["agreement"]]
        lines.append(f"| `{prompt.strip()}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
