"""The Gradio playground and its named API endpoints (`/generate`, `/chat`).

`THEME` and `CSS` go to `gr.mount_gradio_app` (app.py): the mount ignores those given to `gr.Blocks`.
"""

from __future__ import annotations

import gradio as gr

from inference.engine import EngineFrontEnd
from inference.settings import Settings
from ui.events import wire
from ui.handlers import Handlers
from ui.layout import CSS, THEME, draw

__all__ = ["CSS", "THEME", "build_ui"]

GRADIO_CACHE_SWEEP_S = 3600


def build_ui(engine: EngineFrontEnd, settings: Settings, handlers: Handlers | None = None) -> gr.Blocks:
    handlers = handlers or Handlers(engine, settings)
    # Gradio deletes the files it made for this app once they are an hour old, and all of them at shutdown.
    with gr.Blocks(title="LLM playground", delete_cache=(GRADIO_CACHE_SWEEP_S, GRADIO_CACHE_SWEEP_S)) as demo:
        playground = draw(settings)
        wire(playground, handlers, settings)
        demo.load(
            handlers.model_info,
            None,
            [playground.model_info, playground.model_info_json],
            api_visibility="private",
            queue=False,
        )
    # api_open=False: `/gradio_api/run/<name>` would run a queued event (/generate, /chat) beside the queue, past its
    # size and concurrency limits; the playground's quick events (queue=False) still go that way.
    demo.queue(max_size=settings.max_queue_size, default_concurrency_limit=settings.max_batch_size, api_open=False)
    return demo
