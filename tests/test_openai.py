"""The OpenAI-compatible routes, driven by the official `openai` client against a live server on the tiny chat model."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from inference.engine import Engine
from inference.sequence import Sequence
from tests.live_server import LiveServer, serve

MESSAGES: list[Any] = [{"role": "user", "content": "Tell me a story."}]
GREEDY: dict[str, Any] = {"temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, make_settings: Any) -> Iterator[LiveServer]:
    settings = make_settings(tiny_llama_dir, max_input_tokens=200, max_new_tokens=300, max_n=3)
    with serve(settings) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def raw_sse(http: httpx.Client, path: str, body: dict[str, Any]) -> list[str]:
    """The `data` of each event of a streaming response, framed by hand (lines end at LF only)."""
    with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode("utf-8")
    assert raw.endswith("\n\n")
    events = []
    for block in raw.removesuffix("\n\n").split("\n\n"):
        lines = [line for line in block.split("\n") if not line.startswith(":")]
        assert len(lines) == 1, block
        assert lines[0].startswith("data: "), block
        events.append(lines[0].removeprefix("data: "))
    return events


# ----- /v1/models -----------------------------------------------------------------------------------------------------


def test_models_lists_exactly_the_served_model(client: openai.OpenAI, tiny_llama_dir: Path) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [str(tiny_llama_dir)]
    assert models[0].object == "model"
    assert models[0].owned_by
    assert models[0].created > 0


# ----- chat completions -----------------------------------------------------------------------------------------------


def test_chat_completion(client: openai.OpenAI, model: str) -> None:
    completion = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=20, **GREEDY)
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == model
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert 1 <= usage.completion_tokens <= 20
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("limit", ["max_tokens", "max_completion_tokens"])
def test_chat_max_tokens_is_respected(client: openai.OpenAI, model: str, limit: str) -> None:
    completion = client.chat.completions.create(model=model, messages=MESSAGES, **{limit: 7}, **GREEDY)
    assert completion.usage is not None
    assert completion.usage.completion_tokens <= 7
    if completion.choices[0].finish_reason == "length":
        assert completion.usage.completion_tokens == 7


def test_max_completion_tokens_wins_over_max_tokens(client: openai.OpenAI, model: str) -> None:
    completion = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=30, max_completion_tokens=5, **GREEDY
    )
    assert completion.usage is not None
    assert completion.usage.completion_tokens <= 5


def test_the_short_model_name_is_accepted(client: openai.OpenAI, model: str) -> None:
    short = model.rstrip("/").split("/")[-1]
    completion = client.chat.completions.create(model=short, messages=MESSAGES, max_tokens=3)
    assert completion.choices[0].message.content is not None


def test_chat_stream_joins_to_the_non_streaming_reply(client: openai.OpenAI, model: str) -> None:
    expected = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=40, **GREEDY)
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=40, stream=True, **GREEDY))
    assert len(chunks) >= 3
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert content == expected.choices[0].message.content
    # the finish reason comes once, in the last chunk, and only there
    assert chunks[-1].choices[0].finish_reason == expected.choices[0].finish_reason
    assert all(chunk.choices[0].finish_reason is None for chunk in chunks[:-1])
    assert all(chunk.usage is None for chunk in chunks)


def test_chat_stream_with_usage_ends_with_a_usage_chunk(client: openai.OpenAI, model: str) -> None:
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens <= 12
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert all(chunk.usage is None for chunk in chunks[:-1])
    plain = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, **GREEDY)
    assert last.usage == plain.usage


def test_chat_stream_raw_framing_ends_with_done(http: httpx.Client, model: str) -> None:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 5, "stream": True, **GREEDY}
    events = raw_sse(http, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    assert events.count("[DONE]") == 1
    for data in events[:-1]:
        chunk = json.loads(data)
        assert chunk["object"] == "chat.completion.chunk"
        assert len(chunk["choices"]) == 1


def test_chat_stream_with_several_choices(client: openai.OpenAI, model: str) -> None:
    kwargs: dict[str, Any] = {"model": model, "messages": MESSAGES, "max_tokens": 15, "n": 2, "seed": 3}
    expected = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    texts = {0: "", 1: ""}
    finished: dict[int, str | None] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            assert choice.index not in finished, "text after the choice's finish reason"
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason is not None:
                finished[choice.index] = choice.finish_reason
    assert sorted(finished) == [0, 1]
    assert [texts[0], texts[1]] == [choice.message.content for choice in expected.choices]


# ----- completions ----------------------------------------------------------------------------------------------------


def test_completion(client: openai.OpenAI, model: str) -> None:
    completion = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=10, **GREEDY)
    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-")
    assert len(completion.choices) == 1
    assert isinstance(completion.choices[0].text, str)
    assert completion.choices[0].finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage is not None
    assert 1 <= usage.completion_tokens <= 10
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_completion_default_max_tokens_is_16(client: openai.OpenAI, model: str) -> None:
    completion = client.completions.create(model=model, prompt="Once upon a time", **GREEDY)
    assert completion.usage is not None
    assert completion.usage.completion_tokens <= 16


def test_completion_stream_joins_to_the_non_streaming_text(client: openai.OpenAI, model: str) -> None:
    kwargs: dict[str, Any] = {"model": model, "prompt": "Once upon a time", "max_tokens": 40, **GREEDY}
    expected = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert len(chunks) >= 3
    assert "".join(chunk.choices[0].text for chunk in chunks) == expected.choices[0].text
    assert chunks[-1].choices[0].finish_reason == expected.choices[0].finish_reason
    assert all(chunk.choices[0].finish_reason is None for chunk in chunks[:-1])


def test_completion_stream_raw_framing_and_usage(http: httpx.Client, model: str) -> None:
    body = {
        "model": model,
        "prompt": "Hello",
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = raw_sse(http, "/v1/completions", body)
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])
    assert final["choices"] == []
    assert final["usage"]["completion_tokens"] <= 6
    assert all(json.loads(data)["object"] == "text_completion" for data in events[:-1])


def test_stream_chunks_carry_the_nulls_openai_sends(http: httpx.Client, model: str) -> None:
    """As OpenAI streams: `finish_reason` and `logprobs` null until set, `usage` null on every chunk but the last when
    usage is asked for and absent when not; a delta holds only what it adds."""
    body = {"model": model, "messages": MESSAGES, "max_tokens": 5, "stream": True, **GREEDY}
    plain = [json.loads(data) for data in raw_sse(http, "/v1/chat/completions", body)[:-1]]
    assert all("usage" not in chunk for chunk in plain)
    assert plain[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    for chunk in plain[1:-1]:
        choice = chunk["choices"][0]
        assert choice["finish_reason"] is None
        assert choice["logprobs"] is None
        assert set(choice["delta"]) == {"content"}
    assert plain[-1]["choices"][0]["delta"] == {}
    body["stream_options"] = {"include_usage": True}
    with_usage = [json.loads(data) for data in raw_sse(http, "/v1/chat/completions", body)[:-1]]
    assert all(chunk["usage"] is None for chunk in with_usage[:-1])
    assert with_usage[-1]["choices"] == []
    assert 1 <= with_usage[-1]["usage"]["completion_tokens"] <= 5


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_continuous_usage_stats_count_tokens_in_every_chunk(http: httpx.Client, model: str, path: str) -> None:
    body: dict[str, Any] = {"model": model, "max_tokens": 6, "stream": True, "n": 2, **GREEDY}
    body |= {"messages": MESSAGES} if path.endswith("chat/completions") else {"prompt": "Hello"}
    body["stream_options"] = {"continuous_usage_stats": True}
    chunks = [json.loads(data) for data in raw_sse(http, path, body)[:-1]]
    counts = [chunk["usage"]["completion_tokens"] for chunk in chunks]
    assert counts == sorted(counts)
    assert counts[-1] == 12  # both choices ran to max_tokens (the tiny model's eos is rare)
    for chunk in chunks:
        usage = chunk["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def greedy_with_logprobs(folder: str, ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """transformers' own greedy continuation of `ids`, and its log-probabilities at every position of prompt and
    continuation (full forward passes, no cache)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = list(ids)
    with torch.inference_mode():
        for _ in range(steps):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
        return tokens, model(torch.tensor([tokens])).logits[0].float().log_softmax(-1)


