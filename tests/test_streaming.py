"""Streaming end to end: SSE framing of POST /generate, stop strings and UTF-8 in streams, client disconnects, and
the Gradio /chat stream, against a live server on the tiny chat model (and the engine of both tiny models)."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gradio_client import Client

from inference.client import GenerationResult, TextChunk
from inference.detokenize import IncrementalDecoder, StopStringFilter
from inference.engine import Engine
from inference.params import SamplingParams
from inference.sequence import Sequence
from tests.live_server import LiveServer, serve

GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, make_settings: Any) -> Iterator[LiveServer]:
    # max_new_tokens up to 450 (the tiny llama's context is 512): long enough generations to cut short on purpose
    settings = make_settings(tiny_llama_dir, max_input_tokens=200, max_new_tokens=450)
    with serve(settings) as live:
        yield live


# ----- helpers --------------------------------------------------------------------------------------------------------


def iter_sse(response: httpx.Response) -> Iterator[str]:
    """The `data` of each server-sent event, as the SSE spec frames them (lines end at LF only, so a generated
    U+2028 or NEL inside the JSON, which `httpx.iter_lines` would split on, stays in its line)."""
    buffer = b""
    data: list[str] = []
    for chunk in response.iter_bytes():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.removesuffix(b"\r").decode("utf-8")
            if not line:
                if data:
                    yield "\n".join(data)
                    data = []
            elif line.startswith(":"):
                continue  # a comment (keep-alive ping)
            else:
                field, _, value = line.partition(":")
                assert field == "data", f"unexpected SSE line {line!r}"
                data.append(value.removeprefix(" "))
    assert buffer == b"", "the stream ended in the middle of a line"
    assert not data, "the last event was not ended by a blank line"


def stream_generate(http: httpx.Client, body: dict[str, Any]) -> tuple[list[dict[str, Any]], httpx.Response]:
    with http.stream("POST", "/generate", json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        events = [json.loads(data) for data in iter_sse(response)]
    return events, response


def joined_text(events: list[dict[str, Any]]) -> str:
    return "".join(event["text"] for event in events if event.get("type") == "text")


def check_stream_shape(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Text events, then exactly one done event last; returns the done event."""
    assert events, "no events"
    *texts, done = events
    assert all(event["type"] == "text" for event in texts), texts
    assert all(set(event) == {"type", "text", "completion_tokens"} for event in texts)
    assert all(event["text"] for event in texts), "empty text events"
    assert done["type"] == "done"
    assert {"id", "model", "generated_text", "finish_reason", "usage", "timings"} <= set(done)
    counts = [event["completion_tokens"] for event in texts]
    assert counts == sorted(counts), "completion_tokens went down"
    assert all(1 <= count <= done["usage"]["completion_tokens"] for count in counts)
    usage = done["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert joined_text(events) == done["generated_text"]
    return done


def ascii_stop_from(text: str, start: int = 10, size: int = 3) -> str:
    """A short all-letters piece from the middle of `text`, to use as a stop string."""
    for index in range(start, len(text) - size):
        piece = text[index : index + size]
        if all(c.isascii() and c.isalpha() for c in piece):
            return piece
    raise AssertionError(f"no ASCII word piece in {text!r}")


def full_length_seed(http: httpx.Client, body: dict[str, Any]) -> int:
    """A seed whose sampled generation runs all its tokens (no early end-of-sequence): only a cancel or a timeout
    can then end it early, however fast the machine."""
    for seed in range(1, 50):
        if http.post("/generate", json={**body, "seed": seed}).json()["finish_reason"] == "length":
            return seed
    raise AssertionError("no seed runs to full length")


# ----- POST /generate with "stream": true -----------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["The quick brown fox", "Once upon a time", "Hello"])
def test_stream_events_join_to_the_non_streaming_result(http: httpx.Client, prompt: str) -> None:
    body = {"prompt": prompt, "max_new_tokens": 40, **GREEDY}
    expected = http.post("/generate", json=body).json()
    events, response = stream_generate(http, body)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-request-id"]
    done = check_stream_shape(events)
    assert len(events) >= 3  # really streamed, not one blob
    assert done["generated_text"] == expected["generated_text"]
    assert done["finish_reason"] == expected["finish_reason"]
    assert done["usage"] == expected["usage"]
    assert done["id"] == response.headers["x-request-id"]
    assert done["timings"]["total_s"] >= done["timings"]["generation_s"] > 0


def test_stream_framing_is_data_lines_and_blank_lines(http: httpx.Client) -> None:
    with http.stream("POST", "/generate", json={"prompt": "Hello", "max_new_tokens": 8, "stream": True}) as response:
        raw = response.read()
    assert raw.endswith(b"\n\n")
    for block in raw.decode("utf-8").removesuffix("\n\n").split("\n\n"):
        lines = [line for line in block.split("\n") if not line.startswith(":")]
        assert len(lines) == 1, block
        assert lines[0].startswith("data: "), block
        json.loads(lines[0].removeprefix("data: "))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "max_new_tokens": 451}, "max_new_tokens"),
        ({"prompt": "hi", "stop": [""]}, "stop"),
        ({"prompt": "fox " * 400}, "prompt"),
    ],
)
def test_refusals_with_stream_are_json_422_before_any_stream(
    http: httpx.Client, body: dict[str, Any], param: str
) -> None:
    response = http.post("/generate", json={**body, "stream": True})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["param"] == param
    assert error["code"] == 422
    if param == "prompt":
        assert "200" in error["message"]  # the limit, and the prompt's own count
        assert any(word.isdigit() and int(word) > 200 for word in error["message"].split())


