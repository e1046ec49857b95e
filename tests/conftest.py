"""Shared fixtures: the shipped tokenizer, a tiny seeded KnobVLM and a few val samples."""

import pytest
import torch

from knoblib.data import data_path, load_split, load_tokenizer, split_path

# The test models are tiny: one intra-op thread is as fast as two on an idle machine, and
# on a busy one (training alongside) two threads spin-wait and run ~100x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same torch RNG state."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_vlm(tokenizer):
    """A randomly initialised (seeded) 8-block, 8-expert, top-4 VLM. Do not modify: deep-copy first."""
    from knoblib.vlm import KnobVLM, VLMConfig

    config = VLMConfig(
        hidden_size=32,
        num_layers=8,
        num_heads=2,
        num_experts=8,
        default_top_k=4,
        expert_intermediate_size=32,
        vision_hidden_size=32,
        vision_layers=1,
        vision_heads=2,
        vision_intermediate_size=32,
    )
    return KnobVLM.from_config(config, tokenizer, seed=0)


@pytest.fixture(scope="session")
def samples():
    """The first eight samples of the shipped val split."""
    return load_split(split_path(data_path("vqa"), "val"))[:8]