def test_echo_and_logprobs_of_token_id_prompts_match_a_full_forward_pass(
    client: openai.OpenAI, model: str, server: LiveServer
) -> None:
    """What lm-evaluation-harness sends to score answers: token-id prompts, echo, logprobs, greedy; alone and two in
    one request (batched), each number within 1e-4 of transformers' forward pass over prompt and answer."""
    engine: Engine = server.app.state.engine
    prompts = [[5, 17, 42, 99, 7, 3], [8, 9, 10, 11]]
    arguments: dict[str, Any] = {"model": model, "max_tokens": 3, "echo": True, "logprobs": 2, **GREEDY}
    alone = [client.completions.create(prompt=ids, **arguments).choices[0] for ids in prompts]
    together = client.completions.create(prompt=prompts, **arguments).choices
    for ids, single, batched in zip(prompts, alone, together, strict=True):
        tokens, reference = greedy_with_logprobs(engine.settings.model_id, ids, 3)
        logprobs = single.logprobs
        assert logprobs is not None
        assert logprobs.tokens == engine.token_texts(tokens)
        assert single.text.startswith(engine.decode(ids))
        assert logprobs.token_logprobs[0] is None
        assert logprobs.top_logprobs[0] is None
        for position in range(1, len(tokens)):
            expected = reference[position - 1]
            assert abs(logprobs.token_logprobs[position] - float(expected[tokens[position]])) < 1e-4, position
            top = logprobs.top_logprobs[position]
            assert top is not None
            assert 1 <= len(top) <= 2
            assert abs(max(top.values()) - float(expected.max())) < 1e-4, position
        assert logprobs.text_offset[0] == 0
        assert logprobs.text_offset == sorted(logprobs.text_offset)
        assert batched.logprobs is not None
        assert batched.logprobs.tokens == logprobs.tokens
        for a, b in zip(logprobs.token_logprobs[1:], batched.logprobs.token_logprobs[1:], strict=True):
            assert abs(a - b) < 1e-4


