"""Shared fixtures: the shipped tokenizer, a tiny seeded KnobVLM and a few val samples."""

import pytest
import torch

from knoblib.assets import load_samples
from knoblib.data import load_tokenizer

# The test models are tiny: one intra-op thread is as fast as two on an idle machine, and
# on a busy one (training alongside) two threads spin-wait and run ~100x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _latency_cache(tmp_path_factory):
    """Per-machine latency tables go to a folder of this test session, never to the user's cache,
    and the default table is the shipped one. Set in the environment, so notebooks executed
    by papermill inherit it."""
    import os

    settings = {
        "KNOBLIB_CACHE_DIR": str(tmp_path_factory.mktemp("knoblib-cache")),
        # The shipped table by default: a test's numbers must not depend on this machine's
        # speed. Calibration itself is tested with a synthetic clock (test_calibration.py).
        "KNOBLIB_LATENCY_TABLE": "shipped",
    }
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same torch RNG state."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_config():
    """The sizes of ``tiny_vlm``: 8 blocks, 8 experts, top-4, width 32."""
    from knoblib.vlm import VLMConfig

    return VLMConfig(
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


@pytest.fixture(scope="session")
def tiny_vlm(tokenizer, tiny_config):
    """A randomly initialised (seeded) 8-block, 8-expert, top-4 VLM. Do not modify: deep-copy first."""
    from knoblib.vlm import KnobVLM

    return KnobVLM.from_config(tiny_config, tokenizer, seed=0)


@pytest.fixture(scope="module")
def peaky_vlm(tiny_vlm):
    """A deep copy of the tiny model with larger seeded weights, one per test module.

    Random initialisation gives degenerate greedy tokens and flat routing; these weights
    make the greedy answers vary and the router's top-k matter, so comparisons mean something.
    """
    import copy
    import math

    model = copy.deepcopy(tiny_vlm)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.model.named_parameters():
            if param.dim() < 2:
                continue
            std = 1.0 if "embed_tokens" in name else 1.0 / math.sqrt(param.shape[-1])
            if "gate.weight" in name or "lm_head" in name:
                std *= 4  # peakier routing and logits: top-k and argmax margins matter
            param.copy_(torch.randn(param.shape, generator=gen) * std)
    return model


@pytest.fixture(scope="session")
def prefill_logits():
    """A function ``(vlm, images, questions, knobs)`` -> the executor's logits (B, V) at the last
    prompt position (one prefill built from the executor's pieces, no cache); ``knobs`` is one
    ``KnobConfig`` or one per row."""
    from knoblib.knobs import KnobConfig

    @torch.no_grad()
    def logits(vlm, images, questions, knobs):
        plan = vlm.plan([knobs] * len(images) if isinstance(knobs, KnobConfig) else knobs)
        inputs = vlm.build_inputs(images, questions, plan.tiers)
        embeds = vlm.embed(inputs["input_ids"], inputs["pixel_values"])
        mask = inputs["attention_mask"]
        position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        hidden, _ = vlm.forward_blocks(embeds, mask, position_ids, plan)
        return vlm.logits(hidden[:, -1])

    return logits


@pytest.fixture(scope="session")
def samples():
    """The first eight samples of the shipped val split."""
    return load_samples("val", 8)


@pytest.fixture(scope="session")
def notebook_results(tmp_path_factory):
    """A function that runs a tutorial notebook (by name) in smoke mode through papermill, once per
    session, and returns (results dict, seconds, path of the executed notebook).

    The kernel is the venv's (``knoblib``), the working directory the notebook's folder,
    each cell has a timeout, and MPLBACKEND is unset so figures are kept.
    """
    import json

    from knoblib.tutorial import NOTEBOOK_DIR, execute

    out_dir = tmp_path_factory.mktemp("notebooks")
    results_dir = out_dir / "results"
    results_dir.mkdir()
    cache = {}

    def run(name: str):
        if name not in cache:
            seconds = execute(NOTEBOOK_DIR / f"{name}.ipynb", out_dir / f"{name}.ipynb", True, results_dir, timeout_s=300)
            results = json.loads((results_dir / f"{name}.json").read_text())
            cache[name] = (results, seconds, out_dir / f"{name}.ipynb")
        return cache[name]

    return run


# --- the notebook tests (tests/test_nbXX.py): each module names its notebook in NOTEBOOK ---
@pytest.fixture(scope="module")
def run(request, notebook_results):
    """The module's notebook (its ``NOTEBOOK``, e.g. ``"04_grpo_update"``) in smoke mode.

    Returns (results dict, seconds, path of the executed notebook).
    """
    return notebook_results(request.module.NOTEBOOK)


@pytest.fixture(scope="module")
def results(run):
    """The numbers the module's notebook wrote to its results JSON."""
    return run[0]


@pytest.fixture(scope="module")
def outputs(run):
    """Every code-cell output of the module's executed notebook."""
    import nbformat

    notebook = nbformat.read(str(run[2]), as_version=4)
    return [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]


@pytest.fixture(scope="module")
def figures(outputs):
    """How many figures (PNG outputs) the module's executed notebook kept."""
    return sum("image/png" in out.get("data", {}) for out in outputs)


@pytest.fixture(scope="module")
def table(tiny_vlm):
    """A hand-built latency table over the tiny VLM's space: work-proportional numbers, so the
    tests that use it (GRPO, devices, variants) do not depend on timing. A module may define its own."""
    from knoblib.latency import LatencyTable

    space = tiny_vlm.knob_space
    tier_cost = {"low": 10.0, "medium": 20.0, "high": 35.0}
    latency = {
        k: tier_cost[k.tier] + 4.0 * k.num_active_blocks + 2.0 * k.top_k * (space.num_layers - k.insertion_position)
        for k in space
    }
    return LatencyTable(latency_ms=latency, knob_space=space.as_dict())


@pytest.fixture(scope="module")
def pool():
    """24 seeded training-like requests (a module may define its own)."""
    from knoblib.data import generate_split

    return generate_split(24, seed=123)
