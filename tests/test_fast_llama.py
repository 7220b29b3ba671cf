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
from inference.quantization import Int8Linear, fbgemm_available


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


def row_logits(decoder: LlamaDecoder, prompts: list[list[int]], steps: int) -> list[list[torch.Tensor]]:
    """As `greedy_rows`, but every row's logits at every step it took part in; `steps` more after the last joins."""
    batch = batching.RunningBatch(max_rows=8)
    seen: list[list[torch.Tensor]] = [[] for _ in prompts]
    latest: list[int] = []

    def step() -> None:
        logits = batch.step(decoder)
        for row in range(len(latest)):
            seen[row].append(logits[row].clone())
            latest[row] = int(logits[row].argmax())
        batch.next_tokens = torch.tensor([[token] for token in latest])

    for prompt in prompts:
        cache, logits = decoder.prefill([prompt])
        mask, positions = torch.ones(1, len(prompt), dtype=torch.long), torch.tensor([[len(prompt)]])
        batch.add(batching.Prefilled(cache, mask, positions), logits.argmax(-1, keepdim=True))
        latest.append(int(logits.argmax()))
        step()
    for _ in range(steps):
        step()
    return seen


@pytest.mark.skipif(not fbgemm_available(), reason="int8 layers need fbgemm (an x86 CPU with AVX2)")
@pytest.mark.parametrize("compiled", [True, False], ids=["torchscript", "eager"])
def test_a_row_decodes_bit_for_bit_alone_and_in_a_padded_batch(llama: PreTrainedModel, compiled: bool) -> None:
    """With layers whose rows don't depend on each other (int8 with per-row scales, its LM head too), a row's logits
    in a padded batch are its logits alone, bit for bit: each row attends over its own keys only. Attending over
    the batch's padded width changed the last bits of the sums, which quantized activations (int8, int4) turned into
    other tokens: 4 of 16 greedy texts were the same alone and batched in int8, 12 of 16 in int4 (docs)."""
    decoder = LlamaDecoder(llama, lambda weight, bias, name: Int8Linear(weight, bias, None), compiled=compiled)
    prompts = [[5, 6, 7], [30, 31, 32, 33, 34, 35, 36], [12, 13, 14, 15, 16]]
    batched = row_logits(decoder, prompts, steps=8)
    for row, prompt in enumerate(prompts):
        (alone,) = row_logits(decoder, [prompt], steps=len(prompts) - row - 1 + 8)
        assert len(alone) == len(batched[row])
        for step, (by_itself, in_batch) in enumerate(zip(alone, batched[row], strict=True)):
            assert torch.equal(by_itself, in_batch), f"row {row} differs at step {step}"


def decode_together(decoder: LlamaDecoder, rows: list[list[int]], steps: int) -> list[torch.Tensor]:
    """Prefill same-length prompts in one pass (no padding), then `steps` greedy decode steps; each step's logits."""
    return decode_groups(decoder, [rows], steps)


def decode_groups(decoder: LlamaDecoder, groups: list[list[list[int]]], steps: int) -> list[torch.Tensor]:
    """Prefill each group of same-length prompts in one pass and let them join in turn (groups of different lengths
    make a padded batch), then `steps` greedy decode steps; each step's logits, rows in the groups' order."""
    batch = batching.RunningBatch(max_rows=sum(len(group) for group in groups))
    for group in groups:
        prefilled, logits = batching.prefill(decoder, group)
        batch.add(prefilled, logits.argmax(-1, keepdim=True))
    seen = []
    for _ in range(steps):
        logits = batch.step(decoder)
        seen.append(logits.clone())
        batch.next_tokens = logits.argmax(-1, keepdim=True)
    return seen


def assert_rows_decode_as_alone(decoder: LlamaDecoder, prompts: list[list[int]], steps: int = 6) -> None:
    assert_groups_decode_as_alone(decoder, [prompts], steps)


def assert_groups_decode_as_alone(decoder: LlamaDecoder, groups: list[list[list[int]]], steps: int = 6) -> None:
    """Every row of `decode_groups` has, at every step, the logits its prompt has decoded alone, bit for bit."""
    together = decode_groups(decoder, groups, steps)
    for row, prompt in enumerate(prompt for group in groups for prompt in group):
        alone = decode_together(decoder, [prompt], steps)
        for step in range(steps):
            assert torch.equal(alone[step][0], together[step][row]), f"row {row} differs at step {step}"


@pytest.mark.skipif(not fbgemm_available(), reason="int8 layers need fbgemm (an x86 CPU with AVX2)")
def test_rows_of_one_length_decode_bit_for_bit_as_they_do_alone(llama: PreTrainedModel) -> None:
    """The unpadded path (every row the same length, one prefill) keeps each row's numbers its own as well."""
    decoder = LlamaDecoder(llama, lambda weight, bias, name: Int8Linear(weight, bias, None))
    assert_rows_decode_as_alone(decoder, [[5, 6, 7, 8], [30, 31, 32, 33], [12, 13, 14, 15]])


@pytest.mark.skipif(not fbgemm_available(), reason="int8 layers need fbgemm (an x86 CPU with AVX2)")
@pytest.mark.parametrize("compiled", [True, False], ids=["torchscript", "eager"])
def test_runs_of_rows_of_one_length_in_a_padded_batch_decode_bit_for_bit_as_alone(
    llama: PreTrainedModel, compiled: bool
) -> None:
    """A padded batch attends run by run, a run being consecutive rows of one length (they share their padding), as
    an unpadded batch does: every row's logits are still its logits alone, whether its run has one row or more."""
    decoder = LlamaDecoder(llama, lambda weight, bias, name: Int8Linear(weight, bias, None), compiled=compiled)
    # rows joining in groups of one length: runs of 2, 1 and 2 rows
    groups = [[[5, 6, 7], [8, 9, 10]], [[30, 31, 32, 33, 34, 35, 36]], [[12, 13, 14, 15, 16], [40, 41, 42, 43, 44]]]
    assert_groups_decode_as_alone(decoder, groups)
