"""The int4 decoder layer in one call (inference/kernels/decode_layer.cpp, fast_llama.Q4DecoderLayer): the numbers of
the layer it replaces, a row's bits the same alone and in any padded batch, TorchScript and eager alike."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from inference.fast_llama import LlamaDecoder
from inference.quantization import Float16Linear, Q4Linear
from tests.test_fast_llama import assert_groups_decode_as_alone, decode_groups

pytestmark = pytest.mark.usefixtures("own_kernels")

GROUPS = [[[5, 6, 7], [8, 9, 10]], [[30, 31, 32, 33, 34, 35, 36]], [[12, 13, 14, 15, 16], [40, 41, 42, 43, 44]]]


@pytest.fixture(scope="module")
def llama(tiny_llama_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def q4_decoder(llama: PreTrainedModel, compiled: bool = True, one_call_layers: bool = True) -> LlamaDecoder:
    return LlamaDecoder(
        llama,
        lambda weight, bias, name: Q4Linear(weight),
        compiled=compiled,
        attention_kernel=True,
        one_call_layers=one_call_layers,
    )


def layer_kind(decoder: LlamaDecoder) -> str:
    layer = decoder.layers[0]
    return str(getattr(layer, "original_name", type(layer).__name__))  # scripted: the class's name there


@pytest.mark.parametrize("compiled", [True, False], ids=["torchscript", "eager"])
def test_int4_layers_with_our_attention_decode_in_one_call_bit_for_bit_alone_and_in_a_padded_batch(
    llama: PreTrainedModel, compiled: bool
) -> None:
    decoder = q4_decoder(llama, compiled)
    assert layer_kind(decoder) == "Q4DecoderLayer"
    assert_groups_decode_as_alone(decoder, GROUPS)


def test_the_one_call_computes_what_the_layer_of_torch_ops_does(llama: PreTrainedModel) -> None:
    fused = decode_groups(q4_decoder(llama), GROUPS, steps=6)
    torch_ops = q4_decoder(llama, one_call_layers=False)
    assert layer_kind(torch_ops) == "DecoderLayer"
    for ours, theirs in zip(fused, decode_groups(torch_ops, GROUPS, steps=6), strict=True):
        # the same weights and kernels; only the float order of norms, rotary and sums differs in the last bits,
        # which can move an activation's 16-bit rounding by one level (the logits by ~1e-4 of their spread)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-3 * float(theirs.std()))
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_torchscript_and_eager_give_the_same_bits(llama: PreTrainedModel) -> None:
    scripted = decode_groups(q4_decoder(llama, compiled=True), GROUPS, steps=4)
    eager = decode_groups(q4_decoder(llama, compiled=False), GROUPS, steps=4)
    for one, other in zip(scripted, eager, strict=True):
        assert torch.equal(one, other)


@pytest.mark.parametrize("threads", [1, 3])
def test_a_rows_bits_do_not_depend_on_how_many_threads_split_the_layer(llama: PreTrainedModel, threads: int) -> None:
    """The layer is one parallel region that splits rows, tiles and heads by the thread count (TORCH_THREADS)."""
    decoder = q4_decoder(llama)
    usual = decode_groups(decoder, GROUPS, steps=4)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        other = decode_groups(decoder, GROUPS, steps=4)
    finally:
        torch.set_num_threads(before)
    for one, another in zip(usual, other, strict=True):
        assert torch.equal(one, another)


def test_bad_starts_and_mismatched_weights_raise_before_any_thread_starts(llama: PreTrainedModel) -> None:
    layer = q4_decoder(llama, compiled=False).layers[0]
    hidden, rotary = torch.randn(2, 64), torch.randn(2, 2, 16)
    keys = torch.zeros(2, 2, 8, 16, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="start"):
        layer(hidden, rotary, [], torch.tensor([0, 5]), keys, keys.clone(), 0, 3)  # a row starting after the column
    layer.weights = layer.weights[3:6] + layer.weights[0:3] + layer.weights[6:]  # q/k/v and output swapped
    with pytest.raises(RuntimeError, match="projection"):
        layer(hidden, rotary, [], torch.tensor([0, 0]), keys, keys.clone(), 0, 3)


def test_layers_other_than_int4_keep_the_layer_of_torch_ops(llama: PreTrainedModel) -> None:
    decoder = LlamaDecoder(
        llama, lambda weight, bias, name: Float16Linear(weight, bias), compiled=False, attention_kernel=True
    )
    assert layer_kind(decoder) == "DecoderLayer"
    assert decoder.step.rotary_pairs is False


def test_bad_arguments_raise_instead_of_writing_outside_the_cache(llama: PreTrainedModel) -> None:
    layer = q4_decoder(llama, compiled=False).layers[0]
    hidden, rotary = torch.randn(2, 64), torch.randn(2, 2, 16)
    keys = torch.zeros(2, 2, 8, 16, dtype=torch.float16)
    starts = torch.tensor([0, 0])
    with pytest.raises(RuntimeError, match="column"):
        layer(hidden, rotary, [], starts, keys, keys.clone(), 0, 8)  # one past the last column
    with pytest.raises(RuntimeError, match="rotary"):
        layer(hidden, rotary[:, :1], [], starts, keys, keys.clone(), 0, 3)
    with pytest.raises(RuntimeError, match="one shape"):
        layer(hidden, rotary, [], starts, keys, keys[:1].clone(), 0, 3)  # a values buffer with fewer rows
    with pytest.raises(RuntimeError, match="rows"):
        layer(torch.randn(3, 64), torch.randn(3, 2, 16), [], torch.tensor([0, 0, 0]), keys, keys.clone(), 0, 3)
