"""Tiny random models with real tokenizers, saved as ordinary transformers folders (for tests and benchmarks).

`build_tiny_model(folder, "gpt2")` gives a base model with no pad token and no chat template (the loader must set
pad = eos); `build_tiny_model(folder, "llama")` gives a chat model with a pad token and a ChatML template like
SmolLM2's. Both take well under a second to build and load; their weights are random but deterministic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TinyKind = Literal["gpt2", "llama"]

VOCAB_SIZE = 400
SEED = 1234
# Larger than the usual 0.02, with untied embeddings: a random model's greedy text then depends on its whole context
# instead of echoing the last token, so batching bugs (padding, positions, cache merging) change the output.
INIT_RANGE = 0.2

TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model can still tell a story, one token at a time, if the
tokenizer knows how to split the words. Every morning the baker opens the shop, lights the oven and bakes bread for
the people of the town. They come early, before work, and the smell of fresh bread fills the street.

Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of Italy. The river flows
through the city, under old bridges, past the market where farmers sell apples, cheese and flowers.

What is the weather like today? It is sunny and warm, with a light wind from the west. Tomorrow it may rain, so take
an umbrella when you go out. The children play in the park while their parents talk on the benches.

Hello world! This is a test of the serving engine. It batches many requests together and streams their text back as
soon as each new token is ready. Short requests should not wait behind long ones; they join the running batch.

User: Can you help me write a short poem about the sea?
Assistant: Of course. The sea is wide, the sea is deep, it sings the sailors into sleep.
User: Thank you, that is lovely.
Assistant: You are welcome. Would you like another one about the mountains?
"""

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS: dict[str, dict[str, str]] = {
    "gpt2": {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
    "llama": {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "pad_token": "<pad>", "unk_token": "<unk>"},
}


def build_tokenizer(kind: TinyKind) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on TRAINING_TEXT: every byte is in the alphabet, so any text (emoji, CJK) encodes."""
    specials = list(dict.fromkeys(SPECIAL_TOKENS[kind].values()))
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([TRAINING_TEXT], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS[kind])
    if kind == "llama":
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_model(folder: Path, kind: TinyKind) -> Path:
    """Build a 2-layer random `kind` model and its tokenizer, save both into `folder`, and return `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(kind)
    vocab = len(tokenizer)
    eos_id = tokenizer.eos_token_id
    torch.manual_seed(SEED)
    if kind == "gpt2":
        gpt2_config = GPT2Config(
            vocab_size=vocab,
            n_positions=256,
            n_embd=64,
            n_layer=2,
            n_head=4,
            initializer_range=INIT_RANGE,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=eos_id,
        )
        model: GPT2LMHeadModel | LlamaForCausalLM = GPT2LMHeadModel(gpt2_config)
    elif kind == "llama":
        llama_config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=eos_id,
            pad_token_id=tokenizer.pad_token_id,
            initializer_range=INIT_RANGE,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(llama_config)
    else:  # pragma: no cover - guarded by the Literal
        raise ValueError(f"unknown tiny model kind {kind!r}")
    model.generation_config.eos_token_id = eos_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


if __name__ == "__main__":  # pragma: no cover - manual use: python -m tests.tiny_models OUT_DIR [gpt2|llama]
    import sys

    out = build_tiny_model(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "llama")  # type: ignore[arg-type]
    print(out)
