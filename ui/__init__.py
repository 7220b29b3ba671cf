"""The Gradio playground and its named API endpoints (`/generate`, `/chat`).

`THEME` and `CSS` go to `gr.mount_gradio_app` (app.py): the mount ignores those given to `gr.Blocks`.
"""

from __future__ import annotations

import gradio as gr

from inference.client import EngineClient
from inference.settings import Settings
from ui.events import wire
from ui.gradio_fixes import Blocks, refuse_unknown_events, unbatch_validators
from ui.handlers import Handlers
from ui.layout import CSS, THEME, draw

__all__ = ["CSS", "THEME", "build_ui"]

GRADIO_CACHE_SWEEP_S = 3600
GRADIO_SESSIONS_KEPT = 200


def build_ui(engine: EngineClient, settings: Settings) -> gr.Blocks:
    unbatch_validators()
    refuse_unknown_events()
    # Gradio deletes the files it made for this app once they are an hour old, and all of them at shutdown.
    with Blocks(title="LLM playground", delete_cache=(GRADIO_CACHE_SWEEP_S, GRADIO_CACHE_SWEEP_S)) as demo:
        playground = draw(settings)
        handlers = Handlers(engine, settings, playground)
        wire(playground, handlers, settings)
        demo.load(
            handlers.model_info,
            None,
            [playground.model_info, playground.model_info_json],
            api_visibility="private",
            queue=False,
        )
    # api_open=False: every call that runs the model goes through the queue (and /generate's validator); Gradio's
    # direct /gradio_api/run/<name> route would skip both, past the queue's size and concurrency limits. The
    # playground's quick events (queue=False) still go that way.
    demo.queue(max_size=settings.max_queue_size, default_concurrency_limit=settings.max_batch_size, api_open=False)
    # Gradio keeps a copy of the page's config for every session, the least recently used dropped past this many,
    # and each API call without a session hash is a session of its own: with Gradio's default of 10,000, API traffic
    # alone grew the process a lot before anything was freed (figures: README, "Memory"). More sessions than
    # this can't be active at once anyway (the engine holds MAX_BATCH_SIZE + MAX_QUEUE_SIZE requests); a tab whose
    # session was dropped gets a fresh one at its next event and loses nothing that matters: the conversation lives
    # in the page; only the progress of a reply on its way lives in a gr.State, and without it a reply stopped then
    # keeps its last "Generating…" line instead of "Stopped after N tokens.".
    demo.state_session_capacity = GRADIO_SESSIONS_KEPT
    return demo
