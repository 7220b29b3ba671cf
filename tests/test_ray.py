"""The app on Ray Serve: two engine replicas of the tiny Llama behind the unchanged FastAPI + Gradio ingress.

A local Ray cluster on this machine (4 logical CPUs), the application from serving/ray_app.py, every route through the
ingress's HTTP port, both replicas serving, a cancelled stream cancelling inside its replica, and one replica killed
under load: every request gets an answer (a success or a clean error), none hangs, then Serve replaces the replica.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray", reason="Ray Serve is optional: pip install -r requirements-ray.txt")

from gradio_client import Client  # noqa: E402
from ray import serve  # noqa: E402

from api.errors import status_for  # noqa: E402
from inference.errors import (  # noqa: E402
    EngineError,
    GenerationError,
    InvalidRequestError,
    NotReadyError,
    PromptTooLongError,
    QueueFullError,
    RequestTimeoutError,
    UnknownModelError,
)
from serving.wire import pack_error, unpack_error  # noqa: E402
from tests.live_server import free_port  # noqa: E402
from tests.tiny_models import build_tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
APP_NAME = "llm"
TIMEOUT_S = 60.0


def wait_until(check: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = check()
            if value:
                return value
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.25)


def board_entries() -> list[dict[str, Any]]:
    board = serve.get_deployment_handle("ReplicaBoard", app_name=APP_NAME)
    entries: list[dict[str, Any]] = board.read.remote(3.0).result(timeout_s=10)
    return entries


def ready_replicas() -> list[dict[str, Any]]:
    return [entry for entry in board_entries() if entry["state"] == "ready"]


def metric_values(text: str, name: str) -> dict[str, float]:
    """{replica label: value} of one per-replica metric family."""
    pattern = re.compile(rf'^{name}\{{replica="([^"]+)"\}} ([0-9.e+]+)$', re.MULTILINE)
    return {replica: float(value) for replica, value in pattern.findall(text)}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model = build_tiny_model(tmp_path_factory.mktemp("ray-tiny-llama"), "llama")
    env = {
        "MODEL_ID": str(model),
        "MODEL_CACHE_DIR": str(tmp_path_factory.mktemp("ray-model-cache")),
        "TORCH_THREADS": "1",
        "BATCH_WAIT_MS": "5",
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the local raylet and its workers inherit the driver's environment
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        from serving.ray_app import build_app

        serve.run(build_app({"engine_replicas": 2, "engine_num_cpus": 1}), name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200, 120, "/health to say ok")
        wait_until(lambda: len(ready_replicas()) == 2, 60, "both engine replicas to report ready")
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def sse_events(response: httpx.Response) -> list[Any]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def call_route(url: str, kind: str, index: int) -> tuple[str, int, Any]:
    """One request of `kind`; returns (kind, status, body or events)."""
    with httpx.Client(base_url=url, timeout=TIMEOUT_S) as client:
        prompt = f"The quick brown fox number {index}"
        if kind == "generate":
            response = client.post("/generate", json={"prompt": prompt, "max_new_tokens": 24, "temperature": 0})
            return kind, response.status_code, response.json()
        if kind == "generate-stream":
            body = {"prompt": prompt, "max_new_tokens": 24, "temperature": 0, "stream": True}
            with client.stream("POST", "/generate", json=body) as response:
                return kind, response.status_code, sse_events(response)
        if kind == "chat":
            body = {"model": "x", "messages": [{"role": "user", "content": prompt}], "max_tokens": 16}
            body["model"] = client.get("/v1/models").json()["data"][0]["id"]
            response = client.post("/v1/chat/completions", json=body)
            return kind, response.status_code, response.json()
        if kind == "chat-stream":
            model_id = client.get("/v1/models").json()["data"][0]["id"]
            body = {"model": model_id, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16}
            with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
                return kind, response.status_code, sse_events(response)
        if kind == "completions":
            model_id = client.get("/v1/models").json()["data"][0]["id"]
            body = {"model": model_id, "prompt": [prompt, prompt + "!"], "max_tokens": 12, "n": 2}
            response = client.post("/v1/completions", json=body)
            return kind, response.status_code, response.json()
        if kind == "tokenize":
            response = client.post("/tokenize", json={"messages": [{"role": "user", "content": prompt}]})
            return kind, response.status_code, response.json()
        if kind == "model-info":
            response = client.get("/model-info")
            return kind, response.status_code, response.json()
        if kind == "health":
            response = client.get("/health/ready")
            return kind, response.status_code, response.json()
        if kind == "gradio":
            gradio = Client(url + "/", verbose=False)
            return kind, 200, gradio.predict(prompt, 16, 0.0, 0.95, 50, api_name="/generate")
    raise AssertionError(kind)


KINDS = [
    "generate",
    "generate-stream",
    "chat",
    "chat-stream",
    "completions",
    "tokenize",
    "model-info",
    "health",
    "gradio",
]


@pytest.mark.parametrize(
    "error",
    [
        InvalidRequestError("`top_p` must be in (0, 1]", param="top_p"),
        PromptTooLongError(3000, 2048),
        UnknownModelError("gpt-4", "tiny"),
        QueueFullError(64, retry_after_s=2),
        RequestTimeoutError(1.5),
        NotReadyError("The server shut down before this request finished."),
        GenerationError("Generation failed inside the model."),
    ],
)
def test_engine_errors_cross_processes_intact(error: EngineError) -> None:
    error.logged = True
    copy = unpack_error(ray.cloudpickle.loads(ray.cloudpickle.dumps(pack_error(error))))
    assert type(copy) is type(error)
    assert (copy.message, copy.param, copy.type, copy.logged) == (error.message, error.param, error.type, True)
    assert status_for(copy) == status_for(error)
    assert vars(copy) == vars(error)  # retry_after_s, prompt_tokens, limit...


def test_every_route_through_the_ingress(server: str) -> None:
    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        futures = [pool.submit(call_route, server, kind, i) for i, kind in enumerate(KINDS * 2)]
        outcomes = [future.result(timeout=TIMEOUT_S * 2) for future in futures]
    for kind, status, body in outcomes:
        assert status == 200, (kind, body)
        if kind == "generate":
            assert body["usage"]["completion_tokens"] > 0
            assert body["finish_reason"] in ("length", "stop", "eos")
        elif kind in ("generate-stream", "chat-stream"):
            assert body, kind
            assert not any(isinstance(event, dict) and "error" in event for event in body), body
            assert body[-1] == "[DONE]" if kind == "chat-stream" else body[-1]["type"] == "done"
        elif kind == "chat":
            assert body["choices"][0]["message"]["role"] == "assistant"
        elif kind == "completions":
            assert len(body["choices"]) == 4
            assert body["usage"]["completion_tokens"] > 0
        elif kind == "tokenize":
            assert body["count"] == len(body["tokens"]) == len(body["pieces"]) > 0
        elif kind == "model-info":
            assert body["architecture"] == "LlamaForCausalLM"
            assert body["has_chat_template"] is True
        elif kind == "health":
            assert body["status"] == "ok"
        elif kind == "gradio":
            assert isinstance(body, str)


def test_refusals_keep_their_status_codes(server: str) -> None:
    with httpx.Client(base_url=server, timeout=TIMEOUT_S) as client:
        too_long = client.post("/generate", json={"prompt": "fox " * 3000, "max_new_tokens": 8})
        assert too_long.status_code == 422
        assert too_long.json()["error"]["param"] == "prompt"
        # any model name is served by default (STRICT_MODEL_NAME=false); retrieving an unknown one is still 404
        unknown = client.get("/v1/models/gpt-4")
        assert unknown.status_code == 404
        assert unknown.json()["error"]["param"] == "model"


def test_both_replicas_serve_and_metrics_aggregate(server: str) -> None:
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        outcomes = list(pool.map(lambda i: call_route(server, "generate", i), range(16)))
    assert all(status == 200 for _, status, _ in outcomes)

    def both_served() -> dict[str, float]:
        text = httpx.get(f"{server}/metrics", timeout=10).text
        finished = metric_values(text, "llm_replica_requests_finished_total")
        served = len(finished) == 2 and all(value > 0 for value in finished.values())
        return finished if served and sum(finished.values()) >= 16 else {}

    finished = wait_until(both_served, 10, "both replicas to have finished requests")
    assert sum(finished.values()) >= 16
    text = httpx.get(f"{server}/metrics", timeout=10).text
    assert 'llm_engine_replicas{state="ready"} 2.0' in text
    assert "llm_requests_running " in text
    # the engine's outcomes, counted in the ingress as requests end (observers don't cross processes)
    finished_here = re.findall(
        r'^llm_engine_requests_total\{outcome="(?:length|eos|stop)",route="/generate"\} (\S+)$', text, re.MULTILINE
    )
    assert sum(float(value) for value in finished_here) >= 16, finished_here


def test_closing_a_stream_cancels_inside_the_replica(server: str) -> None:
    def cancelled() -> float:
        text = httpx.get(f"{server}/metrics", timeout=10).text
        return sum(metric_values(text, "llm_replica_requests_cancelled_total").values())

    base = {"prompt": "The", "max_new_tokens": 450, "temperature": 1.0, "top_k": 0}
    with httpx.Client(base_url=server, timeout=TIMEOUT_S) as client:
        # a seed that runs all 450 tokens (no early end-of-sequence): only the cancel can end it early
        seed = next(
            seed
            for seed in range(1, 50)
            if client.post("/generate", json={**base, "seed": seed}).json()["finish_reason"] == "length"
        )
        before = cancelled()
        received = 0
        with client.stream("POST", "/generate", json={**base, "seed": seed, "stream": True}) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                received += line.startswith("data: ")
                if received == 3:
                    break  # leave after 3 events: the connection closes
    wait_until(lambda: cancelled() > before, 15, "the replica to count the request as cancelled")


def test_a_replica_killed_under_load_loses_no_request(server: str) -> None:
    sent = 16
    kinds = ["generate", "generate-stream"] * (sent // 2)

    def long_request(index: int) -> tuple[str, int, Any]:
        with httpx.Client(base_url=server, timeout=TIMEOUT_S) as client:
            body = {"prompt": f"Story {index}:", "max_new_tokens": 300, "temperature": 1.0, "seed": index}
            if kinds[index] == "generate":
                response = client.post("/generate", json=body)
                return "generate", response.status_code, response.json()
            with client.stream("POST", "/generate", json={**body, "stream": True}) as response:
                return "generate-stream", response.status_code, sse_events(response)

    victim = ready_replicas()[0]
    with concurrent.futures.ThreadPoolExecutor(max_workers=sent) as pool:
        futures = [pool.submit(long_request, i) for i in range(sent)]
        time.sleep(1.0)
        ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=False)
        outcomes = [future.result(timeout=TIMEOUT_S * 2) for future in futures]

    assert len(outcomes) == sent  # every request answered, none hung
    succeeded = failed = 0
    for kind, status, body in outcomes:
        if kind == "generate":
            if status == 200:
                assert body["usage"]["completion_tokens"] > 0
                succeeded += 1
            else:  # a clean JSON error, not a dropped connection
                assert status in (500, 503), body
                assert body["error"]["message"]
                failed += 1
        else:
            assert status == 200
            last = body[-1]
            if "error" in last:
                assert last["error"]["code"] in (500, 503), last
                failed += 1
            else:
                assert last["type"] == "done"
                succeeded += 1
    print(f"\nkilled {victim['replica']}: {succeeded} succeeded, {failed} clean errors of {sent}")
    assert succeeded + failed == sent
    assert succeeded > 0

    # Serve replaces the dead replica; the app keeps answering throughout. The board lists a replica until its last
    # report is 3 s old, so the victim can still count as ready just after the kill: wait for the replacement itself.
    def replaced() -> bool:
        replicas = {entry["replica"] for entry in ready_replicas()}
        return len(replicas) == 2 and victim["replica"] not in replicas

    wait_until(replaced, 90, "Serve to replace the killed replica")
    status, body = call_route(server, "generate", 99)[1:]
    assert status == 200, body
