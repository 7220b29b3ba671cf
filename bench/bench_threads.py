"""How many torch threads? The engine in-process, 1 versus 2 threads (alternating, several rounds), at batch 1 and 16.

    python bench/bench_threads.py     # writes docs/benchmarks-threads.md (bench_server.py folds it into benchmarks.md)

Each configuration runs in a fresh subprocess (torch's thread pool is fixed once used), rounds alternate so a noisy
neighbour hurts both alike, and the report gives medians.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure(threads: int, clients: int, new_tokens: int) -> float:
    """Aggregate generated tokens/s of `clients` concurrent greedy requests in one engine (run in a subprocess)."""
    from inference.engine import Engine
    from inference.params import SamplingParams
    from inference.settings import Settings

    engine = Engine(Settings(torch_threads=threads, max_batch_size=max(clients, 1)))
    engine.start()
    prompts = [
        engine.prepare_completion(f"Write a short note number {i} about the river and the town.")
        for i in range(clients)
    ]
    # EOS ignored: every run generates exactly new_tokens per request, so runs do the same work
    engine._eos_ids = set()
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)

    async def run() -> int:
        results = await asyncio.gather(*(engine.generate(prompt, params) for prompt in prompts))
        return sum(result.completion_tokens for result in results)

    asyncio.run(run())  # warm-up
    started = time.perf_counter()
    tokens = asyncio.run(run())
    elapsed = time.perf_counter() - started
    engine.shutdown()
    return tokens / elapsed


def main() -> int:
    if len(sys.argv) == 4:  # child: one measurement
        print(json.dumps(measure(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))))
        return 0
    rounds = int(os.environ.get("ROUNDS", "3"))
    cases = [(1, 64), (16, 64)]
    results: dict[str, list[float]] = {}
    for _ in range(rounds):
        for clients, new_tokens in cases:
            for threads in (1, 2):
                output = subprocess.run(
                    [sys.executable, __file__, str(threads), str(clients), str(new_tokens)],
                    capture_output=True,
                    text=True,
                    check=True,
                    cwd=ROOT,
                )
                value = float(output.stdout.strip().splitlines()[-1])
                results.setdefault(f"{clients}:{threads}", []).append(value)
                print(f"clients={clients} threads={threads}: {value:.1f} tokens/s", flush=True)
    lines = [
        "## Torch threads (TORCH_THREADS)",
        "",
        f"`python bench/bench_threads.py`: the engine in-process, greedy, 64 new tokens per request, {rounds} "
        "alternating rounds, medians of aggregate tokens/s.",
        "",
        "| concurrent requests | 1 thread | 2 threads | 2 vs 1 |",
        "| --- | --- | --- | --- |",
    ]
    for clients, _ in cases:
        one = statistics.median(results[f"{clients}:1"])
        two = statistics.median(results[f"{clients}:2"])
        lines.append(f"| {clients} | {one:.1f} | {two:.1f} | {two / one:.2f}x |")
    lines += [
        "",
        "The default, `TORCH_THREADS=0`, means one thread per core (2 here), which the table supports. On a machine "
        "where other busy processes share the cores, 1 thread degrades more gently; set TORCH_THREADS=1 there.",
    ]
    (ROOT / "docs" / "benchmarks-threads.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
