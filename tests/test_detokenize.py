"""IncrementalDecoder (token ids to whole characters) and StopStringFilter (stop strings never leak)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from inference.detokenize import IncrementalDecoder, StopStringFilter

TEXTS = [
    "Hello world, this is plain ASCII.",
    "Café crème, naïve façade, jalapeño, Ærøskøbing.",
    "Emoji: 😀👍🏽 and a family 👨‍👩‍👧 in the middle 🎉!",
    "中文文本，日本語のテキスト，한국어 텍스트。",  # noqa: RUF001 - full-width punctuation on purpose
    "Mixed: ünïcödé 😀 中 x\n\ttabs and new\nlines  double  spaces",
    "😀",
    "é",
]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    folder: Path = request.getfixturevalue(f"tiny_{request.param}_dir")
    return AutoTokenizer.from_pretrained(folder)


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def push_all(decoder: IncrementalDecoder, ids: list[int]) -> list[str]:
    return [decoder.push(token) for token in ids]


# ----- IncrementalDecoder -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_pushes_join_to_the_full_decode(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    ids = encode(tokenizer, text)
    assert tokenizer.decode(ids) == text  # the byte-level BPE round-trips any text
    chunks = push_all(IncrementalDecoder(tokenizer, []), ids)
    assert "".join(chunks) == text
    assert not any("\ufffd" in chunk for chunk in chunks)


@pytest.mark.parametrize("text", [t for t in TEXTS if not t.isascii()])
def test_multibyte_characters_split_across_tokens_are_held_until_complete(
    tokenizer: PreTrainedTokenizerBase, text: str
) -> None:
    ids = encode(tokenizer, text)
    # the tiny vocabulary has no merges for these characters: they really are split into byte tokens
    assert any("\ufffd" in tokenizer.decode([token]) for token in ids)
    chunks = push_all(IncrementalDecoder(tokenizer, []), ids)
    assert "" in chunks  # some pushes had to wait for the rest of a character
    assert "".join(chunks) == text
    assert not any("\ufffd" in chunk for chunk in chunks)


@pytest.mark.parametrize("prompt", ["", "Hi", "Prompt with context 😀", "中文 prompt é"])
def test_prompt_context_does_not_leak_into_the_output(tokenizer: PreTrainedTokenizerBase, prompt: str) -> None:
    generated = " café 😀 done"
    decoder = IncrementalDecoder(tokenizer, encode(tokenizer, prompt))
    assert "".join(push_all(decoder, encode(tokenizer, generated))) == generated


def test_special_tokens_are_skipped(tokenizer: PreTrainedTokenizerBase) -> None:
    special = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    ids = [*encode(tokenizer, "one "), special, *encode(tokenizer, "two é")]
    chunks = push_all(IncrementalDecoder(tokenizer, []), ids)
    assert "".join(chunks) == "one two é"
    assert chunks[len(encode(tokenizer, "one "))] == ""


def test_random_token_streams_match_the_full_decode(tokenizer: PreTrainedTokenizerBase) -> None:
    """Whatever ids a model emits (invalid UTF-8 included), the stream is the full decode, minus an unfinished tail."""
    rng = random.Random(0)
    specials = set(tokenizer.all_special_ids)
    vocab = [token for token in range(len(tokenizer)) if token not in specials]
    for _ in range(150):
        prompt = encode(tokenizer, rng.choice(["", *TEXTS]))  # prompts come from text: they end on a whole character
        ids = [rng.choice(vocab) for _ in range(rng.randint(1, 25))]
        joined = "".join(push_all(IncrementalDecoder(tokenizer, prompt), ids))
        full = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if full.endswith("\ufffd"):
            assert full.startswith(joined)
        else:
            assert joined == full, (prompt, ids)


# ----- StopStringFilter ---------------------------------------------------------------------------------------------


def run_filter(stops: tuple[str, ...], pieces: list[str]) -> tuple[list[str], StopStringFilter]:
    """Push every piece; flush at the end like the engine does. Returns everything that was shown, in order."""
    stop_filter = StopStringFilter(stops)
    shown = [stop_filter.push(piece) for piece in pieces]
    shown.append(stop_filter.flush())
    return shown, stop_filter


def test_stop_across_chunk_boundaries_never_leaks() -> None:
    stop_filter = StopStringFilter(("o W",))
    first = stop_filter.push("Hel")
    second = stop_filter.push("lo Wo")
    third = stop_filter.push("rld")
    assert first + second == "Hell"
    assert third == ""
    assert stop_filter.stopped
    assert stop_filter.text == "Hell"
    assert stop_filter.flush() == ""


def test_possible_stop_prefix_is_held_back_then_released() -> None:
    stop_filter = StopStringFilter(("world",))
    assert stop_filter.push("Hello wo") == "Hello "  # "wo" might become "world"
    assert stop_filter.push("r") == ""
    assert stop_filter.push("m!") == "worm!"  # it did not
    assert not stop_filter.stopped


def test_flush_releases_held_back_text_when_no_stop_matches() -> None:
    shown, stop_filter = run_filter(("world",), ["abc", " wor"])
    assert shown == ["abc", " ", "wor"]
    assert "".join(shown) == stop_filter.text == "abc wor"
    assert not stop_filter.stopped


def test_text_is_cut_before_the_first_stop() -> None:
    shown, stop_filter = run_filter(("END",), ["one END two END three"])
    assert "".join(shown) == "one " == stop_filter.text
    assert stop_filter.push("more") == ""


def test_stop_at_the_very_start_shows_nothing() -> None:
    shown, stop_filter = run_filter(("STOP",), ["ST", "OP and more"])
    assert shown == ["", "", ""]
    assert stop_filter.stopped
    assert stop_filter.text == ""


def test_multiple_stops_pick_the_earliest() -> None:
    shown, _ = run_filter(("\n\n", "Q:"), ["answer Q: x\n\ny"])
    assert "".join(shown) == "answer "
    shown, _ = run_filter(("Q:", "\n\n"), ["answer\n", "\nQ: x"])
    assert "".join(shown) == "answer"


def test_no_stops_passes_everything_through() -> None:
    shown, stop_filter = run_filter((), ["a", "b", "", "c"])
    assert shown == ["a", "b", "", "c", ""]
    assert stop_filter.text == "abc"


def _random_stops(rng: random.Random) -> tuple[str, ...]:
    """1-3 stop strings over a small alphabet, none inside another (so the earliest start is also the first to end)."""
    stops: list[str] = []
    for _ in range(rng.randint(1, 3)):
        candidate = "".join(rng.choice("ab \n") for _ in range(rng.randint(1, 4)))
        if all(candidate not in stop and stop not in candidate for stop in stops):
            stops.append(candidate)
    return tuple(stops)


def test_random_chunkings_give_the_text_before_the_earliest_stop() -> None:
    rng = random.Random(1)
    for _ in range(2000):
        text = "".join(rng.choice("abc \n") for _ in range(rng.randint(0, 30)))
        stops = _random_stops(rng)
        found = [index for stop in stops if (index := text.find(stop)) >= 0]
        expected = text[: min(found)] if found else text
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[start:end] for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        stop_filter = StopStringFilter(stops)
        shown = ""
        for piece in pieces:
            shown += stop_filter.push(piece)
            assert expected.startswith(shown), (text, stops, pieces)  # nothing shown is ever taken back
        shown += stop_filter.flush()
        assert shown == expected, (text, stops, pieces)
        assert stop_filter.stopped == bool(found)
