"""Drawing the playground: components only, no events (those are wired in ui/events.py).

Every component the tests or the CSS reach has an `elem_id`. The theme uses system fonts only, so the page loads
nothing from the internet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from inference.params import knob_range
from inference.settings import Settings

# The sliders show the useful part of a knob's range (inference/params.py has the whole of it).
TOP_P_SLIDER_MIN = 0.05
TOP_K_SLIDER_MAX = min(200, int(knob_range("top_k")[1]))
REPETITION_PENALTY_SLIDER_MIN = 0.5
REPETITION_PENALTY_SLIDER_MAX = min(2.0, knob_range("repetition_penalty")[1])
PRESET_NAMES = ("precise", "balanced", "creative")
EXAMPLES = (
    "Explain what a large language model is in two sentences.",
    "Write a haiku about the sea.",
    "Give me three ideas for a rainy Sunday.",
    "What is the capital of France?",
)

# Passed to `gr.mount_gradio_app` (the mount ignores a theme given to `gr.Blocks`).
THEME = gr.themes.Default(
    primary_hue="indigo",
    font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
)
CSS = """
.stats { min-height: 1.6em; font-size: var(--text-sm); color: var(--body-text-color-subdued); }
.stats p { margin: 0; }
#header p { color: var(--body-text-color-subdued); margin-top: 0; }
#message_row { align-items: flex-end; }
#message_row, #chat_actions { flex-wrap: nowrap; }
#model_info table { width: 100%; }
@media (max-width: 640px) {
  .gradio-container { padding-left: 6px !important; padding-right: 6px !important; }
  #chatbot { height: 360px !important; }
}
"""


@dataclass
class Playground:
    # chat
    chatbot: gr.Chatbot
    chat_stats: gr.Markdown
    # How far the reply on its way has got (ui.handlers.ReplyProgress): what the stats line says if it is stopped.
    reply_progress: gr.State
    message: gr.Textbox
    send: gr.Button
    stop: gr.Button
    regenerate: gr.Button
    undo: gr.Button
    clear: gr.Button
    system_prompt: gr.Textbox
    # completion
    prompt: gr.Textbox
    complete: gr.Button
    stop_completion: gr.Button
    completion: gr.Textbox
    completion_stats: gr.Markdown
    completion_progress: gr.State
    api_generate: gr.Button
    # model
    model_info: gr.Markdown
    model_info_json: gr.JSON
    refresh_model_info: gr.Button
    # parameters
    preset: gr.Radio
    temperature: gr.Slider
    top_p: gr.Slider
    top_k: gr.Slider
    max_length: gr.Slider
    repetition_penalty: gr.Slider
    seed: gr.Number
    stop_strings: gr.Textbox
    json_schema: gr.Textbox

    @property
    def sampling_inputs(self) -> set[gr.components.Component]:
        """What a chat reply or a completion is sampled by: the knobs, and the JSON schema it must follow."""
        return {*self.knobs.values(), self.json_schema}

    @property
    def knobs(self) -> dict[str, gr.components.Component]:
        """The sampling inputs of the playground's chat and completion, by knob name (inference/params.py): the one
        place where a slider meets its knob."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_length,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
            "stop": self.stop_strings,
        }

    def knob_values(self, inputs: dict[gr.components.Component, Any]) -> dict[str, Any]:
        """The knobs' values, by knob name, out of an event's inputs (given as a set, they arrive as a dict)."""
        return {knob: inputs[component] for knob, component in self.knobs.items()}


def draw_parameters(settings: Settings) -> tuple[gr.Slider, gr.Slider, gr.Slider, gr.Slider]:
    temperature = gr.Slider(
        *knob_range("temperature"),
        value=settings.default_temperature,
        step=0.05,
        label="temperature",
        info="0 = greedy (always the likeliest token)",
        elem_id="temperature",
    )
    top_p = gr.Slider(
        TOP_P_SLIDER_MIN,
        knob_range("top_p")[1],
        value=settings.default_top_p,
        step=0.01,
        label="top_p",
        info="1 = off",
        elem_id="top_p",
    )
    top_k = gr.Slider(
        knob_range("top_k")[0],
        TOP_K_SLIDER_MAX,
        value=min(settings.default_top_k, TOP_K_SLIDER_MAX),
        step=1,
        label="top_k",
        info="0 = off",
        elem_id="top_k",
    )
    max_length = gr.Slider(
        knob_range("max_new_tokens")[0],
        settings.max_new_tokens,
        value=min(settings.default_max_new_tokens, settings.max_new_tokens),
        step=1,
        label="max_length",
        info="most new tokens",
        elem_id="max_length",
    )
    return temperature, top_p, top_k, max_length


