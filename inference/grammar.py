"""Decoding constrained by a grammar, so that JSON asked for is JSON every time: at each step a row's disallowed
tokens get -inf before sampling, and the tokens it takes advance its matcher.

llguidance (the grammar engine vLLM, SGLang and llama.cpp use) does the work: a Rust matcher per request and a
token bitmask per step, about 0.1 ms a row for a JSON schema on this model (docs/benchmarks.md); rows without a
grammar pay nothing. JSON is generated compact (no free whitespace), so a sampled answer can't wander into endless
spaces.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Collection
from typing import Any

import llguidance
import llguidance.hf
import llguidance.numpy
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from inference.errors import InvalidRequestError

# JSON as llguidance writes it unless told otherwise: `", "` and `": "` between items, no other whitespace.
COMPACT = {"whitespace_flexible": False}
# Work one grammar may cost, below llguidance's defaults: the matchers run on the scheduler thread, so a grammar built
# to be slow (a regex like `(a{1000}){1000}`) must not stall every other row. With these, that one's first mask takes
# ~0.1 s instead of 0.65 s, a step at most a few ms; a grammar that runs out is that request's error alone.
LIMITS = llguidance.LLParserLimits(
    initial_lexer_fuel=200_000, step_lexer_fuel=50_000, step_max_items=20_000, max_lexer_states=20_000
)


def json_schema_grammar(schema: dict[str, Any], param: str) -> str:
    """The grammar of JSON valid against `schema`; InvalidRequestError (naming `param`) for a schema llguidance
    can't use, in its words."""
    guided = {**schema, "x-guidance": {**COMPACT, **schema.get("x-guidance", {})}}
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(guided)
    except (ValueError, TypeError) as error:
        raise InvalidRequestError(f"`{param}` is not a usable JSON schema: {error}", param=param) from error
    return check(grammar, param)


def regex_grammar(pattern: str, param: str) -> str:
    return check(llguidance.LLMatcher.grammar_from_regex(pattern), param)


def check(grammar: str, param: str) -> str:
    problem = llguidance.LLMatcher.validate_grammar(grammar, limits=LIMITS)
    if problem:
        raise InvalidRequestError(f"`{param}` can't constrain decoding: {problem.strip()}", param=param)
    return grammar


def schema_of(value: Any, param: str) -> dict[str, Any]:
    """A JSON schema given as an object (or as JSON text, as some clients send it)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as error:
            raise InvalidRequestError(f"`{param}` is not valid JSON: {error}", param=param) from error
    if not isinstance(value, dict):
        raise InvalidRequestError(f"`{param}` must be a JSON schema (an object)", param=param)
    return value


class GrammarTokenizer:
    """The model's vocabulary as llguidance sees it, built once (a third of a second) on first use."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_ids: Collection[int]) -> None:
        self._tokenizer, self._eos_ids = tokenizer, sorted(eos_ids)
        self._built: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    @property
    def lltokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._built is None:
                eos = self._eos_ids or None
                self._built = llguidance.hf.from_tokenizer(self._tokenizer, eos_token=eos)  # type: ignore[arg-type]
            return self._built

    def constraint(self, grammar: str) -> Constraint:
        """A fresh matcher of `grammar` over this vocabulary, for one request."""
        tokenizer = self.lltokenizer
        return Constraint(llguidance.LLMatcher(tokenizer, grammar, limits=LIMITS), tokenizer.vocab_size)


class Constraint:
    """One request's grammar state: which tokens may come next, and the tokens taken so far."""

    def __init__(self, matcher: llguidance.LLMatcher, vocabulary: int) -> None:
        self.matcher = matcher
        self.mask = llguidance.numpy.allocate_token_bitmask(1, vocabulary)

    @property
    def error(self) -> str | None:
        """Why the grammar can't go on (it ran past LIMITS, say); the engine then fails this request alone."""
        if not self.matcher.is_error():
            return None
        return str(self.matcher.get_error() or "the grammar failed")

    def restrict(self, logits: torch.Tensor) -> None:
        """Set every token the grammar doesn't allow next to -inf, in one row of logits (in place). A matcher in
        error leaves the row as it is: its request is failed right after sampling."""
        llguidance.numpy.fill_next_token_bitmask(self.matcher, self.mask, 0)
        if not self.matcher.is_error():
            logits.masked_fill_(~allowed_tokens(self.mask[0], logits.shape[-1]).to(logits.device), float("-inf"))

    def advance(self, token: int) -> None:
        self.matcher.consume_token(token)


def allowed_tokens(mask: np.ndarray, vocabulary: int) -> torch.Tensor:
    """A bitmask (int32 words, token i at bit i % 32 of word i // 32) as one bool per token; tokens past the mask's
    end (padding rows of the embedding) are not allowed. llguidance's torch helpers apply the mask with a
    torch.compile kernel (a C++ compiler at run time, seconds of warm-up) and importing them imports torch's compiler
    (~1 s of every start-up), so the mask is filled by its numpy helpers and unpacked here."""
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocabulary]
    allowed = torch.zeros(vocabulary, dtype=torch.bool)
    allowed[: bits.size] = torch.from_numpy(bits.astype(np.bool_))
    return allowed