def test_stop_string_never_leaks_into_the_stream(http: httpx.Client) -> None:
    body = {"prompt": "The quick brown fox", "max_new_tokens": 60, **GREEDY}
    full = http.post("/generate", json=body).json()["generated_text"]
    stop = ascii_stop_from(full)
    cut = full.index(stop)
    plain = http.post("/generate", json={**body, "stop": stop}).json()
    assert plain["generated_text"] == full[:cut]
    assert plain["finish_reason"] == "stop"

    events, _ = stream_generate(http, {**body, "stop": [stop]})
    done = check_stream_shape(events)
    assert done["finish_reason"] == "stop"
    assert joined_text(events) == plain["generated_text"]
    assert stop not in joined_text(events)
    # no event ever showed text that a later stop cut away: every running total is a prefix of the final text
    total = ""
    for event in events[:-1]:
        total += event["text"]
        assert done["generated_text"].startswith(total)


def test_stop_held_back_tail_is_released_when_no_stop_follows(http: httpx.Client) -> None:
    """A stop string that only ever appears partly: the held-back start of it must come out at the end."""
    body = {"prompt": "Once upon a time", "max_new_tokens": 40, **GREEDY}
    full = http.post("/generate", json=body).json()["generated_text"]
    piece = ascii_stop_from(full, start=0, size=2)
    stop = piece + "\x00\x00never"  # its start appears in the text, the whole never does
    events, _ = stream_generate(http, {**body, "stop": stop})
    done = check_stream_shape(events)
    assert done["generated_text"] == full
    assert done["finish_reason"] in ("length", "eos")


def test_stream_of_a_sampled_request_matches_its_seeded_repeat(http: httpx.Client) -> None:
    body = {"prompt": "Paris is", "max_new_tokens": 50, "temperature": 1.2, "top_k": 0, "seed": 11}
    first = check_stream_shape(stream_generate(http, body)[0])
    second = http.post("/generate", json=body).json()
    assert first["generated_text"] == second["generated_text"]


# ----- client disconnects ---------------------------------------------------------------------------------------------


