"""The Gradio playground and its named API endpoints (`/generate`, `/chat`)."""

from __future__ import annotations

import gradio as gr

from inference.engine import Engine
from inference.settings import Settings
from ui.events import wire
from ui.handlers import Handlers
from ui.layout import draw


def build_ui(engine: Engine, settings: Settings, handlers: Handlers | None = None) -> gr.Blocks:
    handlers = handlers or Handlers(engine, settings)
    with gr.Blocks(title="LLM playground") as demo:
        playground = draw(settings)
        wire(playground, handlers, settings)
        demo.load(handlers.model_info, None, playground.model_info, api_visibility="private", queue=False)
    demo.queue(max_size=settings.max_queue_size, default_concurrency_limit=settings.max_batch_size)
    return demo
