"""Soak: thousands of mixed requests against `python app.py`, watching the server's memory (RSS) level off.

    python bench/soak.py                           # 5,000 requests on a tiny random model (built in a temp folder)
    python bench/soak.py --requests 20000 --model /path/to/model

The mix covers every route and the ways a request ends: REST and OpenAI answers, streams read to the end and streams
dropped after their first event (a cancel in the engine), tokenizing, probes and metrics, the Gradio `/generate`
endpoint over its HTTP protocol, and refusals (422, 404, 405, 401-free 4xx of every kind). The server's RSS is sampled
after every `--sample-every` requests; the report shows the samples, the growth over the second half, the statuses,
and whether the log holds a traceback. Exit status 1 if any answer was a 5xx or a request was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.tiny_models import build_tiny_model  # noqa: E402  (after the path is set)

WORDS = ["the", "city", "river", "market", "morning", "bread", "story", "light", "garden", "winter", "engine"]
Call = Callable[[httpx.AsyncClient, random.Random], Awaitable[int]]


def prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def generate(client: httpx.AsyncClient, rng: random.Random) -> int:
    body = {"prompt": prompt(rng, rng.randint(3, 40)), "max_new_tokens": rng.randint(4, 32), "seed": rng.randint(0, 9)}
    return (await client.post("/generate", json=body)).status_code


async def stream(client: httpx.AsyncClient, rng: random.Random, drop_early: bool) -> int:
    body = {"prompt": prompt(rng, rng.randint(3, 20)), "max_new_tokens": rng.randint(16, 64), "stream": True}
    async with client.stream("POST", "/generate", json=body) as response:
        async for line in response.aiter_lines():
            if drop_early and line.startswith("data:"):
                break  # the client goes away mid-stream: the engine cancels the request
    return response.status_code


async def chat(client: httpx.AsyncClient, rng: random.Random, model: str) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": prompt(rng, 8)}], "max_tokens": rng.randint(4, 24)}
    if rng.random() < 0.3:
        body["stream"] = True
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for _ in response.aiter_lines():
                pass
        return response.status_code
    return (await client.post("/v1/chat/completions", json=body)).status_code


async def gradio_generate(client: httpx.AsyncClient, rng: random.Random) -> int:
    joined = await client.post("/gradio_api/call/generate", json={"data": [prompt(rng, 6), 8, 0.7, 0.95, 50]})
    if joined.status_code != 200:
        return joined.status_code
    async with client.stream("GET", f"/gradio_api/call/generate/{joined.json()['event_id']}") as response:
        async for _ in response.aiter_lines():
            pass
    return response.status_code


async def refused(client: httpx.AsyncClient, rng: random.Random, model: str) -> int:
    choice = rng.randrange(7)
    if choice == 0:
        return (await client.post("/generate", json={"prompt": "hi", "temperature": -1})).status_code
    if choice == 1:
        return (await client.post("/generate", json={"prompt": prompt(rng, 3000)})).status_code  # over the limit
    if choice == 2:
        return (await client.post("/v1/completions", json={"model": "gpt-4", "prompt": "hi"})).status_code
    if choice == 3:
        return (await client.get("/v1/nothing-here")).status_code
    if choice == 4:
        return (await client.get("/generate")).status_code
    if choice == 5:
        return (
            await client.post("/tokenize", content=b"{not json", headers={"content-type": "application/json"})
        ).status_code
    return (await client.post("/gradio_api/upload", files={"files": ("a.txt", b"x" * 1000)})).status_code


def mix(model: str) -> list[tuple[float, Call]]:
    async def probe(client: httpx.AsyncClient, rng: random.Random) -> int:
        return (
            await client.get(rng.choice(["/health", "/health/ready", "/model-info", "/metrics", "/v1/models"]))
        ).status_code

    async def tokenize(client: httpx.AsyncClient, rng: random.Random) -> int:
        return (await client.post("/tokenize", json={"prompt": prompt(rng, rng.randint(1, 200))})).status_code

    return [
        (0.25, generate),
        (0.08, lambda c, r: stream(c, r, drop_early=False)),
        (0.10, lambda c, r: stream(c, r, drop_early=True)),
        (0.12, lambda c, r: chat(c, r, model)),
        (0.10, tokenize),
        (0.10, probe),
        (0.10, gradio_generate),
        (0.15, lambda c, r: refused(c, r, model)),
    ]


@dataclass
class Soak:
    statuses: Counter[int] = field(default_factory=Counter)
    lost: int = 0
    samples: list[tuple[int, float]] = field(default_factory=list)  # (requests done, RSS in MB)


async def run(url: str, pid: int, model: str, total: int, concurrency: int, sample_every: int, seed: int) -> Soak:
    soak = Soak()
    process = psutil.Process(pid)
    calls = mix(model)
    weights = [weight for weight, _ in calls]
    rng = random.Random(seed)
    plan = [(random.Random(rng.getrandbits(32)), rng.choices(calls, weights)[0][1]) for _ in range(total)]
    done = 0
    next_index = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal done, next_index
        while next_index < total:
            own_rng, call = plan[next_index]
            next_index += 1
            try:
                soak.statuses[await call(client, own_rng)] += 1
            except httpx.HTTPError:
                soak.lost += 1
            done += 1
            if done % sample_every == 0:
                soak.samples.append((done, process.memory_info().rss / 2**20))

    soak.samples.append((0, process.memory_info().rss / 2**20))
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return soak


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(model: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    environment = {
        **os.environ,
        "MODEL_ID": str(model),
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "MAX_INPUT_TOKENS": "512",
        "MAX_NEW_TOKENS": "64",
        "LOG_LEVEL": "INFO",
    }
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=environment, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        if server.poll() is not None:
            break
        time.sleep(0.2)
    server.kill()
    raise SystemExit(f"the server did not start; see {log}")


def report(soak: Soak, log_text: str) -> tuple[str, bool]:
    lines = ["requests done | server RSS (MB)", "---: | ---:"]
    lines += [f"{done} | {rss:.0f}" for done, rss in soak.samples]
    half = soak.samples[len(soak.samples) // 2][1]
    end = soak.samples[-1][1]
    peak = max(rss for _, rss in soak.samples)
    server_errors = sum(count for status, count in soak.statuses.items() if status >= 500)
    tracebacks = log_text.count("Traceback")
    lines += [
        "",
        f"RSS: start {soak.samples[0][1]:.0f} MB, half-way {half:.0f} MB, end {end:.0f} MB, peak {peak:.0f} MB; "
        f"second half grew {end - half:+.0f} MB",
        f"statuses: {dict(sorted(soak.statuses.items()))}; lost: {soak.lost}; 5xx: {server_errors}; "
        f"tracebacks in the log: {tracebacks}",
    ]
    return "\n".join(lines), server_errors == 0 and soak.lost == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--sample-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--model", type=Path, help="a model folder (default: a tiny random Llama built for the run)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="soak-") as scratch:
        model = args.model or build_tiny_model(Path(scratch) / "tiny-llama", "llama")
        log = Path(scratch) / "server.log"
        server, url = serve(model, log)
        try:
            started = time.monotonic()
            soak = asyncio.run(
                run(url, server.pid, model.name, args.requests, args.concurrency, args.sample_every, args.seed)
            )
            elapsed = time.monotonic() - started
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
        text, ok = report(soak, log.read_text(errors="replace"))
    print(text)
    print(f"{args.requests} requests in {elapsed:.0f} s at concurrency {args.concurrency}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
