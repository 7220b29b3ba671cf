"""Drawing the playground: components only, no events (those are wired in ui/events.py)."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from inference.params import MAX_REPETITION_PENALTY, MAX_TEMPERATURE
from inference.settings import Settings

TOP_K_SLIDER_MAX = 200


@dataclass
class Playground:
    chatbot: gr.Chatbot
    message: gr.Textbox
    send: gr.Button
    stop: gr.Button
    clear: gr.ClearButton
    system_prompt: gr.Textbox
    prompt: gr.Textbox
    complete: gr.Button
    completion: gr.Textbox
    temperature: gr.Slider
    top_p: gr.Slider
    top_k: gr.Slider
    max_length: gr.Slider
    model_info: gr.JSON


def draw_parameters(settings: Settings) -> tuple[gr.Slider, gr.Slider, gr.Slider, gr.Slider]:
    temperature = gr.Slider(
        0, MAX_TEMPERATURE, value=settings.default_temperature, step=0.05, label="temperature",
        info="0 = greedy (always the likeliest token)", elem_id="temperature",
    )  # fmt: skip
    top_p = gr.Slider(0.05, 1, value=settings.default_top_p, step=0.05, label="top_p", elem_id="top_p")
    top_k = gr.Slider(
        0, TOP_K_SLIDER_MAX, value=min(settings.default_top_k, TOP_K_SLIDER_MAX), step=1, label="top_k",
        info="0 = off", elem_id="top_k",
    )  # fmt: skip
    max_length = gr.Slider(
        1, settings.max_new_tokens, value=min(settings.default_max_new_tokens, settings.max_new_tokens), step=1,
        label="max_length", info="most new tokens", elem_id="max_length",
    )  # fmt: skip
    return temperature, top_p, top_k, max_length


def draw(settings: Settings) -> Playground:
    gr.Markdown(f"# LLM playground\nServing `{settings.model_id}` · API: `/generate`, `/chat`, REST and `/docs`")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            with gr.Tab("Chat"):
                chatbot = gr.Chatbot(label="Conversation", height=420, buttons=["copy"], elem_id="chatbot")
                message = gr.Textbox(
                    placeholder="Message the model (Enter to send)", show_label=False, lines=1, elem_id="message"
                )
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    clear = gr.ClearButton([message, chatbot], value="Clear", elem_id="clear")
                system_prompt = gr.Textbox(label="System prompt", lines=2, elem_id="system_prompt")
            with gr.Tab("Completion"):
                prompt = gr.Textbox(label="Prompt", lines=6, elem_id="prompt")
                complete = gr.Button("Generate", variant="primary", elem_id="generate")
                completion = gr.Textbox(label="Completion", lines=8, elem_id="completion")
            with gr.Tab("Model"):
                model_info = gr.JSON(label="/model-info", elem_id="model_info")
        with gr.Column(scale=1, min_width=240):
            gr.Markdown("### Parameters")
            temperature, top_p, top_k, max_length = draw_parameters(settings)
            gr.Markdown(
                f"repetition penalty up to {MAX_REPETITION_PENALTY:g}, seed and stop strings: see the REST API."
            )
    return Playground(
        chatbot, message, send, stop, clear, system_prompt, prompt, complete, completion,
        temperature, top_p, top_k, max_length, model_info,
    )  # fmt: skip
