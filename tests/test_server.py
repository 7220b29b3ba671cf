"""The web layer against a live server on a tiny chat model: REST routes, errors, and the named Gradio endpoints."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from gradio_client import Client
from gradio_client.exceptions import ValidationError

from app import create_app
from inference.engine import Engine
from inference.errors import ModelNotFoundError
from inference.loader import LoadedModel, load_model
from inference.settings import Settings
from tests.conftest import Submission
from tests.live_server import LiveServer, serve
from ui.events import GENERATE_CONCURRENCY

ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, make_settings: Any) -> Iterator[LiveServer]:
    settings = make_settings(tiny_llama_dir, max_input_tokens=200, max_new_tokens=300, max_body_bytes=20_000)
    with serve(settings) as live:
        yield live


@pytest.fixture(scope="module")
def gradio(server: LiveServer) -> Client:
    return Client(server.url + "/", verbose=False)


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS
    assert error["code"] == status
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    return error


# ----- REST -------------------------------------------------------------------------------------------------------


def test_health_is_ok_once_loaded(http: httpx.Client) -> None:
    response = http.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    assert response.headers["x-request-id"]


def test_model_info_describes_model_and_limits(http: httpx.Client, tiny_llama_dir: Path) -> None:
    info = http.get("/model-info").json()
    assert info["source"] == "folder"
    assert info["location"] == str(tiny_llama_dir)
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["forward"] == "lean"
    assert info["kv_cache_dtype"] == "float32"  # the tests' tiny models run float32 weights, so torch's attention
    assert info["parameters"] > 0
    assert info["has_chat_template"] is True
    assert info["context_length"] == 512
    assert info["limits"]["max_input_tokens"] == 200
    assert info["limits"]["max_new_tokens"] == 300
    assert info["version"]


def test_generate_returns_text_usage_and_timings(http: httpx.Client) -> None:
    body = http.post("/generate", json={"prompt": "The quick brown fox", "max_new_tokens": 12, "temperature": 0}).json()
    assert body["finish_reason"] in ("length", "eos")
    assert body["usage"]["prompt_tokens"] > 0
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert 1 <= body["usage"]["completion_tokens"] <= 12
    assert body["timings"]["total_s"] >= body["timings"]["generation_s"] > 0
    assert body["model"]


def test_generate_accepts_max_length_alias(http: httpx.Client) -> None:
    body = http.post("/generate", json={"prompt": "Hello", "max_length": 5, "temperature": 0}).json()
    assert body["usage"]["completion_tokens"] <= 5


def test_greedy_is_deterministic_and_seed_reproduces(http: httpx.Client) -> None:
    greedy = {"prompt": "Paris is the capital of", "max_new_tokens": 20, "temperature": 0}
    assert (
        http.post("/generate", json=greedy).json()["generated_text"]
        == http.post("/generate", json=greedy).json()["generated_text"]
    )
    seeded = {"prompt": "Once upon a time", "max_new_tokens": 30, "temperature": 1.5, "top_k": 0, "seed": 7}
    first = http.post("/generate", json=seeded).json()["generated_text"]
    assert http.post("/generate", json=seeded).json()["generated_text"] == first
    other = http.post("/generate", json={**seeded, "seed": 8}).json()["generated_text"]
    assert other != first


def test_stop_string_ends_output_before_it(http: httpx.Client) -> None:
    request = {"prompt": "The quick brown fox", "max_new_tokens": 40, "temperature": 0}
    full = http.post("/generate", json=request).json()["generated_text"]
    stop = full.strip()[5:8] if len(full.strip()) > 8 else full.strip()[-1:]
    assert stop
    body = http.post("/generate", json={**request, "stop": [stop]}).json()
    assert body["finish_reason"] == "stop"
    assert stop not in body["generated_text"]
    assert full.startswith(body["generated_text"])


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": "hi", "temperature": -0.1}, "temperature"),
        ({"prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "top_p": 1.5}, "top_p"),
        ({"prompt": "hi", "top_k": -1}, "top_k"),
        ({"prompt": "hi", "top_k": 1e308}, "top_k"),
        ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt": "hi", "max_new_tokens": 301}, "max_new_tokens"),
        ({"prompt": "hi", "max_length": True}, "max_length"),
        ({"prompt": "hi", "seed": -1}, "seed"),
        ({"prompt": "hi", "seed": 10**30}, "seed"),
        ({"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
        ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "hi", "stop": [""]}, "stop"),
        ({"prompt": "hi", "unknown": 1}, "unknown"),
    ],
)
def test_bad_parameters_get_422_naming_the_parameter(http: httpx.Client, body: dict[str, Any], param: str) -> None:
    assert_error(http.post("/generate", json=body), 422, param)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"null", b'"text"', b"\xff\xfe"])
def test_malformed_bodies_get_422(http: httpx.Client, raw: bytes) -> None:
    assert_error(http.post("/generate", content=raw, headers={"content-type": "application/json"}), 422)


def test_prompt_over_token_limit_names_both_numbers(http: httpx.Client) -> None:
    error = assert_error(http.post("/generate", json={"prompt": "fox " * 400}), 422, "prompt")
    assert "200" in error["message"]
    assert any(word.isdigit() and int(word) > 200 for word in error["message"].split())


def test_body_over_size_cap_gets_413(http: httpx.Client) -> None:
    assert_error(http.post("/generate", json={"prompt": "x" * 30_000}), 413)


def test_unicode_and_control_characters_are_answered(http: httpx.Client) -> None:
    for prompt in ["héllo wörld 🙂 你好", "\x00\x07\x1b[31m", "\u202e\ufeff", "\ud7ff"]:
        response = http.post("/generate", json={"prompt": prompt, "max_new_tokens": 4})
        assert response.status_code in (200, 422), response.text
        if response.status_code == 200:
            assert isinstance(response.json()["generated_text"], str)


def test_health_answers_while_the_model_generates(server: LiveServer, http: httpx.Client) -> None:
    engine: Engine = server.app.state.engine
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        long = pool.submit(
            http.post,
            "/generate",
            json={"prompt": "The", "max_new_tokens": 300, "temperature": 1.0, "top_k": 0, "seed": 1},
        )
        deadline = time.monotonic() + 10
        while engine.snapshot()["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert engine.snapshot()["running"] == 1
        assert http.get("/health").status_code == 200
        assert http.get("/model-info").status_code == 200
        assert not long.done() or engine.stats.decode_steps > 0
        assert long.result().status_code == 200


# ----- start-up states ----------------------------------------------------------------------------------------------


def test_health_is_503_while_loading_then_200(tiny_llama_dir: Path, make_settings: Any) -> None:
    settings: Settings = make_settings(tiny_llama_dir)
    release = threading.Event()

    def slow_loader(s: Settings) -> LoadedModel:
        release.wait(30)
        return load_model(s)

    app = create_app(settings, Engine(settings, loader=slow_loader))
    with TestClient(app) as client:
        loading = client.get("/health")
        assert loading.status_code == 503
        assert loading.json()["status"] == "loading"
        assert_error_body = client.post("/generate", json={"prompt": "hi"})
        assert assert_error_body.status_code == 503
        assert set(assert_error_body.json()["error"]) == ERROR_KEYS
        release.set()
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/health").json()["status"] == "ok"


def test_failed_load_keeps_serving_health_with_the_reason(make_settings: Any, tmp_path: Path) -> None:
    settings: Settings = make_settings("no-such-org/no-such-model")
    app = create_app(settings)
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while client.get("/health").json()["status"] in ("starting", "loading") and time.monotonic() < deadline:
            time.sleep(0.05)
        response = client.get("/health")
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "failed"
        assert body["model_id"] == "no-such-org/no-such-model"
        assert "failed to load" in body["reason"]
        assert "no-such-org/no-such-model" in assert_error(client.get("/model-info"), 503)["message"]


def test_loader_error_type_is_model_not_found(make_settings: Any) -> None:
    with pytest.raises(ModelNotFoundError):
        load_model(make_settings("no-such-org/no-such-model"))


# ----- Gradio named endpoints ---------------------------------------------------------------------------------------


def test_api_info_lists_exactly_the_public_endpoints(http: httpx.Client) -> None:
    info = http.get("/gradio_api/info").json()
    assert set(info["named_endpoints"]) == {"/generate", "/chat"}
    names = [parameter["parameter_name"] for parameter in info["named_endpoints"]["/generate"]["parameters"]]
    assert names == ["prompt", "max_length", "temperature", "top_p", "top_k"]


def test_gradio_generate_matches_rest_greedy(gradio: Client, http: httpx.Client) -> None:
    via_gradio = gradio.predict("The quick brown fox", 15, 0.0, 0.95, 50, api_name="/generate")
    via_rest = http.post("/generate", json={"prompt": "The quick brown fox", "max_new_tokens": 15, "temperature": 0})
    assert via_gradio == via_rest.json()["generated_text"]


def test_gradio_chat_streams_partial_replies(gradio: Client) -> None:
    job = gradio.submit("Tell me a story.", [], "", 1.0, 1.0, 0, 40, api_name="/chat")
    partials = list(job)
    final = job.result()
    assert len(partials) >= 2
    assert all(final.startswith(partial) for partial in partials)
    assert len(final) > len(partials[0])


def test_gradio_chat_uses_history_and_system_prompt(gradio: Client, server: LiveServer) -> None:
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"}]
    with_history = gradio.predict("And then?", history, "Be brief.", 0.0, 1.0, 0, 12, api_name="/chat")
    without = gradio.predict("And then?", [], "", 0.0, 1.0, 0, 12, api_name="/chat")
    assert isinstance(with_history, str)
    assert with_history != without


def test_gradio_rejects_out_of_range_values_clearly(gradio: Client) -> None:
    with pytest.raises(ValidationError, match=r"temperature.*between 0 and 2"):
        gradio.predict("hi", 12, 9.0, 0.95, 50, api_name="/generate")


def test_gradio_chat_reports_an_over_long_prompt(gradio: Client) -> None:
    with pytest.raises(Exception, match="limit of 200 tokens"):
        gradio.predict("fox " * 400, [], "", 0.0, 1.0, 0, 8, api_name="/chat")


def test_concurrent_gradio_requests_are_batched(
    gradio: Client, server: LiveServer, submissions: list[Submission]
) -> None:
    engine: Engine = server.app.state.engine
    sizes_before = engine.stats.batch_sizes_seen.copy()
    prompts = [f"Request {i} about the quick brown fox" for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(gradio.predict, p, 200, 1.0, 1.0, 0, api_name="/generate") for p in prompts]
        results = [future.result() for future in futures]
    assert all(isinstance(result, str) for result in results)
    assert [s.route for s in submissions] == ["gradio:/generate"] * len(prompts)
    # At most GENERATE_CONCURRENCY calls of /generate run at once: more rows than that in one decode step means
    # Gradio's queue handed some call a batch of several requests.
    sizes = engine.stats.batch_sizes_seen - sizes_before
    assert max(sizes) > GENERATE_CONCURRENCY, sizes


# ----- the playground's own events, spoken as the page speaks them --------------------------------------------------


def page_event(http: httpx.Client, name: str) -> tuple[int, list[str]]:
    """The fn_index of the playground's event `name` and its inputs' elem_ids, in the order the page sends them."""
    config = http.get("/config").json()
    elem_ids = {component["id"]: component.get("props", {}).get("elem_id") for component in config["components"]}
    event = next(dependency for dependency in config["dependencies"] if dependency.get("api_name") == name)
    return event["id"], [elem_ids[input_id] for input_id in event["inputs"]]


def run_page_event(http: httpx.Client, name: str, values: dict[str, Any], session: str) -> list[Any]:
    """Run a queued event of the page with its inputs by elem_id; the outputs of its last message."""
    fn_index, inputs = page_event(http, name)
    body = {"data": [values[elem_id] for elem_id in inputs], "fn_index": fn_index, "session_hash": session}
    joined = http.post("/gradio_api/queue/join", json=body)
    assert joined.status_code == 200, joined.text
    with http.stream("GET", f"/gradio_api/queue/data?session_hash={session}") as response:
        for line in response.iter_lines():
            message = json.loads(line[6:]) if line.startswith("data: ") else {}
            if message.get("msg") == "process_completed":
                assert message["success"], message
                return list(message["output"]["data"])
    raise AssertionError("no process_completed message")


def test_the_playground_chat_takes_every_slider_by_its_knob(http: httpx.Client, submissions: list[Submission]) -> None:
    sliders = {
        "temperature": 0.0,
        "top_p": 0.5,
        "top_k": 7,
        "max_length": 5,
        "repetition_penalty": 1.2,
        "seed": 11,
        "stop_strings": "zz\\n",
        "json_schema": "",
    }
    history = [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]  # as the page's Chatbot sends it
    chatbot, stats, _, *_ = run_page_event(
        http, "respond", {"chatbot": history, "system_prompt": "", **sliders}, session="knobs"
    )
    assert chatbot[-1]["role"] == "assistant"
    assert "tokens" in stats
    params = submissions[-1].params
    assert (params.temperature, params.top_p, params.top_k, params.max_new_tokens) == (0.0, 0.5, 7, 5)
    assert (params.repetition_penalty, params.seed, params.stop) == (1.2, 11, ("zz\n",))
    assert submissions[-1].route == "gradio:playground"


def test_the_pages_quick_events_still_run_by_number_but_not_by_name(http: httpx.Client) -> None:
    fn_index, _ = page_event(http, "clear")
    by_number = http.post("/gradio_api/run/clear", json={"data": [], "fn_index": fn_index, "session_hash": "quick"})
    assert by_number.status_code == 200, by_number.text
    assert by_number.json()["data"][0] == []
    by_name = http.post("/gradio_api/call/clear", json={"data": []})
    assert by_name.status_code == 404, by_name.text


def test_the_client_test_script_passes_against_a_live_server(tiny_llama_dir: Path, make_settings: Any) -> None:
    """README's `python client_test.py --url ...` must keep passing as the API evolves (it once expected a 404 that
    the any-model-name default removed). A server with the default body limit, as the README's is."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    with serve(make_settings(tiny_llama_dir, max_input_tokens=200)) as live:
        result = subprocess.run(
            [sys.executable, str(root / "client_test.py"), "--url", live.url],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " 0 failed" in result.stdout