def test_chat_logprobs_match_a_full_forward_pass(client: openai.OpenAI, model: str, server: LiveServer) -> None:
    engine: Engine = server.app.state.engine
    reply = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=4, logprobs=True, top_logprobs=3, **GREEDY
    )
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None
    prompt = engine.prepare_chat(MESSAGES).token_ids
    tokens, reference = greedy_with_logprobs(engine.settings.model_id, prompt, 4)
    assert [entry.token for entry in content] == engine.token_texts(tokens[len(prompt) :])
    for offset, entry in enumerate(content):
        expected = reference[len(prompt) + offset - 1]
        assert abs(entry.logprob - float(expected[tokens[len(prompt) + offset]])) < 1e-4
        assert len(entry.top_logprobs) == 3
        assert abs(entry.top_logprobs[0].logprob - float(expected.max())) < 1e-4
        assert bytes(entry.bytes or []).decode("utf-8", errors="replace") == entry.token


def test_streamed_logprobs_add_up_to_the_unstreamed_ones(client: openai.OpenAI, model: str) -> None:
    arguments: dict[str, Any] = {"model": model, "max_tokens": 8, "logprobs": 2, **GREEDY}
    whole = client.completions.create(prompt="Hello there", **arguments).choices[0].logprobs
    assert whole is not None
    tokens: list[str] = []
    values: list[float | None] = []
    offsets: list[int] = []
    for chunk in client.completions.create(prompt="Hello there", stream=True, **arguments):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            tokens += chunk.choices[0].logprobs.tokens or []
            values += chunk.choices[0].logprobs.token_logprobs or []
            offsets += chunk.choices[0].logprobs.text_offset or []
    assert tokens == whole.tokens
    assert values == pytest.approx(whole.token_logprobs, abs=1e-5)
    assert offsets == whole.text_offset
    chat = {"model": model, "messages": MESSAGES, "max_tokens": 8, "logprobs": True, "top_logprobs": 2, **GREEDY}
    reply = client.chat.completions.create(**chat).choices[0].logprobs
    assert reply is not None
    assert reply.content is not None
    streamed = [
        entry
        for chunk in client.chat.completions.create(stream=True, **chat)
        if chunk.choices and chunk.choices[0].logprobs is not None
        for entry in chunk.choices[0].logprobs.content or []
    ]
    assert [entry.token for entry in streamed] == [entry.token for entry in reply.content]
    assert [entry.logprob for entry in streamed] == pytest.approx([entry.logprob for entry in reply.content], abs=1e-5)


