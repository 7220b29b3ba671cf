"""A normal request's latency while the server is under the input attack of issue 12, against its latency alone.

Run here, it measures two servers in turn: the defaults, and the same with REFUSED_BYTES_PER_S=0 (refused requests
never held back), to show what holding them is worth.

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
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_description  # noqa: E402
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


@dataclass
class StartedServer:
    url: str
    process: psutil.Process


def start_server(stack: ExitStack, overrides: dict[str, str]) -> StartedServer:
    port = free_port()
    environment = {
        **os.environ,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "LOG_LEVEL": "WARNING",
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        **overrides,
    }
    server = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=environment)
    stack.callback(server.wait, 30)
    stack.callback(server.terminate)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return StartedServer(url, psutil.Process(server.pid))
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


@dataclass
class Outcome:
    alone: list[float]
    attacked: list[float]
    answered: dict[str, int]
    attack_seconds: float
    health: int
    cores_alone: float | None
    cores_attacked: float | None

    @property
    def ratio(self) -> float:
        return statistics.median(self.attacked) / statistics.median(self.alone)


def measure(url: str, server: psutil.Process | None, options: argparse.Namespace) -> Outcome:
    """Alternating rounds: the normal request alone, then while the attack runs."""
    latencies(url, 3)  # warm up
    with multiprocessing.Manager() as manager:
        counts = manager.dict()
        alone: list[float] = []
        attacked: list[float] = []
        attack_seconds = alone_seconds = alone_cpu_s = attack_cpu_s = 0.0
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
            attack_from, cpu_from = time.perf_counter(), cpu_seconds(server)
            for process in attackers:
                process.start()
            time.sleep(2)  # the attack in full swing
            attacked += latencies(url, options.requests)
            stop.set()
            for process in attackers:
                process.join(60)
            attack_seconds += time.perf_counter() - attack_from
            attack_cpu_s += cpu_seconds(server) - cpu_from
        answered = dict(sorted(counts.items()))
    health = httpx.get(f"{url}/health", timeout=10).status_code
    return Outcome(
        alone,
        attacked,
        answered,
        attack_seconds,
        health,
        alone_cpu_s / alone_seconds if server else None,
        attack_cpu_s / attack_seconds if server else None,
    )


def describe_outcome(name: str, outcome: Outcome, options: argparse.Namespace) -> list[str]:
    lines = [
        f"{name}:",
        "",
        "| | median | p90 |",
        "| --- | --- | --- |",
        describe("alone", outcome.alone),
        describe("under attack", outcome.attacked),
        "",
        f"Under attack: **{outcome.ratio:.2f}x** the median alone (target: at most 1.5x). The attack sent "
        f"{sum(outcome.answered.values())} requests in {outcome.attack_seconds:.0f} s, answered {outcome.answered}; "
        f"`/health` after: {outcome.health}. Attack clients at niceness {options.attacker_nice}.",
    ]
    if outcome.cores_alone is not None:
        lines[-1] += (
            f" The server used {outcome.cores_alone:.2f} cores alone and {outcome.cores_attacked:.2f} under attack."
        )
    return [*lines, ""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an already running server (default: start app.py here, as below)")
    parser.add_argument("--rounds", type=int, default=4, help="alone-then-attacked rounds (default 4)")
    parser.add_argument("--requests", type=int, default=5, help="normal requests measured per phase (default 5)")
    parser.add_argument("--attacker-nice", type=int, default=19, help="the attack clients' niceness (default 19)")
    parser.add_argument("--report", type=Path, help="also write the section to this file (docs/benchmarks-attack.md)")
    options = parser.parse_args()
    # Started here: the defaults, and the same with refusals never held, to show what holding them is worth.
    configurations: dict[str, dict[str, str]] = {
        "The server with its defaults": {},
        "With `REFUSED_BYTES_PER_S=0` (refusals never held)": {"REFUSED_BYTES_PER_S": "0"},
    }
    outcomes: dict[str, Outcome] = {}
    if options.url:
        outcomes["The server at " + options.url] = measure(options.url, None, options)
    else:
        for name, overrides in configurations.items():
            with ExitStack() as stack:
                server = start_server(stack, overrides)
                outcomes[name] = measure(server.url, server.process, options)
    lines = [
        "## A normal request under an input attack",
        "",
        f"`python bench/bench_attack.py` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"on {cpu_description()}): "
        "a 16-token greedy `/generate` measured alone and while six clients send ~1 MB prompts and one sends a list "
        f"of 20,000 prompts, each as fast as it is answered; {options.rounds} alternating rounds of "
        f"{options.requests} requests.",
        "",
    ]
    for name, outcome in outcomes.items():
        lines += describe_outcome(name, outcome, options)
    print("\n".join(lines))
    if options.report:
        options.report.write_text("\n".join(lines))
    first = next(iter(outcomes.values()))
    return 0 if first.ratio <= 1.5 and first.health == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
