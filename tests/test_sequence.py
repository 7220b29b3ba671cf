"""A request's per-token bookkeeping (`Sequence.accept`), driven token by token with a tiny real tokenizer: no model,
no engine, no thread."""

from __future__ import annotations

from typing import Any

import pytest
from transformers import PreTrainedTokenizerFast

from inference.params import SamplingParams
from inference.sequence import Event, Sequence
from tests.tiny_models import build_tokenizer

PROMPT = "The baker opens the shop."


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer("gpt2")


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def decode(tokenizer: PreTrainedTokenizerFast, ids: list[int]) -> str:
    return str(tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))


def started(tokenizer: PreTrainedTokenizerFast, **params: Any) -> Sequence:
    delivered: list[Event] = []
    sequence = Sequence(
        request_id="r1",
        route="/test",
        prompt_ids=encode(tokenizer, PROMPT),
        params=SamplingParams(**params),
        deliver=delivered.append,
        submitted_at=10.0,
        deadline=70.0,
    )
    sequence.start(tokenizer, {int(tokenizer.eos_token_id)}, seed=7, now=11.0)
    return sequence


def feed(sequence: Sequence, tokens: list[int]) -> list[tuple[str, str | None]]:
    """accept() every token, stopping at the first that finishes the request (as the engine does)."""
    outcomes: list[tuple[str, str | None]] = []
    for token in tokens:
        outcomes.append(sequence.accept(token))
        if outcomes[-1][1] is not None:
            break
    return outcomes


def test_start_readies_decoding_and_the_budget_counts_prompt_and_new_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    sequence = started(tokenizer, max_new_tokens=20)
    assert sequence.started_at == 11.0
    assert sequence.sampler is not None
    assert sequence.budget == len(encode(tokenizer, PROMPT)) + 20
    assert sequence.generated == 0
    assert sequence.text == ""


def test_text_comes_out_as_the_tokens_decode_and_max_new_tokens_ends_it(tokenizer: PreTrainedTokenizerFast) -> None:
    tokens = encode(tokenizer, " Every morning the baker lights the oven")
    sequence = started(tokenizer, max_new_tokens=len(tokens))
    outcomes = feed(sequence, tokens)
    assert [reason for _, reason in outcomes] == [None] * (len(tokens) - 1) + ["length"]
    assert "".join(text for text, _ in outcomes) == decode(tokenizer, tokens) == sequence.text
    assert sequence.generated == len(tokens)
    assert sequence.flush() == ""  # nothing was held back


def test_an_eos_token_ends_the_request_counted_but_neither_shown_nor_recorded(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    sequence = started(tokenizer, max_new_tokens=10, repetition_penalty=1.3)
    assert sequence.sampler is not None
    seen_before = sequence.sampler.seen_tokens.numel()
    assert sequence.accept(encode(tokenizer, " bread")[0])[1] is None
    assert sequence.sampler.seen_tokens.numel() == seen_before + 1  # recorded, for the repetition penalty
    assert sequence.accept(int(tokenizer.eos_token_id)) == ("", "eos")
    assert sequence.generated == 2
    assert sequence.sampler.seen_tokens.numel() == seen_before + 1


def test_generated_tokens_feed_the_presence_and_frequency_penalties(tokenizer: PreTrainedTokenizerFast) -> None:
    sequence = started(tokenizer, max_new_tokens=10, frequency_penalty=0.5)
    token = encode(tokenizer, " the")[0]
    feed(sequence, [token, token, token])
    assert sequence.sampler is not None
    assert sequence.sampler.generated_counts == {token: 3}


def test_a_stop_string_is_never_shown_and_ends_the_request(tokenizer: PreTrainedTokenizerFast) -> None:
    tokens = encode(tokenizer, " The quick brown fox jumps over the lazy dog")
    sequence = started(tokenizer, max_new_tokens=100, stop=("fox",))
    outcomes = feed(sequence, tokens)
    assert outcomes[-1][1] == "stop"
    assert len(outcomes) < len(tokens)  # it ended at the stop string, not at the end of the tokens
    shown = "".join(text for text, _ in outcomes)
    assert shown == sequence.text == " The quick brown "
    assert sequence.flush() == ""


def test_a_possible_stop_string_is_held_back_until_the_request_ends(tokenizer: PreTrainedTokenizerFast) -> None:
    tokens = encode(tokenizer, " the bread is warm")
    sequence = started(tokenizer, max_new_tokens=len(tokens), stop=("warmth",))
    outcomes = feed(sequence, tokens)
    assert outcomes[-1][1] == "length"
    shown = "".join(text for text, _ in outcomes)
    assert shown == " the bread is "  # "warm" might still have become "warmth"
    assert sequence.flush() == "warm"
    assert sequence.text == " the bread is warm"


def test_characters_split_over_several_tokens_come_out_whole(tokenizer: PreTrainedTokenizerFast) -> None:
    text = " café 😀 東京"
    tokens = encode(tokenizer, text)
    assert len(tokens) > len(text)  # the byte-level tokenizer really splits these characters
    sequence = started(tokenizer, max_new_tokens=len(tokens))
    outcomes = feed(sequence, tokens)
    assert not any("\ufffd" in shown for shown, _ in outcomes)
    assert "".join(shown for shown, _ in outcomes) == text


def test_accept_before_start_is_a_bug(tokenizer: PreTrainedTokenizerFast) -> None:
    sequence = Sequence("r", "-", [1, 2], SamplingParams(), lambda event: None, 0.0, 1.0)
    with pytest.raises(AssertionError):
        sequence.accept(3)