def draw_advanced(settings: Settings) -> tuple[gr.Slider, gr.Number, gr.Textbox, gr.Textbox]:
    repetition_penalty = gr.Slider(
        REPETITION_PENALTY_SLIDER_MIN,
        REPETITION_PENALTY_SLIDER_MAX,
        value=1.0,
        step=0.05,
        label="repetition penalty",
        info="1 = off; above 1 discourages repeating tokens",
        elem_id="repetition_penalty",
    )
    seed = gr.Number(
        value=None,
        precision=0,
        minimum=knob_range("seed")[0],
        label="seed",
        placeholder="random",
        info="empty = random; a seed makes sampling repeatable",
        elem_id="seed",
    )
    stop_strings = gr.Textbox(
        label="stop strings",
        lines=2,
        max_lines=settings.max_stop_sequences or 1,
        elem_id="stop_strings",
        info=f"one per line, at most {settings.max_stop_sequences}; type \\n for a newline",
    )
    json_schema = gr.Textbox(
        label="JSON schema",
        lines=3,
        max_lines=12,
        placeholder='{"type": "object", "properties": {"answer": {"type": "string"}}}',
        info="the reply follows this schema: valid JSON every time; empty = free text",
        elem_id="json_schema",
    )
    return repetition_penalty, seed, stop_strings, json_schema


def draw(settings: Settings) -> Playground:
    gr.Markdown(
        f"# LLM playground\nServing `{settings.model_id}` · API: `/generate`, `/chat`, REST and `/docs`",
        elem_id="header",
    )
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=320):
            with gr.Tab("Chat", elem_id="chat_tab"):
                chatbot = gr.Chatbot(
                    label="Conversation",
                    show_label=False,
                    height=460,
                    buttons=["copy", "copy_all"],
                    editable="user",
                    examples=[{"text": text} for text in EXAMPLES],
                    elem_id="chatbot",
                    placeholder="**Chat with the model.** Pick an example or type below; replies stream in.",
                )
                chat_stats = gr.Markdown(elem_id="chat_stats", elem_classes="stats")
                reply_progress = gr.State()
                with gr.Row(elem_id="message_row"):
                    message = gr.Textbox(
                        placeholder="Type a message (Enter sends, Shift+Enter: new line)",
                        show_label=False,
                        lines=1,
                        max_lines=8,
                        scale=6,
                        min_width=120,
                        container=False,
                        elem_id="message",
                    )
                    send = gr.Button("Send", variant="primary", scale=1, min_width=64, elem_id="send")
                    stop = gr.Button("Stop", variant="stop", scale=1, min_width=64, elem_id="stop")
                with gr.Row(elem_id="chat_actions"):
                    regenerate = gr.Button("↻ Regenerate", size="sm", min_width=0, elem_id="regenerate")
                    undo = gr.Button("↶ Undo", size="sm", min_width=0, elem_id="undo")
                    clear = gr.Button("✕ Clear", size="sm", min_width=0, elem_id="clear")
                system_prompt = gr.Textbox(
                    label="System prompt",
                    lines=2,
                    placeholder="e.g. You are a helpful assistant. Answer briefly.",
                    elem_id="system_prompt",
                )
            with gr.Tab("Completion", elem_id="completion_tab"):
                prompt = gr.Textbox(
                    label="Prompt",
                    lines=6,
                    placeholder="Text for the model to continue (no chat template)",
                    elem_id="prompt",
                )
                with gr.Row():
                    complete = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop_completion = gr.Button("Stop", variant="stop", elem_id="stop_completion")
                completion = gr.Textbox(label="Completion", lines=8, buttons=["copy"], elem_id="completion")
                completion_stats = gr.Markdown(elem_id="completion_stats", elem_classes="stats")
                completion_progress = gr.State()
                # What the public, batched `/generate` endpoint hangs on: the box above streams through its own event.
                api_generate = gr.Button(visible=False, elem_id="api_generate")
            with gr.Tab("Model", elem_id="model_tab"):
                model_info = gr.Markdown("Loading…", elem_id="model_info")
                refresh_model_info = gr.Button("Refresh", size="sm", elem_id="refresh_model_info")
                with gr.Accordion("Raw /model-info", open=False):
                    model_info_json = gr.JSON(show_label=False, elem_id="model_info_json")
        with gr.Column(scale=1, min_width=260):
            gr.Markdown("### Parameters")
            preset = gr.Radio(
                list(PRESET_NAMES),
                value="balanced",
                label="Preset",
                info="sets the sliders below",
                elem_id="preset",
            )
            temperature, top_p, top_k, max_length = draw_parameters(settings)
            with gr.Accordion("Advanced", open=False, elem_id="advanced"):
                repetition_penalty, seed, stop_strings, json_schema = draw_advanced(settings)
    return Playground(
        chatbot=chatbot,
        chat_stats=chat_stats,
        reply_progress=reply_progress,
        message=message,
        send=send,
        stop=stop,
        regenerate=regenerate,
        undo=undo,
        clear=clear,
        system_prompt=system_prompt,
        prompt=prompt,
        complete=complete,
        stop_completion=stop_completion,
        completion=completion,
        completion_stats=completion_stats,
        completion_progress=completion_progress,
        api_generate=api_generate,
        model_info=model_info,
        model_info_json=model_info_json,
        refresh_model_info=refresh_model_info,
        preset=preset,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_length=max_length,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop_strings=stop_strings,
        json_schema=json_schema,
    )
