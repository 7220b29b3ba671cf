"""One request inside the engine, and the bookkeeping of each token it is given.

`Sequence.accept(token)` is all that happens to a sampled token on the request's side: the sampler records it (for the
penalties), it is decoded to text, a possible stop string is held back, and the request says whether it finished and
why. Delivering the text, logging and counting stay in the engine, which owns the sequences.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Literal

from transformers import PreTrainedTokenizerBase

from inference.client import Alternatives, GenerationResult, TextChunk, TokenLogprob
from inference.detokenize import IncrementalDecoder, StopStringFilter
from inference.errors import EngineError
from inference.grammar import GrammarTokenizer
from inference.params import SamplingParams
from inference.sampling import RowSampler

# Why a request finished (GenerationResult.finish_reason): an end-of-sequence token, a stop string, max_new_tokens.
FinishReason = Literal["eos", "stop", "length"]
# What a request's caller is sent: its text as it comes, then its result or an error.
Event = TextChunk | GenerationResult | EngineError


@dataclass(eq=False)
class Sequence:
    """One request's state inside the engine: what it asked for, where its events go, and how far it has got.

    Created when the request is queued; `start` readies it for decoding when it is prefilled (on the scheduler
    thread, since the sampler holds torch tensors); then `accept` takes each token sampled for it.
    """

    request_id: str
    route: str
    prompt_ids: list[int]
    params: SamplingParams
    deliver: Callable[[Event], None]
    submitted_at: float
    deadline: float
    cancelled: bool = False  # the caller left (Stop, disconnect, done reading); set from any thread
    done: bool = False  # a result or an error was delivered
    sampler: RowSampler | None = None
    decoder: IncrementalDecoder | None = None
    stops: StopStringFilter | None = None
    eos_ids: Collection[int] = ()
    generated: int = 0
    started_at: float = 0.0
    first_token_at: float = 0.0
    seed: int | None = None  # the seed its random stream started from (None when greedy)
    token_ids: list[int] = field(default_factory=list)  # every generated token, an end-of-sequence one included
    logprobs: list[float] = field(default_factory=list)  # theirs, when params.logprobs
    top_logprobs: list[Alternatives] = field(default_factory=list)  # and their alternatives, when params.top_logprobs
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # when params.prompt_logprobs
    reported: int = 0  # tokens already handed to the caller in a text chunk

    @property
    def budget(self) -> int:
        """Cache slots the request needs at most: its prompt and every token it may generate."""
        return len(self.prompt_ids) + self.params.max_new_tokens

    def start(
        self,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: Collection[int],
        seed: int,
        now: float,
        grammars: GrammarTokenizer | None = None,
    ) -> None:
        """Ready the request for decoding; `seed` is its random stream's seed unless it asked for its own;
        `grammars` makes the matcher of its grammar, if it has one."""
        self.started_at = now
        constraint = None
        if self.params.grammar is not None and grammars is not None:
            constraint = grammars.constraint(self.params.grammar)
        self.sampler = RowSampler.create(self.params, self.prompt_ids, seed, eos_ids, constraint)
        self.seed = None if self.params.greedy else self.params.seed if self.params.seed is not None else seed
        self.decoder = IncrementalDecoder(tokenizer, self.prompt_ids)
        self.stops = StopStringFilter(self.params.stop)
        self.eos_ids = eos_ids

    def accept(self, token: int, logprob: TokenLogprob | None = None) -> tuple[str, FinishReason | None]:
        """Take the next token (and its log-probability, if asked for): return the text that is now safe to show
        (maybe none) and, if the request finished with it, why."""
        assert self.sampler is not None, "not started"
        assert self.decoder is not None
        assert self.stops is not None
        self.generated += 1
        self.token_ids.append(token)
        if logprob is not None:
            self.logprobs.append(logprob.logprob)
            if self.params.top_logprobs:
                self.top_logprobs.append(logprob.top)
        if token in self.eos_ids and not self.params.ignore_eos:
            return "", "eos"  # the end-of-sequence token is counted but neither recorded nor shown
        self.sampler.record(token)
        visible = self.stops.push(self.decoder.push(token))
        if self.stops.stopped:
            return visible, "stop"
        if self.generated >= self.params.max_new_tokens:
            return visible, "length"
        return visible, None

    def unreported(self) -> tuple[tuple[int, ...], tuple[float, ...], tuple[Alternatives, ...]]:
        """The tokens (their log-probabilities and alternatives, where asked) not yet handed to the caller; from now
        on they count as handed."""
        start, self.reported = self.reported, len(self.token_ids)
        return tuple(self.token_ids[start:]), tuple(self.logprobs[start:]), tuple(self.top_logprobs[start:])

    def flush(self) -> str:
        """The request has ended: the text held back in case it began a stop string, which it now never will."""
        assert self.stops is not None, "not started"
        return self.stops.flush()

    @property
    def text(self) -> str:
        """All the text generated so far, cut before a stop string."""
        return self.stops.text if self.stops is not None else ""
