"""Wiring the playground: every public event has a name; helpers are private; concurrency is set on purpose."""

from __future__ import annotations

import gradio as gr

from inference.settings import Settings
from ui.handlers import Handlers
from ui.layout import Playground

# Gradio batches of /generate that may sit in the engine at once. With two, one batch decodes while the next
# gathers in Gradio's queue, and the engine's continuous batching merges them; more would only bypass Gradio's
# batching without adding throughput (the engine caps the running batch anyway).
GENERATE_CONCURRENCY = 2
CHAT_CONCURRENCY_ID = "chat"


def wire(ui: Playground, handlers: Handlers, settings: Settings) -> None:
    sliders = [ui.temperature, ui.top_p, ui.top_k, ui.max_length]
    # Each streaming chat is one row of the engine's batch, so as many may run as the batch holds.
    chat_concurrency = settings.max_batch_size

    ui.complete.click(
        handlers.generate,
        inputs=[ui.prompt, ui.max_length, ui.temperature, ui.top_p, ui.top_k],
        outputs=[ui.completion],
        api_name="generate",
        api_description="Continue a prompt (plain text, no chat template). Batched with other waiting requests.",
        batch=True,
        max_batch_size=settings.max_batch_size,
        concurrency_limit=GENERATE_CONCURRENCY,
    )

    gr.api(
        handlers.chat,
        api_name="chat",
        api_description="Stream the assistant's reply to `message` after `history` (a list of role/content messages).",
        concurrency_limit=chat_concurrency,
        concurrency_id=CHAT_CONCURRENCY_ID,
    )

    submitted = [ui.message.submit, ui.send.click]
    reply = gr.on(
        submitted,
        handlers.add_user_message,
        inputs=[ui.message, ui.chatbot],
        outputs=[ui.message, ui.chatbot],
        api_visibility="private",
        queue=False,
    ).success(
        handlers.respond,
        inputs=[ui.chatbot, ui.system_prompt, *sliders],
        outputs=[ui.chatbot],
        api_visibility="private",
        concurrency_limit=chat_concurrency,
        concurrency_id=CHAT_CONCURRENCY_ID,
    )
    # Cancelling the event closes the handler's stream, which cancels the request inside the engine.
    ui.stop.click(None, None, None, cancels=[reply], api_visibility="private")
