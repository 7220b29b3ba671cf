"""JSON output that is always valid: decoding constrained by the schema's grammar (llguidance), on every route that
takes one, checked with jsonschema over 100 sampled answers; rows with and without a schema share a batch."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import numpy as np
import openai
import pytest
import torch

from inference.engine import Engine
from inference.grammar import json_schema_grammar
from inference.params import SamplingParams
from inference.prompts import PreparedPrompt
from tests.live_server import LiveServer, serve

# Every value bounded, so that a sampled answer ends well within max_tokens even from a random tiny model.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "active"],
    "additionalProperties": False,
}
MESSAGES: list[Any] = [{"role": "user", "content": "Describe a user as JSON."}]


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, make_settings: Any) -> Iterator[LiveServer]:
    with serve(make_settings(tiny_llama_dir, max_new_tokens=300, max_n=4)) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def test_json_schema_answers_validate_100_of_100_at_temperature_1(client: openai.OpenAI) -> None:
    response_format: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}

    def ask(seed: int) -> list[str]:
        reply = client.chat.completions.create(
            model="any",
            messages=MESSAGES,
            max_tokens=250,
            temperature=1.0,
            seed=seed,
            n=4,
            response_format=response_format,
        )
        assert all(choice.finish_reason == "stop" for choice in reply.choices)
        return [choice.message.content or "" for choice in reply.choices]

    with ThreadPoolExecutor(max_workers=5) as pool:  # 25 requests of 4 choices, several in the batch at once
        answers = [text for texts in pool.map(ask, range(25)) for text in texts]
    assert len(answers) == 100
    for text in answers:
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(answers)) > 1  # sampled, not one fixed answer


def test_json_on_both_openai_routes(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model="any", messages=MESSAGES, max_tokens=200, temperature=0.7, seed=1, response_format={"type": "json_object"}
    )
    assert chat.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(chat.choices[0].message.content or ""), dict)
    schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    completion = client.completions.create(
        model="any", prompt="JSON:", max_tokens=200, seed=2, extra_body={"response_format": schema}
    )
    assert completion.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(completion.choices[0].text), PERSON)


def test_rest_generate_and_tgi_grammar(server: LiveServer) -> None:
    body = {"prompt": "A user:", "max_new_tokens": 200, "temperature": 1.0, "seed": 3, "json_schema": PERSON}
    answer = httpx.post(f"{server.url}/generate", json=body, timeout=60).json()
    jsonschema.validate(json.loads(answer["generated_text"]), PERSON)
    parameters = {"max_new_tokens": 12, "do_sample": True, "seed": 4, "grammar": {"type": "regex", "value": "[0-9]{3}"}}
    tgi = httpx.post(f"{server.url}/generate", json={"inputs": "Digits:", "parameters": parameters}, timeout=60)
    assert tgi.status_code == 200, tgi.text
    text = tgi.json()["generated_text"]
    assert len(text) == 3
    assert text.isdigit()


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/v1/chat/completions",
            {"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {"schema": "{"}}},
            "response_format.json_schema.schema",
        ),
        ("/v1/completions", {"prompt": "x", "response_format": {"type": "yaml"}}, "response_format"),
        ("/generate", {"prompt": "x", "json_schema": {"type": "string", "pattern": "("}}, "json_schema"),
        ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "lark", "value": "x"}}}, "grammar"),
    ],
)
def test_unusable_schemas_are_422_saying_why(server: LiveServer, path: str, body: dict[str, Any], param: str) -> None:
    named = {"model": "any"} if path.startswith("/v1/") else {}
    response = httpx.post(f"{server.url}{path}", json={**named, **body}, timeout=30)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["message"]


def test_rows_with_and_without_a_schema_share_a_batch(make_engine: Any, tiny_llama_dir: Path) -> None:
    """A plain request's text is the same alone and batched beside constrained ones, and theirs validate."""
    engine: Engine = make_engine(tiny_llama_dir)
    plain = PreparedPrompt([5, 6, 7, 8])
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0)
    constrained = SamplingParams(max_new_tokens=200, temperature=1.0, grammar=json_schema_grammar(PERSON, "x"))

    async def alone() -> str:
        return (await engine.generate(plain, greedy)).text

    async def together() -> list[str]:
        jobs = [engine.generate(PreparedPrompt([9, 10, 11 + i]), constrained) for i in range(3)]
        results = await asyncio.gather(engine.generate(plain, greedy), *jobs)
        return [result.text for result in results]

    expected = asyncio.run(alone())
    texts = asyncio.run(together())
    assert texts[0] == expected
    for text in texts[1:]:
        jsonschema.validate(json.loads(text), PERSON)
    assert engine.stats.largest_batch >= 4


def test_a_bitmask_unpacks_to_the_tokens_it_allows() -> None:
    from inference.grammar import allowed_tokens

    mask = np.array([0b101, 1, -1], dtype=np.int32)  # tokens 0 and 2; 32; all of 64..95
    allowed = allowed_tokens(mask, 100)
    assert allowed.nonzero().flatten().tolist() == [0, 2, 32, *range(64, 96)]
    assert allowed_tokens(mask, 40).nonzero().flatten().tolist() == [0, 2, 32]


def test_a_grammar_that_fails_fails_its_request_alone(
    make_engine: Any, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A matcher that can't go on (past its work limits, say) fails its own request with a 422, not the batch."""
    from inference.errors import InvalidRequestError
    from inference.grammar import Constraint

    engine: Engine = make_engine(tiny_llama_dir)
    assert engine.loaded is not None
    forbidden = engine.loaded.tokenizer("x", add_special_tokens=False)["input_ids"][0]  # JSON can't start with x
    original = Constraint.restrict

    def breaking(self: Constraint, logits: torch.Tensor) -> None:
        self.matcher.consume_token(forbidden)  # the matcher enters its error state, as past a limit
        original(self, logits)

    monkeypatch.setattr(Constraint, "restrict", breaking)
    plain = PreparedPrompt([5, 6, 7, 8])
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    constrained = SamplingParams(max_new_tokens=50, grammar=json_schema_grammar({"type": "object"}, "x"))

    async def together() -> list[Any]:
        return await asyncio.gather(
            engine.generate(plain, greedy), engine.generate(plain, constrained), return_exceptions=True
        )

    alone = asyncio.run(engine.generate(plain, greedy)).text
    plain_result, failed = asyncio.run(together())
    assert plain_result.text == alone
    assert isinstance(failed, InvalidRequestError)
    assert "could not be followed" in failed.message
    assert failed.param == "response_format"