def eager_to_end(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's model always wants to end: its end-of-sequence token is the likeliest at every step."""
    assert engine.loaded is not None
    decoder, eos = engine.loaded.decoder, engine.loaded.tokenizer.eos_token_id
    original_prefill, original_decode = decoder.prefill, decoder.decode

    def ending(logits: Any) -> Any:
        with torch.inference_mode():  # the decoder's logits are inference tensors
            logits[..., eos] = logits.max() + 10
        return logits

    def prefill(*args: Any, **kwargs: Any) -> Any:
        cache, logits = original_prefill(*args, **kwargs)
        return cache, ending(logits)

    monkeypatch.setattr(decoder, "prefill", prefill)
    monkeypatch.setattr(decoder, "decode", lambda *args, **kwargs: ending(original_decode(*args, **kwargs)))


def test_ignore_eos_and_min_tokens_pin_the_length(
    client: openai.OpenAI, model: str, server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    eager_to_end(server.app.state.engine, monkeypatch)

    def complete(**extra: Any) -> Any:
        return client.completions.create(model=model, prompt="Once", max_tokens=12, extra_body=extra, **GREEDY)

    ends = complete()
    assert (ends.usage.completion_tokens, ends.choices[0].finish_reason) == (1, "stop")
    pinned = complete(ignore_eos=True)
    assert (pinned.usage.completion_tokens, pinned.choices[0].finish_reason) == (12, "length")
    at_least = complete(min_tokens=5)  # five tokens, then the end-of-sequence token it wanted all along
    assert (at_least.usage.completion_tokens, at_least.choices[0].finish_reason) == (6, "stop")
    assert at_least.choices[0].text
    chat = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=7, extra_body={"ignore_eos": True}, **GREEDY
    )
    assert chat.usage.completion_tokens == 7
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        complete(min_tokens=13)
    assert refused.value.body["param"] == "min_tokens"  # type: ignore[index]


def test_completion_of_several_prompts_and_choices(client: openai.OpenAI, model: str) -> None:
    prompts = ["The quick brown fox", "Paris is the capital of"]
    completion = client.completions.create(model=model, prompt=prompts, n=2, max_tokens=8, seed=5)
    assert [choice.index for choice in completion.choices] == [0, 1, 2, 3]
    assert all(isinstance(choice.text, str) for choice in completion.choices)
    assert completion.usage is not None
    singles = [client.completions.create(model=model, prompt=p, max_tokens=8, **GREEDY) for p in prompts]
    prompt_tokens = sum(single.usage.prompt_tokens for single in singles if single.usage is not None)
    assert completion.usage.prompt_tokens == prompt_tokens
    assert completion.usage.completion_tokens <= 4 * 8
    # choices 0-1 continue the first prompt, 2-3 the second: greedy, each pair equals that prompt's own greedy text
    greedy = client.completions.create(model=model, prompt=prompts, n=2, max_tokens=8, **GREEDY)
    assert [choice.text for choice in greedy.choices] == [s.choices[0].text for s in singles for _ in range(2)]


def test_completion_stream_of_several_prompts(client: openai.OpenAI, model: str) -> None:
    kwargs: dict[str, Any] = {"model": model, "prompt": ["Hello", "Once upon"], "n": 2, "max_tokens": 10, "seed": 9}
    expected = client.completions.create(**kwargs)
    texts = ["", "", "", ""]
    for chunk in client.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [choice.text for choice in expected.choices]


# ----- stop, seeds, penalties -----------------------------------------------------------------------------------------


def ascii_piece(text: str, start: int = 10, size: int = 3) -> str:
    for index in range(start, len(text) - size):
        piece = text[index : index + size]
        if all(c.isascii() and c.isalpha() for c in piece):
            return piece
    raise AssertionError(f"no ASCII word piece in {text!r}")


@pytest.mark.parametrize("as_list", [False, True])
def test_stop_cuts_before_the_stop_string(client: openai.OpenAI, model: str, as_list: bool) -> None:
    kwargs: dict[str, Any] = {"model": model, "prompt": "The quick brown fox", "max_tokens": 60, **GREEDY}
    full = client.completions.create(**kwargs).choices[0].text
    stop = ascii_piece(full)
    cut = client.completions.create(stop=[stop, "\x00zzz"] if as_list else stop, **kwargs).choices[0]
    assert cut.text == full[: full.index(stop)]
    assert cut.finish_reason == "stop"
    streamed = list(client.completions.create(stop=stop, stream=True, **kwargs))
    assert "".join(chunk.choices[0].text for chunk in streamed) == cut.text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_chat_stop(client: openai.OpenAI, model: str) -> None:
    kwargs: dict[str, Any] = {"model": model, "messages": MESSAGES, "max_tokens": 60, **GREEDY}
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    assert full is not None
    stop = ascii_piece(full)
    choice = client.chat.completions.create(stop=stop, **kwargs).choices[0]
    assert choice.message.content == full[: full.index(stop)]
    assert choice.finish_reason == "stop"


def test_seed_reproduces_and_different_seeds_differ(client: openai.OpenAI, model: str) -> None:
    def sample(seed: int) -> str | None:
        completion = client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=30, temperature=1.0, seed=seed
        )
        return completion.choices[0].message.content

    first = sample(42)
    assert sample(42) == first
    assert sample(43) != first


