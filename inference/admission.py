"""Bounding the work done before a request is queued: tokenizing long prompts, at most a few at a time.

Short prompts tokenize in well under a millisecond and are never held back. A long one (up to the cheap length check's
limit, ~0.17 M characters for SmolLM2) takes up to ~0.1 s of a core; a crowd of them would take the CPU from the
model and from every short request, so beyond `slots` at once they are refused with 429 and `Retry-After`
(TokenizerBusyError) instead of waiting in line: overload is shed, not queued.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from inference.errors import TokenizerBusyError

# Characters from which tokenizing counts as long (~10 ms of a core for SmolLM2's tokenizer, measured).
LONG_PROMPT_CHARS = 16_384


class TokenizingGate:
    """At most `slots` long prompts tokenized at once, across every thread and event loop of the process."""

    def __init__(self, slots: int) -> None:
        self._slots = threading.BoundedSemaphore(slots)

    @contextlib.contextmanager
    def enter(self, chars: int) -> Iterator[None]:
        if chars < LONG_PROMPT_CHARS:
            yield
            return
        if not self._slots.acquire(blocking=False):
            raise TokenizerBusyError()
        try:
            yield
        finally:
            self._slots.release()
