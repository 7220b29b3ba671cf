"""Our kernels' weights moved onto huge pages (inference/huge_pages.py): the same values and bits, one aligned mapping,
a shared tensor copied once, and the loader moving a served int4 decoder's weights."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from inference.fast_llama import LlamaDecoder
from inference.huge_pages import HUGE_PAGE, LINE, move_to_huge_pages
from inference.loader import load_model
from inference.quantization import Q4Linear, Q8Linear
from tests.conftest import SettingsFactory
from tests.test_decode_layer import GROUPS
from tests.test_fast_llama import decode_groups

THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.fixture(scope="module")
def llama(tiny_llama_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def kernel_decoder(llama: PreTrainedModel) -> LlamaDecoder:
    """int4 layers and an 8-bit head, as QUANTIZATION=int4 serves SmolLM2."""
    return LlamaDecoder(
        llama,
        lambda weight, bias, name: Q8Linear(weight) if name == "lm_head" else Q4Linear(weight),
        attention_kernel=True,
    )


def test_moved_tensors_keep_their_values_in_one_mapping_that_starts_on_a_huge_page() -> None:
    torch.manual_seed(0)
    packed = torch.randint(0, 256, (3, 5, 16), dtype=torch.uint8)
    scales = torch.randn(7, 3).half()
    same_memory = packed.view(15, 16)  # another tensor over the same bytes, as a tied head and its rows are
    before = [packed.clone(), scales.clone()]
    moved = move_to_huge_pages([packed, scales, same_memory])
    assert moved == 4 * LINE + LINE  # 240 bytes in 4 lines, then 42 in one: the shared bytes are copied once
    assert torch.equal(packed, before[0])
    assert torch.equal(scales, before[1])
    assert packed.data_ptr() % HUGE_PAGE == 0
    assert scales.data_ptr() == packed.data_ptr() + 256  # the next cache line after the first tensor's 240 bytes
    assert same_memory.data_ptr() == packed.data_ptr()
    assert torch.equal(same_memory, before[0].view(15, 16))


def test_only_contiguous_cpu_tensors_move() -> None:
    with pytest.raises(ValueError, match="contiguous CPU"):
        move_to_huge_pages([torch.zeros(4, 4).t()])


def test_a_decoder_decodes_the_same_bits_from_its_moved_weights(own_kernels: None, llama: PreTrainedModel) -> None:
    decoder = kernel_decoder(llama)
    weights = decoder.kernel_weights()
    layers = llama.config.num_hidden_layers
    assert len(weights) == layers * 4 * 3 + 2  # 4 projections of 3 tensors a layer; the head's levels and scales
    before = decode_groups(decoder, GROUPS, steps=4)
    addresses = [tensor.data_ptr() for tensor in weights]
    assert move_to_huge_pages(weights) >= sum(tensor.numel() * tensor.element_size() for tensor in weights)
    assert all(tensor.data_ptr() != address for tensor, address in zip(weights, addresses, strict=True))
    # the scripted step reads the moved copies: same bits as before
    for ours, theirs in zip(decode_groups(decoder, GROUPS, steps=4), before, strict=True):
        assert torch.equal(ours, theirs)


def test_float32_weights_are_not_our_kernels_and_stay_where_they_are(llama: PreTrainedModel) -> None:
    assert LlamaDecoder(llama).kernel_weights() == []


@pytest.mark.skipif(
    not THP_SETTING.exists() or "[never]" in THP_SETTING.read_text(), reason="this OS has transparent huge pages off"
)
def test_the_mapping_is_eligible_for_huge_pages_where_the_os_has_them() -> None:
    weights = torch.ones(2 * HUGE_PAGE, dtype=torch.uint8)
    move_to_huge_pages([weights])
    start = weights.data_ptr()
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text()):
        low, high = (int(bound, 16) for bound in block.split()[0].split("-"))
        if low <= start < high:
            assert re.search(r"^THPeligible:\s+1$", block, re.MULTILINE), block
            return
    pytest.fail("the moved weights are in no mapping of this process")


def test_the_loader_moves_a_served_int4_decoders_weights(
    own_kernels: None, tiny_llama_dir: Path, make_settings: SettingsFactory
) -> None:
    loaded = load_model(make_settings(tiny_llama_dir, quantization="int4"))
    assert isinstance(loaded.decoder, LlamaDecoder)
    weights = loaded.decoder.kernel_weights()
    assert weights
    assert weights[0].data_ptr() % HUGE_PAGE == 0