def test_seeded_choices_differ_yet_reproduce(client: openai.OpenAI, model: str) -> None:
    def choices() -> list[str]:
        completion = client.completions.create(
            model=model, prompt="Once upon a time", n=2, max_tokens=30, temperature=1.0, seed=7
        )
        return [choice.text for choice in completion.choices]

    first = choices()
    assert len(first) == 2
    assert first[0] != first[1]
    assert choices() == first


@pytest.mark.parametrize("penalty", ["presence_penalty", "frequency_penalty"])
def test_penalties_change_a_greedy_output(client: openai.OpenAI, model: str, penalty: str) -> None:
    kwargs: dict[str, Any] = {"model": model, "prompt": "Hello", "max_tokens": 40, **GREEDY}
    plain = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**{penalty: 0.0}, **kwargs).choices[0].text == plain
    penalised = client.completions.create(**{penalty: 2.0}, **kwargs).choices[0].text
    assert penalised != plain
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=40, **GREEDY)
    chat_penalised = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=40, **{penalty: 2.0}, **GREEDY
    )
    assert chat_penalised.choices[0].message.content != chat.choices[0].message.content


def test_extra_parameters_top_k_and_repetition_penalty(client: openai.OpenAI, model: str) -> None:
    kwargs: dict[str, Any] = {"model": model, "prompt": "Hello", "max_tokens": 40, **GREEDY}
    plain = client.completions.create(**kwargs).choices[0].text
    top1 = client.completions.create(**{**kwargs, "temperature": 1.0}, seed=1, extra_body={"top_k": 1})
    assert top1.choices[0].text == plain  # top_k 1 is greedy, whatever the temperature
    penalised = client.completions.create(extra_body={"repetition_penalty": 3.0}, **kwargs)
    assert penalised.choices[0].text != plain


# ----- errors ---------------------------------------------------------------------------------------------------------


def test_content_parts_and_the_developer_role(client: openai.OpenAI, model: str) -> None:
    kwargs: dict[str, Any] = {"model": model, "max_tokens": 20, **GREEDY}
    plain = client.chat.completions.create(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}],
        **kwargs,
    )
    parts = client.chat.completions.create(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "a story."}]},
        ],
        **kwargs,
    )
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert parts.usage == plain.usage


def test_max_tokens_over_the_cap_is_422(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=301)
    assert "300" in caught.value.message
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=model, prompt="hi", max_tokens=301)


