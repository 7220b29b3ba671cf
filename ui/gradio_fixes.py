"""Three places where Gradio 6.31 fails API callers, mended here so that every call is judged alone and every error a
client sees is written for people.

1. An event's `validator=` runs when a call joins the queue, one call at a time, before any batching: exactly what a
   batched event needs so that one caller's bad input never reaches (and fails) a batch of others. But Gradio builds
   the validator with the event's own `batch=True` and then hands it the single call's inputs wrapped the wrong way,
   so every call fails ("didn't receive enough input values"). A validator judges one call by definition; it is made
   unbatched here (`unbatch_validators`), and then works as documented for batched events too.
2. A call with too few values in `data` gets a message listing Gradio's component objects with their memory addresses
   and a tip about JavaScript functions (and a traceback in the log); `Blocks` says which parameters it needs instead.
3. A call for an event that does not exist (`/gradio_api/queue/join` with an unknown `fn_index`, `/gradio_api/call/`
   with an unknown name) fails inside Gradio's lookup with a KeyError: a 500, for bad input. And a private event
   (hidden from the API docs and from gradio_client) still answers `/gradio_api/call/<its function's name>`.
   `refuse_unknown_events` makes the lookup refuse both as a 4xx (422 naming `fn_index`; 404 for a name no public
   event has), in the one error shape (api/errors.py's handlers for Gradio's app). The page itself calls its events
   by `fn_index`, never by name, so it is not affected.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
import gradio.queueing
import gradio.route_utils
from fastapi import HTTPException
from gradio.block_function import BlockFunction
from gradio.blocks import Blocks as GradioBlocks
from gradio.data_classes import PredictBody

_make_validator = gradio.queueing.create_validator_fn


def _unbatched_validator(fn: BlockFunction) -> BlockFunction:
    validator = _make_validator(fn)
    validator.batch = False
    return validator


def unbatch_validators() -> None:
    """Make Gradio run every event's validator on the single call it judges (idempotent)."""
    gradio.queueing.create_validator_fn = _unbatched_validator


_get_fn = gradio.route_utils.get_fn


class UnknownEventError(HTTPException):
    """A call for an event this app does not have; `param` names what the caller got wrong."""

    def __init__(self, status_code: int, detail: str, param: str | None) -> None:
        super().__init__(status_code, detail)
        self.param = param


def _known_fn(blocks: GradioBlocks, api_name: str | None, body: PredictBody) -> BlockFunction:
    unknown_name = UnknownEventError(
        404, f"There is no endpoint `{api_name}` on this server; /gradio_api/info lists them.", None
    )
    try:
        fn: BlockFunction = _get_fn(blocks, api_name, body)
    except gradio.route_utils.FnIndexInferError:
        raise unknown_name from None
    except KeyError:  # the lookup of `fn_index` among the app's (or the session's) events
        raise UnknownEventError(422, f"There is no event with `fn_index` {body.fn_index} here.", "fn_index") from None
    if body.fn_index is None and fn.api_visibility == "private":  # named, not numbered as the page does
        raise unknown_name
    return fn


def refuse_unknown_events() -> None:
    """Make Gradio answer a call for an event it does not have with a 4xx, not a 500 (idempotent)."""
    gradio.route_utils.get_fn = _known_fn


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
