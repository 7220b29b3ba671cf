"""Token ids to text as they come: whole UTF-8 characters, right spacing, and stop strings never leaked."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

# Prompt tokens decoded along with the first new ones, so tokenizers that drop a leading space on a sequence's
# first token (SentencePiece) still produce it.
CONTEXT_TOKENS = 5


class IncrementalDecoder:
    """Decodes one token at a time the way TGI and vLLM do: re-decode a short window, emit only the new suffix,
    and wait while the window ends in an incomplete UTF-8 sequence (U+FFFD)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before) :]
        return ""


class StopStringFilter:
    """Accumulates text, cuts it before the first stop string, and holds back any tail that might still become one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, delta: str) -> str:
        """Add new text; return the part that is now safe to show."""
        if self.stopped:
            return ""
        self.text += delta
        cut = self._first_stop()
        if cut is not None:
            self.stopped = True
            self.text = self.text[:cut]
            return self._emit(cut)
        return self._emit(len(self.text) - self._held_back())

    def flush(self) -> str:
        """The generation ended without a stop string: release what was held back."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        visible = self.text[self.emitted : upto]
        self.emitted = upto
        return visible

    def _first_stop(self) -> int | None:
        found = [index for stop in self.stops if (index := self.text.find(stop)) >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is the start of some stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