def test_an_error_mid_stream_reaches_the_client(
    server: LiveServer, client: openai.OpenAI, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    kwargs: dict[str, Any] = {"model": model, "messages": MESSAGES, "max_tokens": 300, "temperature": 1.0}
    # a seed whose reply runs its full length: only the timeout can end it, however fast the machine
    seed = next(
        s for s in range(1, 50) if client.chat.completions.create(seed=s, **kwargs).choices[0].finish_reason == "length"
    )
    monkeypatch.setattr(server.app.state.engine.settings, "request_timeout_s", 0.05)
    stream = client.chat.completions.create(seed=seed, stream=True, **kwargs)
    with pytest.raises(openai.APIError, match=r"0\.05 seconds"):
        for _chunk in stream:
            pass


@pytest.fixture
def strict_names(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server.app.state.settings, "strict_model_name", True)


def test_any_model_name_is_served_by_the_one_model(client: openai.OpenAI, server: LiveServer) -> None:
    served = server.app.state.settings.model_id
    chat = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=3, **GREEDY)
    assert chat.model == served
    assert chat.choices[0].message.content
    completion = client.completions.create(model="dummy", prompt="hi", max_tokens=3, **GREEDY)
    assert completion.model == served


@pytest.mark.usefixtures("strict_names")
def test_with_strict_model_names_an_unknown_model_is_404(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.status_code == 404
    assert "gpt-4o" in caught.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi")
    assert client.completions.create(model=model, prompt="hi", max_tokens=2).choices[0].text is not None


def test_huggingface_inference_client_chats_without_naming_a_model(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub's documented usage against an OpenAI-compatible server: no `model`, so it sends "dummy"."""
    from huggingface_hub import InferenceClient, constants

    # the tests run with HF_HUB_OFFLINE=1, which makes huggingface_hub refuse every URL, this local server's too
    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    hf = InferenceClient(base_url=server.url, timeout=60)
    reply = hf.chat_completion(messages=MESSAGES, max_tokens=4, temperature=0)
    assert reply.model == server.app.state.settings.model_id
    assert reply.choices[0].message.content
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in hf.chat_completion(messages=MESSAGES, max_tokens=4, temperature=0, stream=True)
        if chunk.choices
    ]
    assert "".join(pieces) == reply.choices[0].message.content


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"n": 4}, "n"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"tool_choice": "required"}, "tools"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}},
            "response_format.json_schema.schema",
        ),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"top_p": 0}, "top_p"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "messages"),
    ],
)
def test_chat_refusals_are_422(client: openai.OpenAI, model: str, kwargs: dict[str, Any], param: str) -> None:
    arguments: dict[str, Any] = {"model": model, "messages": MESSAGES, **kwargs}
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(**arguments)
    assert caught.value.status_code == 422
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["param"] == param, body


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"logprobs": 2, "stream": True, "echo": True}, "echo"),
        ({"logprobs": 21}, "logprobs"),
        ({"best_of": 2}, "best_of"),
        ({"suffix": "end"}, "suffix"),
        ({"logprobs": 2, "stream": True, "echo": True, "suffix": "end"}, "echo,suffix"),
        ({"prompt": [3, 10**9]}, "prompt"),
        ({"n": 4}, "n"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"temperature": -0.5}, "temperature"),
    ],
)
def test_completion_refusals_are_422(client: openai.OpenAI, model: str, kwargs: dict[str, Any], param: str) -> None:
    arguments: dict[str, Any] = {"model": model, "prompt": "hi", **kwargs}
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.completions.create(**arguments)
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["param"] == param, body


@pytest.mark.usefixtures("strict_names")
def test_refusals_come_before_any_stream(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=model, messages=MESSAGES, stream=True, n=4)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", stream=True)


def test_over_long_prompt_is_422_with_both_numbers(client: openai.OpenAI, model: str) -> None:
    for create in (
        lambda: client.chat.completions.create(model=model, messages=[{"role": "user", "content": "fox " * 400}]),
        lambda: client.completions.create(model=model, prompt="fox " * 400),
        lambda: client.completions.create(model=model, prompt=["hi", "fox " * 400]),
    ):
        with pytest.raises(openai.UnprocessableEntityError) as caught:
            create()
        message = caught.value.message
        assert "200" in message
        assert any(word.isdigit() and int(word) > 200 for word in message.split()), message


