"""The HTTP edge as an attacker sees it, over real HTTP against a live server: CORS, paths and methods nobody serves,
uploads, key guessing, and what the always-open routes give away."""

from __future__ import annotations

import concurrent.futures
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gradio_client import Client
from starlette.routing import Mount

from tests.live_server import LiveServer, serve

ERROR_KEYS = {"message", "type", "param", "code"}
# Any real deployment (a Space, a VM behind a domain): Gradio's own CORS layer trusted every Origin for such a Host.
PUBLIC_HOST = "llm.example.org"
FOREIGN_ORIGINS = ["https://evil.example", "null", "http://localhost:3000"]
LISTED_ORIGIN = "https://app.example.com"


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, make_settings: Any) -> Iterator[LiveServer]:
    with serve(make_settings(tiny_llama_dir, max_new_tokens=16)) as live:
        yield live


@pytest.fixture(scope="module")
def cors_server(tiny_llama_dir: Path, make_settings: Any) -> Iterator[LiveServer]:
    with serve(make_settings(tiny_llama_dir, max_new_tokens=16, cors_origins=[LISTED_ORIGIN])) as live:
        yield live


def assert_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS
    assert error["code"] == status
    return error


# ----- CORS ---------------------------------------------------------------------------------------------------------

# Gradio's routes (the session token among them), the REST and the OpenAI routes.
SIMPLE_REQUESTS = [
    ("GET", "/gradio_api/token", None),
    ("GET", "/config", None),
    ("GET", "/gradio_api/info", None),
    ("GET", "/health", None),
    ("GET", "/v1/models", None),
    ("POST", "/tokenize", {"prompt": "hello"}),
]
PREFLIGHTS = ["/v1/chat/completions", "/v1/completions", "/generate", "/tokenize", "/gradio_api/queue/join"]


def granted(response: httpx.Response) -> dict[str, str]:
    return {name: value for name, value in response.headers.items() if name.startswith("access-control-allow")}


@pytest.mark.parametrize("origin", FOREIGN_ORIGINS)
@pytest.mark.parametrize(("method", "path", "body"), SIMPLE_REQUESTS, ids=[p for _, p, _ in SIMPLE_REQUESTS])
def test_no_cors_grant_to_a_foreign_origin(http: httpx.Client, method: str, path: str, body: Any, origin: str) -> None:
    response = http.request(method, path, json=body, headers={"Host": PUBLIC_HOST, "Origin": origin})
    assert response.status_code == 200, response.text[:300]
    assert granted(response) == {}


@pytest.mark.parametrize("origin", FOREIGN_ORIGINS)
@pytest.mark.parametrize("path", PREFLIGHTS)
def test_preflights_from_a_foreign_origin_fail(http: httpx.Client, path: str, origin: str) -> None:
    headers = {
        "Host": PUBLIC_HOST,
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization",
    }
    response = http.options(path, headers=headers)
    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-allow-credentials" not in response.headers


