"""The lean Llama forward computes what transformers' forward computes, in prefill and in a padded running batch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from inference import batch as batching
from inference.decoders import TransformersDecoder
from inference.fast_llama import LlamaDecoder, supports


@pytest.fixture(scope="module")
def llama(tiny_llama_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def test_llama_is_supported_and_gpt2_is_not(llama: PreTrainedModel, tiny_gpt2_dir: Path) -> None:
    assert supports(llama)
    assert not supports(AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir))


@pytest.mark.parametrize("compiled", [True, False], ids=["torchscript", "eager"])
def test_prefill_matches_transformers(llama: PreTrainedModel, compiled: bool) -> None:
    prompts = [[5, 6, 7, 8, 9], [20, 21, 22, 23, 24]]
    _, expected = batching.prefill(TransformersDecoder(llama), prompts)
    _, logits = LlamaDecoder(llama, compiled=compiled).prefill(prompts)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_prefill_can_return_every_positions_logits(llama: PreTrainedModel) -> None:
    ids = [[5, 6, 7, 8, 9, 10]]
    with torch.inference_mode():
        expected = llama(torch.tensor(ids)).logits
    logits = LlamaDecoder(llama).logits(torch.tensor(ids))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


Step = Callable[[batching.RunningBatch], torch.Tensor]


def greedy_rows(
    prompts: list[list[int]], prefill: Callable[..., tuple[object, torch.Tensor]], step: Step
) -> list[list[int]]:
    """Prompts of different lengths join one running batch a step apart (so rows are padded differently); every
    row then decodes greedily for 12 steps."""
    batch = batching.RunningBatch(max_rows=8)
    tokens: list[list[int]] = [[] for _ in prompts]
    for joined, prompt in enumerate(prompts):
        cache, logits = prefill([prompt])
        mask, positions = torch.ones(1, len(prompt), dtype=torch.long), torch.tensor([[len(prompt)]])
        batch.add(batching.Prefilled(cache, mask, positions), logits.argmax(-1, keepdim=True))  # type: ignore[arg-type]
        tokens[joined].append(int(logits.argmax()))
        for row, token in enumerate(step(batch).argmax(-1).tolist()):
            tokens[row].append(token)
        batch.next_tokens = torch.tensor([[row[-1]] for row in tokens[: joined + 1]])
    for _ in range(12):
        for row, token in enumerate(step(batch).argmax(-1).tolist()):
            tokens[row].append(token)
        batch.next_tokens = torch.tensor([[row[-1]] for row in tokens])
    return tokens


@pytest.mark.parametrize("compiled", [True, False], ids=["torchscript", "eager"])
def test_decoding_a_padded_batch_matches_transformers(llama: PreTrainedModel, compiled: bool) -> None:
    prompts = [[5, 6, 7], [30, 31, 32, 33, 34, 35, 36], [12, 13, 14, 15, 16]]
    decoder = LlamaDecoder(llama, compiled=compiled)
    assert isinstance(decoder.step, torch.jit.ScriptModule) == compiled

    def hf_prefill(prompts: list[list[int]]) -> tuple[object, torch.Tensor]:
        prefilled, logits = batching.prefill(TransformersDecoder(llama), prompts)
        return prefilled.cache, logits

    expected = greedy_rows(prompts, hf_prefill, lambda batch: batch.step(TransformersDecoder(llama)))
    assert greedy_rows(prompts, decoder.prefill, lambda batch: batch.step(decoder)) == expected


def test_torchscript_and_eager_give_the_same_logits_in_a_padded_batch(llama: PreTrainedModel) -> None:
    prompts = [[5, 6, 7], [30, 31, 32, 33, 34, 35, 36]]
    logits: dict[bool, list[torch.Tensor]] = {}
    for compiled in (True, False):
        decoder = LlamaDecoder(llama, compiled=compiled)
        steps: list[torch.Tensor] = []
        greedy_rows(prompts, decoder.prefill, lambda batch, d=decoder, s=steps: s.append(batch.step(d)) or s[-1])
        logits[compiled] = steps
    for scripted, eager in zip(logits[True], logits[False], strict=True):
        torch.testing.assert_close(scripted, eager, rtol=1e-5, atol=1e-5)
