"""The Gradio playground and its named API endpoints (`/generate`, `/chat`).

`THEME` and `CSS` go to `gr.mount_gradio_app` (app.py): the mount ignores those given to `gr.Blocks`.
"""

from __future__ import annotations

import gradio as gr

from inference.engine import EngineFrontEnd
from inference.settings import Settings
from ui.events import wire
from ui.gradio_fixes import Blocks, unbatch_validators
from ui.handlers import Handlers
from ui.layout import CSS, THEME, draw

__all__ = ["CSS", "THEME", "build_ui"]


def build_ui(engine: EngineFrontEnd, settings: Settings, handlers: Handlers | None = None) -> gr.Blocks:
    handlers = handlers or Handlers(engine, settings)
    unbatch_validators()
    with Blocks(title="LLM playground") as demo:
        playground = draw(settings)
        wire(playground, handlers, settings)
        demo.load(
            handlers.model_info,
            None,
            [playground.model_info, playground.model_info_json],
            api_visibility="private",
            queue=False,
        )
    # api_open=False: every call that runs the model goes through the queue (and /generate's validator); Gradio's
    # direct /gradio_api/run/<name> route would skip both.
    demo.queue(max_size=settings.max_queue_size, default_concurrency_limit=settings.max_batch_size, api_open=False)
    return demo