def test_a_listed_origin_may_call_the_api_and_no_other(cors_server: LiveServer) -> None:
    with httpx.Client(base_url=cors_server.url, timeout=30, headers={"Host": PUBLIC_HOST}) as client:
        preflight = client.options(
            "/v1/chat/completions",
            headers={
                "Origin": LISTED_ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type, authorization",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == LISTED_ORIGIN
        listed = client.get("/v1/models", headers={"Origin": LISTED_ORIGIN})
        assert listed.headers["access-control-allow-origin"] == LISTED_ORIGIN
        assert "access-control-allow-credentials" not in listed.headers  # the API takes a Bearer key, not cookies
        for origin in FOREIGN_ORIGINS:
            foreign = client.get("/gradio_api/token", headers={"Origin": origin})
            assert granted(foreign) == {}, origin


# ----- paths and methods nobody serves ------------------------------------------------------------------------------

UNKNOWN_PATHS = [
    "/v1",
    "/v1/nope",
    "/v1/chat",
    "/v1/chat/completions/x",
    "/generate/x",
    "/health/nope",
    "/model-info/x",
    "/metrics/x",
    "/tokenize/",
]
WRONG_METHODS = [
    ("GET", "/generate", "POST"),
    ("PUT", "/tokenize", "POST"),
    ("GET", "/v1/chat/completions", "POST"),
    ("DELETE", "/v1/completions", "POST"),
    ("POST", "/v1/models", "GET"),
    ("POST", "/health", "GET, HEAD"),
    ("PATCH", "/health/ready", "GET, HEAD"),
    ("POST", "/model-info", "GET"),
    ("POST", "/metrics", "GET"),
]


@pytest.mark.parametrize("path", UNKNOWN_PATHS)
def test_unknown_api_paths_get_404_in_the_error_shape(http: httpx.Client, path: str) -> None:
    for method in ("GET", "POST"):
        assert path in assert_error(http.request(method, path), 404)["message"]


@pytest.mark.parametrize(("method", "path", "allow"), WRONG_METHODS)
def test_a_wrong_method_gets_405_with_allow(http: httpx.Client, method: str, path: str, allow: str) -> None:
    response = http.request(method, path)
    assert_error(response, 405)
    assert response.headers["allow"] == allow


@pytest.mark.parametrize("path", ["/health", "/health/ready", "/health/live"])
def test_probes_answer_head(http: httpx.Client, path: str) -> None:
    response = http.head(path)
    assert response.status_code == 200
    assert response.content == b""


def test_the_playground_still_owns_every_other_path(http: httpx.Client) -> None:
    assert http.get("/").status_code == 200
    assert http.get("/gradio_api/info").status_code == 200


# ----- the model list and what the open routes show ----------------------------------------------------------------


def test_a_model_can_be_retrieved_by_id(http: httpx.Client, server: LiveServer) -> None:
    model_id = server.app.state.settings.model_id
    listed = http.get("/v1/models").json()["data"]
    assert [card["id"] for card in listed] == [model_id]
    for name in (model_id, Path(model_id).name):
        card = http.get(f"/v1/models/{name}")
        assert card.status_code == 200, card.text
        assert card.json() == listed[0]
    assert assert_error(http.get("/v1/models/gpt-4"), 404)["param"] == "model"


def test_health_shows_no_server_paths(http: httpx.Client, server: LiveServer) -> None:
    folder = server.app.state.settings.model_id
    body = http.get("/health").json()
    assert body["model_id"] == Path(folder).name
    assert str(Path(folder).parent) not in http.get("/health").text
    assert str(Path(folder).parent) not in http.get("/health/ready").text


def test_a_model_that_failed_to_load_is_not_listed(make_settings: Any, tmp_path: Path) -> None:
    missing = tmp_path / "models" / "gone"
    missing.mkdir(parents=True)  # a folder without a model in it: loading fails with its path in the message
    with serve(make_settings(missing), settled=lambda health: health.json()["status"] == "failed") as live:
        url = live.url
        assert httpx.get(f"{url}/v1/models").json()["data"] == []
        assert_error(httpx.get(f"{url}/v1/models/gone"), 503)
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503
        assert health.json()["status"] == "failed"
        assert str(tmp_path) not in health.text


# ----- uploads ------------------------------------------------------------------------------------------------------


def gradio_app(server: LiveServer) -> Any:
    return next(route.app for route in server.app.routes if isinstance(route, Mount))


def files_under(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if path.is_file()} if folder.exists() else set()


def streamed(total_bytes: int, chunk: bytes = b"x" * 65536) -> Iterator[bytes]:
    """A body without Content-Length (chunked), as a client that streams an upload sends it."""
    for _ in range(total_bytes // len(chunk)):
        yield chunk


def multipart_head(boundary: str, filename: str) -> bytes:
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


@pytest.mark.parametrize(
    "path",
    ["/gradio_api/upload", "/gradio_api/upload/", "/gradio_api/process_recording", "/gradio_api/component_server"],
)
def test_uploads_are_refused_and_leave_no_file(http: httpx.Client, server: LiveServer, path: str) -> None:
    upload_dir = Path(gradio_app(server).uploaded_file_dir)
    before = files_under(upload_dir)
    small = http.post(path, files={"files": ("notes.txt", b"hello " * 100)}, data={"session_hash": "x"})
    assert "no file uploads" in assert_error(small, 403)["message"]
    boundary = "b0undary"
    big = http.post(
        path,
        content=iter([multipart_head(boundary, "big.bin"), *streamed(3_000_000)]),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert big.status_code in (403, 413)
    assert_error(big, big.status_code)
    assert files_under(upload_dir) == before


def test_a_body_over_the_limit_gets_413_in_the_error_shape_on_gradio_routes_too(http: httpx.Client) -> None:
    json_body = {"content-type": "application/json"}
    for path in ("/gradio_api/queue/join", "/generate", "/v1/completions"):
        assert_error(http.post(path, content=b"{" + b" " * 1_100_000 + b"}", headers=json_body), 413)
        chunked = http.post(path, content=streamed(2_000_000), headers=json_body)
        assert "MAX_BODY_BYTES" in assert_error(chunked, 413)["message"], path


def test_gradio_deletes_the_files_it_made_for_the_app_at_shutdown(tiny_llama_dir: Path, make_settings: Any) -> None:
    with serve(make_settings(tiny_llama_dir)) as live:
        blocks = gradio_app(live).get_blocks()
        cached = Path(gradio_app(live).uploaded_file_dir) / "edge-test" / "made-by-the-app.txt"
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text("a file Gradio made for this app, such as an upload or a component's output")
        blocks.upload_file_set.add(str(cached))  # as Gradio records what it wrote
    assert not cached.exists()


# ----- key guessing -------------------------------------------------------------------------------------------------

KEY = "s3cret-key-for-tests"
GUESSES = 30


@pytest.fixture
def keyed(tiny_llama_dir: Path, make_settings: Any) -> Iterator[LiveServer]:
    with serve(make_settings(tiny_llama_dir, max_new_tokens=16, api_key=KEY)) as live:
        # the real schedule (waits up to a minute) made quick, so the test's guesses are settled in seconds
        backoff = live.app.state.auth_backoff
        backoff.first_delay_s, backoff.max_wait_s = 0.2, 1.0
        yield live


def from_address(url: str, address: str, **options: Any) -> httpx.Client:
    """A client on another loopback address: to the server, another client machine."""
    return httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address=address), timeout=60, **options)


def guess_in_parallel(send: Any) -> Counter[int]:
    with concurrent.futures.ThreadPoolExecutor(GUESSES) as pool:
        responses = list(pool.map(send, range(GUESSES)))
    for response in responses:
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1
            assert "retry in" in assert_error(response, 429)["message"]
    return Counter(response.status_code for response in responses)


def test_wrong_bearer_keys_are_checked_one_at_a_time_after_a_growing_delay(keyed: LiveServer) -> None:
    with from_address(keyed.url, "127.0.0.1") as guesser:
        statuses = guess_in_parallel(
            lambda i: guesser.get("/v1/models", headers={"Authorization": f"Bearer guess-{i}"})
        )
    print(f"\nkey guessing, Bearer: {GUESSES} parallel guesses answered {dict(statuses)}")
    assert set(statuses) == {401, 429}
    assert statuses[401] <= 8  # of 30 guesses, only those whose turn came within the wait limit were checked
    assert statuses[429] >= GUESSES - 8
    with from_address(keyed.url, "127.0.0.2") as caller:  # another client with the right key is not held up
        assert caller.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert_error(caller.get("/v1/models"), 401)  # a missing key is no guess: plain 401


def test_wrong_playground_passwords_are_slowed_the_same_way(keyed: LiveServer) -> None:
    def login_form(password: str) -> dict[str, Any]:
        return {"username": (None, "me"), "password": (None, password)}  # multipart, as the login page sends it

    with from_address(keyed.url, "127.0.0.1") as guesser:
        statuses = guess_in_parallel(lambda i: guesser.post("/login", files=login_form(f"guess-{i}")))
    print(f"\nkey guessing, login: {GUESSES} parallel guesses answered {dict(statuses)}")
    assert set(statuses) == {400, 429}
    assert statuses[400] <= 8
    with from_address(keyed.url, "127.0.0.2") as user:
        login = user.post("/login", files=login_form(KEY))
        assert login.status_code == 200, login.text
    gradio = Client(keyed.url + "/", auth=("me", KEY), verbose=False)
    assert gradio.predict("Hello", 4, 0.0, 0.95, 50, api_name="/generate")


# ----- the playground's own events ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["generate", "chat"])
def test_public_events_cannot_skip_the_queue(http: httpx.Client, name: str) -> None:
    data = ["Hello", 4, 0.0, 0.95, 50] if name == "generate" else ["Hello", [], "", 0.0, 0.95, 50, 4]
    skipped = http.post(f"/gradio_api/run/{name}", json={"data": data})
    assert skipped.status_code == 404, skipped.text
    assert "join the queue" in skipped.text
    queued = http.post(f"/gradio_api/call/{name}", json={"data": data})
    assert queued.status_code == 200
    assert "event_id" in queued.json()


@pytest.mark.parametrize(
    "body",
    [
        {"data": ["Hello"], "fn_index": 10_000, "session_hash": "fresh-session"},  # no such event
        {"data": ["Hello"], "fn_index": -1, "session_hash": "fresh-session"},
        {"data": ["Hello"], "fn_index": 2**40, "session_hash": "fresh-session"},
    ],
)
def test_joining_the_queue_for_an_unknown_event_is_a_4xx_in_the_error_shape(http: httpx.Client, body: Any) -> None:
    response = http.post("/gradio_api/queue/join", json=body)
    error = assert_error(response, 422)
    assert error["param"] == "fn_index"
    assert "no event" in error["message"]


@pytest.mark.parametrize("name", ["no_such_endpoint", "respond", "model_info"])
def test_calling_an_unknown_or_private_endpoint_is_a_4xx(http: httpx.Client, name: str) -> None:
    response = http.post(f"/gradio_api/call/{name}", json={"data": ["Hello"]})
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert response.json()["error"]["code"] == response.status_code


@pytest.mark.parametrize(
    "path", ["/gradio_api/queue/data?session_hash=nobody-here", "/gradio_api/call/generate/no-such-event"]
)
def test_a_stream_for_an_unknown_session_or_event_is_a_404_in_the_error_shape(http: httpx.Client, path: str) -> None:
    error = assert_error(http.get(path), 404)
    assert "queue" in error["message"] or "event" in error["message"]


def test_a_stream_for_a_queued_event_still_streams(http: httpx.Client) -> None:
    joined = http.post("/gradio_api/call/generate", json={"data": ["Hello", 4, 0.0, 0.95, 50]})
    assert joined.status_code == 200, joined.text
    streamed = http.get(f"/gradio_api/call/generate/{joined.json()['event_id']}")
    assert streamed.status_code == 200
    assert "event: complete" in streamed.text