@pytest.fixture
def endings(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(request id, "cancelled" or the finish reason) of each request the engine ends while the test runs."""
    engine: Engine = server.app.state.engine
    ended: list[tuple[str, str]] = []
    end_cancelled, finish = engine._end_cancelled, engine._finish

    def on_cancel(sequence: Sequence) -> None:
        ended.append((sequence.request_id, "cancelled"))
        end_cancelled(sequence)

    def on_finish(sequence: Sequence, reason: str) -> None:
        ended.append((sequence.request_id, reason))
        finish(sequence, reason)

    monkeypatch.setattr(engine, "_end_cancelled", on_cancel)
    monkeypatch.setattr(engine, "_finish", on_finish)
    return ended


def endings_of(ended: list[tuple[str, str]], request_id: str, count: int) -> list[str]:
    deadline = time.monotonic() + 10
    while len([e for e in ended if e[0] == request_id]) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # and no more than `count`
    return [reason for rid, reason in ended if rid == request_id]


def test_a_refused_prompt_in_a_list_cancels_the_queued_ones(
    client: openai.OpenAI, model: str, endings: list[tuple[str, str]]
) -> None:
    kwargs: dict[str, Any] = {"model": model, "max_tokens": 250, **GREEDY}
    assert client.completions.create(prompt="hi", **kwargs).choices[0].finish_reason == "length"
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(
            prompt=["hi", "fox " * 400], n=2, extra_headers={"x-request-id": "refused-list"}, **kwargs
        )
    # the first prompt's two choices were queued before the second prompt was refused: they are cancelled, not run
    assert endings_of(endings, "refused-list", 2) == ["cancelled", "cancelled"], endings


def test_closing_a_stream_cancels_all_its_choices(
    server: LiveServer, client: openai.OpenAI, model: str, endings: list[tuple[str, str]]
) -> None:
    kwargs: dict[str, Any] = {"model": model, "messages": MESSAGES, "n": 2, "max_tokens": 250, "temperature": 1.0}
    # a seed whose two choices both run their full length, so only the cancel can end them early
    seed = next(
        s
        for s in range(1, 50)
        if all(c.finish_reason == "length" for c in client.chat.completions.create(seed=s, **kwargs).choices)
    )
    stream = client.chat.completions.create(
        seed=seed, stream=True, extra_headers={"x-request-id": "closed-stream"}, **kwargs
    )
    for received, _chunk in enumerate(stream, 1):
        if received == 4:
            break
    stream.close()
    assert endings_of(endings, "closed-stream", 2) == ["cancelled", "cancelled"], endings
    engine: Engine = server.app.state.engine
    assert engine.snapshot()["running"] == engine.snapshot()["waiting"] == 0


@pytest.mark.usefixtures("strict_names")
def test_error_body_has_the_openai_shape(http: httpx.Client, model: str) -> None:
    response = http.post("/v1/chat/completions", json={"model": model, "messages": MESSAGES, "temperature": 5})
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == "temperature"
    assert body["error"]["code"] == 422
    missing = http.post("/v1/completions", json={"model": "nope", "prompt": "hi"}).json()
    assert set(missing["error"]) == {"message", "type", "param", "code"}
    assert missing["error"]["code"] == 404
    assert missing["error"]["param"] == "model"


def test_unknown_parameters_are_refused(http: httpx.Client, model: str) -> None:
    response = http.post("/v1/chat/completions", json={"model": model, "messages": MESSAGES, "temprature": 0.5})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "temprature"


def test_an_unknown_nested_key_is_named_by_its_path(http: httpx.Client, model: str) -> None:
    body = {"model": model, "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True, "x": 1}}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "stream_options.x"
    assert "`stream_options.x` is not a known parameter" in response.json()["error"]["message"]


def test_openai_fields_that_change_nothing_are_accepted(client: openai.OpenAI, model: str) -> None:
    """What the OpenAI SDK sends for bookkeeping is accepted and ignored; only what can't be honoured is refused."""
    plain = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, **GREEDY)
    extras = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=4,
        user="someone",
        store=False,
        metadata={"team": "docs"},
        service_tier="auto",
        parallel_tool_calls=False,
        logit_bias={},
        stream_options=None,
        **GREEDY,
    )
    assert extras.choices[0].message.content == plain.choices[0].message.content
    completion = client.completions.create(model=model, prompt="hi", max_tokens=2, user="someone", logit_bias={})
    assert completion.choices[0].text is not None


def test_one_refusal_names_every_unsupported_chat_parameter(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            logprobs=True,
            stream=True,
            logit_bias={"1": 5.0},
            tools=[{"type": "function"}],
        )
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["param"] == "logit_bias,tools", body
    for name in ("logit_bias", "tools"):
        assert name in body["message"]
