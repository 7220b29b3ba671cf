"""Wiring the playground: every public event has a name; helpers are private; concurrency is set on purpose.

Public: `/generate` (batched completion) and `/chat` (streaming reply). Everything else is the playground's own and
`api_visibility="private"`. Quick bookkeeping steps (adding a message, undo, presets) skip the queue; whatever runs
the model goes through it, so Gradio shows the queue position while a request waits.
"""

from __future__ import annotations

from typing import Any, cast

import gradio as gr
from gradio.events import Dependency

from inference.settings import Settings
from ui.handlers import PRESET_KNOBS, Handlers
from ui.layout import Playground

# Gradio batches of /generate that may sit in the engine at once. With two, one batch decodes while the next
# gathers in Gradio's queue, and the engine's continuous batching merges them; more would only bypass Gradio's
# batching without adding throughput (the engine caps the running batch anyway).
GENERATE_CONCURRENCY = 2
# Every streaming event (the public /chat, the playground's chat and completion) is one row of the engine's batch:
# together they may run as many as the batch holds; the rest wait in Gradio's queue, which shows their position.
CHAT_CONCURRENCY_ID = "chat"
PRIVATE = "private"


def wire(ui: Playground, handlers: Handlers, settings: Settings) -> None:
    quick: dict[str, Any] = {"api_visibility": PRIVATE, "queue": False}
    streaming: dict[str, Any] = {"concurrency_limit": settings.max_batch_size, "concurrency_id": CHAT_CONCURRENCY_ID}

    # ----- public endpoints ---------------------------------------------------------------------------------------
    ui.api_generate.click(
        handlers.generate,
        inputs=[ui.prompt, ui.max_length, ui.temperature, ui.top_p, ui.top_k],
        outputs=[ui.completion],
        api_name="generate",
        api_description="Continue a prompt (plain text, no chat template). Batched with other waiting requests.",
        # Each call is judged alone as it joins the queue, so bad input is refused before it can share a batch; the
        # handler then takes the values as sent (no component preprocessing, which would turn 42 into "42").
        validator=handlers.validate_generate,
        preprocess=False,
        batch=True,
        max_batch_size=settings.max_batch_size,
        concurrency_limit=GENERATE_CONCURRENCY,
    )
    gr.api(
        handlers.chat,
        api_name="chat",
        api_description="Stream the assistant's reply to `message` after `history` (a list of role/content messages).",
        **streaming,
    )

    # ----- chat ---------------------------------------------------------------------------------------------------
    turn_outputs = [ui.message, ui.chatbot, ui.chat_stats, ui.reply_progress]

    def reply_after(start: Dependency) -> Dependency:
        """Stream the model's reply once `start` has put the user's turn into the conversation."""
        reply = start.success(
            handlers.respond,
            inputs={ui.chatbot, ui.system_prompt, *ui.sampling_inputs},
            outputs=[ui.chatbot, ui.chat_stats, ui.message, ui.reply_progress],
            api_visibility=PRIVATE,
            show_progress="minimal",
            show_progress_on=[ui.chatbot],
            **streaming,
        )
        # However the reply ended (done, stopped or failed) the box takes input again. Gradio 6.31's page runs `.then`
        # listeners after success and cancellation but not after an error, hence `.failure` too.
        ended: dict[str, Any] = {
            "fn": handlers.reply_ended,
            "inputs": [ui.reply_progress],
            "outputs": [ui.message, ui.chat_stats, ui.reply_progress],
        }
        reply.then(**ended, **quick)
        reply.failure(**ended, **quick)
        return reply

    replies = [
        reply_after(
            gr.on(
                [ui.message.submit, ui.send.click],
                handlers.add_user_message,
                [ui.message, ui.chatbot],
                turn_outputs,
                **quick,
            )
        ),
        reply_after(
            gr.on([ui.regenerate.click, ui.chatbot.retry], handlers.regenerate, [ui.chatbot], turn_outputs, **quick)
        ),
        reply_after(ui.chatbot.edit(handlers.edit, [ui.chatbot], turn_outputs, **quick)),
        reply_after(ui.chatbot.example_select(handlers.use_example, [ui.chatbot], turn_outputs, **quick)),
    ]
    # Cancelling a reply closes the handler's stream, which cancels the request inside the engine: Stop frees the
    # model at once, and so do Undo and Clear when they interrupt a reply.
    # Gradio's annotation says dicts; `cancels` takes the listeners' Dependency objects, as its docs show
    ui.stop.click(None, None, None, cancels=replies, **quick)  # type: ignore[arg-type]
    gr.on(
        [ui.undo.click, ui.chatbot.undo],
        handlers.undo,
        [ui.chatbot],
        [ui.chatbot, ui.message, ui.chat_stats],
        cancels=replies,
        **quick,
    )
    gr.on(
        [ui.clear.click, ui.chatbot.clear],
        handlers.clear,
        None,
        [ui.chatbot, ui.message, ui.chat_stats],
        cancels=replies,
        **quick,
    )

    # ----- completion ---------------------------------------------------------------------------------------------
    completion = ui.complete.click(
        handlers.complete,
        inputs={ui.prompt, *ui.sampling_inputs},
        outputs=[ui.completion, ui.completion_stats, ui.completion_progress],
        api_visibility=PRIVATE,
        show_progress="minimal",
        show_progress_on=[ui.completion],
        **streaming,
    )
    completion_ended = [ui.completion_stats, ui.completion_progress]
    completion.then(handlers.completion_ended, [ui.completion_progress], completion_ended, **quick)
    completion.failure(handlers.completion_ended, [ui.completion_progress], completion_ended, **quick)
    ui.stop_completion.click(None, None, None, cancels=[completion], **quick)

    # ----- parameters ---------------------------------------------------------------------------------------------
    preset_sliders = [cast(gr.Slider, ui.knobs[knob]) for knob in PRESET_KNOBS]
    ui.preset.input(handlers.preset, [ui.preset], preset_sliders, **quick)
    # Moving a slider by hand leaves the preset: none is selected any more.
    gr.on(
        [slider.input for slider in preset_sliders],
        handlers.leave_preset,
        None,
        [ui.preset],
        **quick,
    )

    # ----- model panel --------------------------------------------------------------------------------------------
    ui.refresh_model_info.click(handlers.model_info, None, [ui.model_info, ui.model_info_json], **quick)
