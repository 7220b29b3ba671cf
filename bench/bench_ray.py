"""Throughput of the Ray Serve deployment with 1 and then 2 engine replicas, on this machine.

    MODEL_CACHE_DIR=.model-cache python bench/bench_ray.py                # default model, 1 vs 2 replicas
    python bench/bench_ray.py --replicas 1 2 4 --requests 32 --tokens 64

For each replica count: a local Ray cluster, the app from serving/ray_app.py with the machine's CPUs split evenly
between the engine replicas (each replica runs one torch thread per CPU it gets), one warm-up round, then `--requests`
concurrent /generate requests of up to `--tokens` new tokens each (sampled, seeded; one may end early at the
end-of-text token, so generated tokens are counted from the responses). Prints tokens per second for each count.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def one_request(url: str, index: int, tokens: int) -> int:
    body = {
        "prompt": f"Write a short story about a city, number {index}.",
        "max_new_tokens": tokens,
        "temperature": 1.0,
        "seed": index,
    }
    response = httpx.post(f"{url}/generate", json=body, timeout=600)
    response.raise_for_status()
    return int(response.json()["usage"]["completion_tokens"])


def round_of(url: str, requests: int, tokens: int) -> tuple[int, float]:
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=requests) as pool:
        generated = sum(pool.map(lambda i: one_request(url, i, tokens), range(requests)))
    return generated, time.perf_counter() - started


def measure(replicas: int, requests: int, tokens: int, cpus: int) -> dict[str, Any]:
    import ray
    from ray import serve

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ.pop("TORCH_THREADS", None)  # each replica: one torch thread per CPU Ray assigns it
    ray.init(num_cpus=cpus + 1, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        from serving.ray_app import build_app

        started = time.perf_counter()
        app = build_app({"engine_replicas": replicas, "engine_num_cpus": cpus / replicas})
        serve.run(app, name="llm", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        while httpx.get(f"{url}/health", timeout=10).status_code != 200:
            time.sleep(0.5)
        ready_s = time.perf_counter() - started
        round_of(url, min(requests, 4), 8)  # warm-up
        generated, seconds = round_of(url, requests, tokens)
        return {
            "replicas": replicas,
            "cpus_per_replica": cpus / replicas,
            "requests": requests,
            "max_new_tokens": tokens,
            "generated_tokens": generated,
            "seconds": round(seconds, 2),
            "tokens_per_s": round(generated / seconds, 1),
            "startup_s": round(ready_s, 1),
        }
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs split among the engine replicas")
    args = parser.parse_args()
    results = [measure(n, args.requests, args.tokens, args.cpus) for n in args.replicas]
    for result in results:
        print(json.dumps(result))
    base = results[0]["tokens_per_s"]
    for result in results[1:]:
        print(f"{result['replicas']} replicas / {results[0]['replicas']}: {result['tokens_per_s'] / base:.2f}x")


if __name__ == "__main__":
    main()
