"""Two places where Gradio 6.31 fails API callers, mended here so that every call is judged alone and every error a
client sees is written for people.

1. An event's `validator=` runs when a call joins the queue, one call at a time, before any batching: exactly what a
   batched event needs so that one caller's bad input never reaches (and fails) a batch of others. But Gradio builds
   the validator with the event's own `batch=True` and then hands it the single call's inputs wrapped the wrong way,
   so every call fails ("didn't receive enough input values"). A validator judges one call by definition; it is made
   unbatched here (`unbatch_validators`), and then works as documented for batched events too.
2. A call with too few values in `data` gets a message listing Gradio's component objects with their memory addresses
   and a tip about JavaScript functions (and a traceback in the log); `Blocks` says which parameters it needs instead.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
import gradio.queueing
from gradio.block_function import BlockFunction

_make_validator = gradio.queueing.create_validator_fn


def _unbatched_validator(fn: BlockFunction) -> BlockFunction:
    validator = _make_validator(fn)
    validator.batch = False
    return validator


def unbatch_validators() -> None:
    """Make Gradio run every event's validator on the single call it judges (idempotent)."""
    gradio.queueing.create_validator_fn = _unbatched_validator


class MissingValuesError(gr.Error):
    """A gr.Error whose str() is its message (gr.Error quotes it), as it travels in Gradio's HTTP 400 for a call
    refused when it joins the queue."""

    def __str__(self) -> str:
        return str(self.message)


class Blocks(gr.Blocks):
    """`gr.Blocks` whose refusal of a call with too few values names the parameters it needs."""

    def validate_inputs(self, block_fn: BlockFunction, inputs: list[Any]) -> None:
        if len(inputs) < len(block_fn.inputs):
            names = block_fn.input_parameter_names or [f"parameter_{i}" for i in range(len(block_fn.inputs))]
            raise MissingValuesError(
                f"This endpoint takes {len(block_fn.inputs)} values in `data` ({', '.join(map(str, names))}), "
                f"got {len(inputs)}.",
                print_exception=False,
            )