def test_client_disconnect_cancels_the_request_in_the_engine(server: LiveServer, http: httpx.Client) -> None:
    engine: Engine = server.app.state.engine
    base = {"prompt": "The", "max_new_tokens": 450, "temperature": 1.0, "top_k": 0}
    seed = full_length_seed(http, base)
    deadline = time.monotonic() + 10
    while (engine.snapshot()["running"] or engine.snapshot()["waiting"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    cancelled, finished = engine.stats.requests_cancelled, engine.stats.requests_finished

    received: list[dict[str, Any]] = []
    with http.stream("POST", "/generate", json={**base, "seed": seed, "stream": True}) as response:
        assert response.status_code == 200
        for data in iter_sse(response):
            received.append(json.loads(data))
            if len(received) == 3:
                break
    # leaving the block closed the connection after 3 events
    assert all(event["type"] == "text" for event in received)

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        engine.snapshot()["running"] or engine.stats.requests_cancelled == cancelled
    ):
        time.sleep(0.01)
    assert engine.stats.requests_cancelled == cancelled + 1
    assert engine.stats.requests_finished == finished  # it did not run on to its 450 tokens
    assert engine.snapshot()["running"] == engine.snapshot()["waiting"] == 0
    # and the server is fine afterwards
    assert http.post("/generate", json={"prompt": "Hi", "max_new_tokens": 3}).status_code == 200


def test_an_error_after_the_stream_began_is_the_last_event(
    server: LiveServer, http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The status is already 200 once events flow: a later failure (here REQUEST_TIMEOUT_S) is an error event."""
    base = {"prompt": "The", "max_new_tokens": 450, "temperature": 1.0, "top_k": 0}
    seed = full_length_seed(http, base)
    monkeypatch.setattr(server.app.state.engine.settings, "request_timeout_s", 0.05)
    events, response = stream_generate(http, {**base, "seed": seed})
    assert response.headers["content-type"].startswith("text/event-stream")
    *texts, last = events
    assert all(event["type"] == "text" for event in texts)
    assert set(last) == {"error"}
    assert last["error"]["code"] == 504
    assert last["error"]["type"] == "timeout_error"
    assert "0.05 seconds" in last["error"]["message"]


# ----- UTF-8 across token boundaries --------------------------------------------------------------------------------

UNICODE_TEXTS = [
    "hello world",
    "Café crème brûlée, naïve façade",
    "emoji 😀👍🏽 family 👨‍👩‍👧 end",
    "中文 日本語 한국어",
    "mixed é😀中 a b  c\nnew line",
]


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_incremental_decoder_with_the_engines_tokenizer(tiny_engine: Engine, text: str) -> None:
    assert tiny_engine.loaded is not None
    tokenizer = tiny_engine.loaded.tokenizer
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not text.isascii():
        # the tiny byte-level BPE really splits these characters over several tokens
        assert any("\ufffd" in tokenizer.decode([token]) for token in ids)
    for prompt in ["", "A prompt that ends in a word", "Ends with a space "]:
        prompt_ids = tiny_engine.prepare_completion(prompt).token_ids if prompt else []
        decoder = IncrementalDecoder(tokenizer, prompt_ids)
        chunks = [decoder.push(token) for token in ids]
        assert "".join(chunks) == tokenizer.decode(ids) == text
        assert not any("\ufffd" in chunk for chunk in chunks)
    if text == "hello world":
        assert "".join(chunks).split(" ") == ["hello", "world"]


def record_tokens(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[list[int], list[int]]]:
    """Wrap the engine's per-token bookkeeping to keep (prompt ids, generated ids) of each request by its id."""
    seen: dict[str, tuple[list[int], list[int]]] = {}
    accept = engine._accept_token
    eos = engine._eos_ids

    def recording(sequence: Sequence, token: int, logprob: float | None, now: float) -> None:
        _, generated = seen.setdefault(sequence.request_id, (list(sequence.prompt_ids), []))
        if token not in eos:
            generated.append(token)
        accept(sequence, token, logprob, now)

    monkeypatch.setattr(engine, "_accept_token", recording)
    return seen


def check_stream_against_ids(engine: Engine, chunks: list[str], prompt_ids: list[int], ids: list[int]) -> None:
    """The streamed text is the full decode of the generated ids (less a trailing incomplete character that never
    got completed), and no chunk ends in the middle of a character."""
    assert engine.loaded is not None
    tokenizer = engine.loaded.tokenizer

    def decode(tokens: list[int]) -> str:
        return str(tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    expected = decode(prompt_ids + ids)[len(decode(prompt_ids)) :]
    streamed = "".join(chunks)
    assert expected.startswith(streamed), (streamed, expected)
    assert set(expected[len(streamed) :]) <= {"\ufffd"}
    assert not any(chunk.endswith("\ufffd") for chunk in chunks)
    # a U+FFFD in the stream stands only where the full decode has one (a truly invalid byte), never for a split one
    assert streamed.count("\ufffd") == expected[: len(streamed)].count("\ufffd")


def test_streamed_rest_text_has_no_split_characters(
    server: LiveServer, http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine: Engine = server.app.state.engine
    seen = record_tokens(engine, monkeypatch)
    bodies = [
        {"prompt": "The quick brown fox", "max_new_tokens": 60, **GREEDY},
        {"prompt": "héllo wörld 🙂 你好", "max_new_tokens": 60, **GREEDY},
        # random sampling over the whole vocabulary picks many lone UTF-8 bytes
        *({"prompt": "Hello", "max_new_tokens": 80, "temperature": 1.5, "top_k": 0, "seed": s} for s in range(4)),
    ]
    for body in bodies:
        events, response = stream_generate(http, body)
        done = check_stream_shape(events)
        prompt_ids, ids = seen[response.headers["x-request-id"]]
        assert len(ids) == done["usage"]["completion_tokens"] - (done["finish_reason"] == "eos")
        check_stream_against_ids(engine, [e["text"] for e in events[:-1]], prompt_ids, ids)


def test_engine_stream_has_no_split_characters(tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both tokenizer families, through the engine's own stream."""
    seen = record_tokens(tiny_engine, monkeypatch)

    async def run(seed: int) -> tuple[str, list[str], GenerationResult]:
        prompt = tiny_engine.prepare_completion("Tell me: ")
        params = SamplingParams(max_new_tokens=60, temperature=1.5, top_k=0, seed=seed)
        chunks: list[str] = []
        result = None
        request_id = f"utf8-{seed}"
        async for event in tiny_engine.stream(prompt, params, request_id=request_id):
            if isinstance(event, TextChunk):
                chunks.append(event.text)
            else:
                result = event
        assert result is not None
        return request_id, chunks, result

    total_replacements = 0
    for seed in range(5):
        request_id, chunks, result = asyncio.run(run(seed))
        assert "".join(chunks) == result.text
        prompt_ids, ids = seen[request_id]
        check_stream_against_ids(tiny_engine, chunks, prompt_ids, ids)
        total_replacements += result.text.count("\ufffd")
    assert total_replacements > 0  # the lone bytes were really sampled (the check above had something to check)


# ----- StopStringFilter, fed a little at a time -----------------------------------------------------------------------


def feed(stops: tuple[str, ...], pieces: list[str]) -> tuple[StopStringFilter, list[str]]:
    """Feed `pieces` as the engine does (flush at the end unless stopped), checking the invariants at each step."""
    stop_filter = StopStringFilter(stops)
    emitted: list[str] = []
    for piece in pieces:
        emitted.append(stop_filter.push(piece))
        shown = "".join(emitted)
        assert not any(stop in shown for stop in stops), (stops, pieces, shown)
        assert stop_filter.text.startswith(shown)
        if stop_filter.stopped:
            break
    if not stop_filter.stopped:
        emitted.append(stop_filter.flush())
    assert "".join(emitted) == stop_filter.text
    return stop_filter, emitted


def expected_cut(stops: tuple[str, ...], pieces: list[str]) -> tuple[str, bool]:
    """What the text should be: cut before a stop at the first piece after which the text holds one."""
    text = ""
    for piece in pieces:
        text += piece
        found = [text.find(stop) for stop in stops if stop in text]
        if found:
            return text[: min(found)], True
    return text, False


def test_stop_filter_one_character_at_a_time() -> None:
    text = "Hello there, General Kenobi. You are a bold one."
    stop_filter, emitted = feed(("General",), list(text))
    assert stop_filter.stopped
    assert stop_filter.text == "Hello there, "
    # the "Gen..." that might have become the stop was held back, never shown
    assert all("G" not in piece for piece in emitted)
    # prefixes of the stop that don't complete it are released once they can't be the stop any more
    stop_filter, emitted = feed(("Generals",), list(text))
    assert not stop_filter.stopped
    assert "".join(emitted) == text
    assert "".join(emitted[: text.index("General") + len("General")]) == text[: text.index("General")]


def test_stop_filter_random_texts_and_chunkings() -> None:
    rng = random.Random(5)
    alphabet = "ab c\né😀"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stops = tuple(dict.fromkeys("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(3)))[
            : rng.randint(1, 3)
        ]
        pieces, rest = [], text
        while rest:
            size = rng.randint(1, 4)
            pieces.append(rest[:size])
            rest = rest[size:]
        stop_filter, _ = feed(stops, pieces)
        assert (stop_filter.text, stop_filter.stopped) == expected_cut(stops, pieces), (stops, pieces)


# ----- the Gradio /chat endpoint --------------------------------------------------------------------------------------


def test_gradio_chat_stream_grows_to_the_openai_reply(server: LiveServer, http: httpx.Client) -> None:
    gradio = Client(server.url + "/", verbose=False)
    job = gradio.submit("Tell me a story.", [], "", 0.0, 1.0, 0, 40, api_name="/chat")
    partials = list(job)
    final = job.result()
    assert len(partials) >= 2
    assert all(final.startswith(partial) for partial in partials)
    assert [len(p) for p in partials] == sorted(len(p) for p in partials)
    model = http.get("/v1/models").json()["data"][0]["id"]
    reply = http.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": "Tell me a story."}],
            "temperature": 0,
            "max_tokens": 40,
        },
    ).json()
    assert final == reply["choices"][0]["message"]["content"]


def test_concurrent_streams_do_not_mix(http: httpx.Client) -> None:
    bodies = [{"prompt": f"Story number {i}:", "max_new_tokens": 30, **GREEDY} for i in range(4)]
    expected = [http.post("/generate", json=body).json()["generated_text"] for body in bodies]
    results: list[str | None] = [None] * len(bodies)

    def worker(index: int) -> None:
        events, _ = stream_generate(http, bodies[index])
        results[index] = check_stream_shape(events)["generated_text"]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == expected
