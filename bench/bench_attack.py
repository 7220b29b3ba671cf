"""A normal request's latency while the server is under the input attack of issue 12, against its latency alone.

The attack: six clients sending ~1 MB prompts (each refused with 422) and one sending a list of 20,000 prompts, all
as fast as the server answers, each client its own process. Meanwhile one client sends a normal request (a 16-token
greedy /generate) again and again. Target: its median latency under attack within 1.5x of its median alone. Rounds
alternate (alone, then attacked), so that other load on the machine falls on both alike.

    .venv/bin/python bench/bench_attack.py --report docs/benchmarks-attack.md   # the default model, served here
    .venv/bin/python bench/bench_attack.py --url http://127.0.0.1:7860
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from multiprocessing.synchronize import Event
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.live_server import free_port  # noqa: E402

NORMAL = {"prompt": "The three primary colours are", "max_new_tokens": 16, "temperature": 0}
HUGE_PROMPT_CHARS = 990_000  # just under MAX_BODY_BYTES' default of 1,000,000 with the JSON around it


def attacker(url: str, kind: str, stop: Event, counts: dict[str, int], niceness: int) -> None:
    # A real attacker's clients run on its own machines; here they share the server's cores, so by default they run
    # at the lowest CPU priority, leaving the server the CPU it would have, while it still answers all they send.
    os.nice(niceness)
    if kind == "huge":
        path, body = "/generate", {"prompt": "a " * (HUGE_PROMPT_CHARS // 2)}
    else:
        path, body = "/v1/completions", {"model": "SmolLM2-135M-Instruct", "prompt": ["hi"] * 20_000}
    content, headers = json.dumps(body).encode(), {"content-type": "application/json"}
    statuses: collections.Counter[str] = collections.Counter()
    with httpx.Client(base_url=url, timeout=120) as client:
        while not stop.is_set():
            try:
                statuses[str(client.post(path, content=content, headers=headers).status_code)] += 1
            except httpx.HTTPError as error:
                statuses[type(error).__name__] += 1
    for status, count in statuses.items():
        counts[f"{kind} {status}"] = counts.get(f"{kind} {status}", 0) + count


def latencies(url: str, count: int) -> list[float]:
    seconds = []
    with httpx.Client(base_url=url, timeout=300) as client:
        for _ in range(count):
            started = time.perf_counter()
            response = client.post("/generate", json=NORMAL)
            seconds.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["completion_tokens"] >= 1
    return seconds


def start_server(stack: ExitStack, pids: list[int]) -> str:
    port = free_port()
    environment = {
        **os.environ,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "LOG_LEVEL": "WARNING",
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    server = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=environment)
    stack.callback(server.wait, 30)
    stack.callback(server.terminate)
    pids.append(server.pid)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become healthy")


def cpu_seconds(process: psutil.Process | None) -> float:
    if process is None:
        return 0.0
    times = process.cpu_times()
    return float(times.user + times.system)


def describe(name: str, seconds: list[float]) -> str:
    """A table row: the phase, its median and p90 latency."""
    ordered = sorted(seconds)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return f"| {name} ({len(seconds)} requests) | {statistics.median(seconds):.2f} s | {p90:.2f} s |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an already running server (default: start app.py here with its defaults)")
    parser.add_argument("--rounds", type=int, default=4, help="alone-then-attacked rounds (default 4)")
    parser.add_argument("--requests", type=int, default=5, help="normal requests measured per phase (default 5)")
    parser.add_argument("--attacker-nice", type=int, default=19, help="the attack clients' niceness (default 19)")
    parser.add_argument("--report", type=Path, help="also write the section to this file (docs/benchmarks-attack.md)")
    options = parser.parse_args()
    with ExitStack() as stack:
        server_pids: list[int] = []
        url = options.url or start_server(stack, server_pids)
        server = psutil.Process(server_pids[0]) if server_pids else None
        server_cpu_s = 0.0
        latencies(url, 3)  # warm up
        manager = stack.enter_context(multiprocessing.Manager())
        counts = manager.dict()
        alone: list[float] = []
        attacked: list[float] = []
        attack_seconds = 0.0
        alone_seconds = alone_cpu_s = 0.0
        for _ in range(options.rounds):
            alone_from, cpu_from = time.perf_counter(), cpu_seconds(server)
            alone += latencies(url, options.requests)
            alone_seconds += time.perf_counter() - alone_from
            alone_cpu_s += cpu_seconds(server) - cpu_from
            stop = multiprocessing.Event()
            kinds = ["huge"] * 6 + ["many"]
            attackers = [
                multiprocessing.Process(target=attacker, args=(url, kind, stop, counts, options.attacker_nice))
                for kind in kinds
            ]
            attack_from = time.perf_counter()
            cpu_from = cpu_seconds(server)
            for process in attackers:
                process.start()
            time.sleep(2)  # the attack in full swing
            attacked += latencies(url, options.requests)
            stop.set()
            for process in attackers:
                process.join(60)
            attack_seconds += time.perf_counter() - attack_from
            server_cpu_s += cpu_seconds(server) - cpu_from
        ratio = statistics.median(attacked) / statistics.median(alone)
        answered = dict(sorted(counts.items()))
        health = httpx.get(f"{url}/health", timeout=10).status_code
    lines = [
        "## A normal request under an input attack",
        "",
        f"`python bench/bench_attack.py` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}): a 16-token greedy "
        "`/generate` measured alone and while six clients send ~1 MB prompts and one sends a list of 20,000 "
        f"prompts, each as fast as it is answered; {options.rounds} alternating rounds of {options.requests} requests.",
        "",
        "| | median | p90 |",
        "| --- | --- | --- |",
        describe("alone", alone),
        describe("under attack", attacked),
        "",
        f"Under attack: **{ratio:.2f}x** the median alone (target: at most 1.5x). The attack sent "
        f"{sum(answered.values())} requests in {attack_seconds:.0f} s, answered {answered}; `/health` after: {health}. "
        f"Attack clients at niceness {options.attacker_nice}.",
    ]
    if server is not None:
        lines[-1] += (
            f" The server used {alone_cpu_s / alone_seconds:.2f} cores alone and {server_cpu_s / attack_seconds:.2f} "
            "under attack."
        )
    print("\n".join(lines))
    if options.report:
        options.report.write_text("\n".join(lines) + "\n")
    return 0 if ratio <= 1.5 and health == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
