"""knoblib.experts: the expert ablations are exact against transformers models edited by hand."""

import copy
import math

import pytest
import torch

from knoblib.data import FAMILIES
from knoblib.experts import expert_ablation, expert_override, router_mass
from knoblib.knobs import KnobConfig

ATOL, RTOL = 1e-4, 1e-4


@pytest.fixture(scope="module")
def vlm(peaky_vlm):
    """The tiny model with larger seeded weights (peaky routing, conftest)."""
    return peaky_vlm


@pytest.fixture(scope="module")
def batch(samples):
    rows = [samples[i] for i in (2, 5, 6)]
    return [s.image() for s in rows], [s.question for s in rows]


def full_p1(vlm):
    return KnobConfig("high", 1, vlm.default_top_k, vlm.num_layers)


@torch.no_grad()
def hf_logits(model, vlm, images, questions):
    inputs = vlm.build_inputs(images, questions, ["high"] * len(images))
    return model(**inputs).logits[:, -1]


def edited_copy(vlm):
    model = copy.deepcopy(vlm.model)
    for layer in model.model.language_model.layers:
        layer.mlp.gate._forward_hooks.clear()
    return model


def assert_no_hooks(vlm):
    for layer in vlm.layers:
        assert not layer.mlp._forward_hooks and not layer.mlp.gate._forward_pre_hooks
        assert not layer.mlp.gate._forward_hooks
        assert layer.mlp.gate.top_k == vlm.default_top_k


def test_top_1_equals_routers_set_to_one_by_hand(vlm, batch, prefill_logits):
    images, questions = batch
    model = edited_copy(vlm)
    for layer in model.model.language_model.layers[1:]:
        layer.mlp.gate.top_k = 1
    with expert_override(vlm, top_k=1):
        got = prefill_logits(vlm, images, questions, full_p1(vlm))
    torch.testing.assert_close(got, hf_logits(model, vlm, images, questions), atol=ATOL, rtol=RTOL)
    assert not torch.allclose(got, prefill_logits(vlm, images, questions, full_p1(vlm)), atol=1e-3)
    assert_no_hooks(vlm)


def test_removed_experts_equal_zeroed_expert_weights(vlm, batch, prefill_logits):
    images, questions = batch
    model = edited_copy(vlm)
    with torch.no_grad():
        for layer in model.model.language_model.layers[1:]:
            layer.mlp.experts.down_proj.zero_()
    with expert_override(vlm, remove_experts=True):
        got = prefill_logits(vlm, images, questions, full_p1(vlm))
    torch.testing.assert_close(got, hf_logits(model, vlm, images, questions), atol=ATOL, rtol=RTOL)
    assert_no_hooks(vlm)


def test_drop_strongest_equals_its_expert_zeroed_per_token(vlm, batch, prefill_logits):
    """Without the strongest expert, the block sums the other top-k experts with their own weights."""
    images, questions = batch
    k0 = vlm.default_top_k
    with expert_override(vlm, top_k=k0, drop_strongest=True):
        got = prefill_logits(vlm, images, questions, full_p1(vlm))
    # By hand: a router hook that zeroes the first (largest) of the sorted top-k weights.
    model = edited_copy(vlm)

    def zero_first(router, args, output):
        logits, scores, indices = output
        scores = scores.clone()
        scores[:, 0] = 0
        return logits, scores, indices

    for layer in model.model.language_model.layers[1:]:
        layer.mlp.gate.register_forward_hook(zero_first)
    torch.testing.assert_close(got, hf_logits(model, vlm, images, questions), atol=ATOL, rtol=RTOL)
    assert_no_hooks(vlm)


def test_override_removes_its_hooks_on_errors(vlm, batch):
    images, questions = batch
    with pytest.raises(RuntimeError, match="boom"):
        with expert_override(vlm, top_k=1):
            raise RuntimeError("boom")
    assert_no_hooks(vlm)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"top_k": 0}, "top_k=0 is invalid"),
        ({"top_k": 99}, "top_k=99 is invalid"),
        ({"top_k": 2, "remove_experts": True}, "remove_experts"),
        ({"drop_strongest": True}, "drop_strongest needs top_k >= 2"),
        ({"top_k": 1, "drop_strongest": True}, "drop_strongest needs top_k >= 2"),
        ({"top_k": 1, "first_block": 8}, "first_block=8 is invalid"),
    ],
)
def test_bad_overrides_raise(vlm, kwargs, match):
    with pytest.raises(ValueError, match=match):
        with expert_override(vlm, **kwargs):
            pass
    assert_no_hooks(vlm)


def test_router_mass_is_a_sorted_distribution(vlm, samples):
    mass = router_mass(vlm, samples[:4])
    by_rank = mass["by_rank"]
    assert len(by_rank) == vlm.layers[0].mlp.gate.num_experts
    assert all(a >= b for a, b in zip(by_rank, by_rank[1:]))
    assert math.isclose(sum(by_rank), 1.0, rel_tol=1e-5)
    kept = mass["kept"]
    assert all(kept[k] < kept[k + 1] for k in range(1, len(by_rank)))
    assert math.isclose(kept[len(by_rank)], 1.0, rel_tol=1e-5)
    assert mass["tokens"] > 0
    assert_no_hooks(vlm)
    with pytest.raises(ValueError, match="at least one sample"):
        router_mass(vlm, [])


def test_expert_ablation_rows(vlm, samples):
    result = expert_ablation(vlm, samples[:6])
    names = [row["name"] for row in result["rows"]]
    k0 = vlm.default_top_k
    options = sorted(vlm.knob_space.top_k_options, reverse=True)
    assert names[: len(options)] == [f"top_k={k}" + (" (default)" if k == k0 else "") for k in options]
    assert names[len(options):] == [
        "top_k=1 (outside the knob space)",
        f"top_k={k0} without the strongest expert",
        "no experts in blocks >= 1",
    ]
    assert [row["experts"] for row in result["rows"]] == [*options, 1, k0 - 1, 0]
    for row in result["rows"]:
        acc = row["accuracy"]
        assert set(acc) == {"all", *FAMILIES}
        assert all(0.0 <= acc[f] <= 1.0 for f in {"all"} | {s.family for s in samples[:6]})
    assert_no_hooks(vlm)
    with pytest.raises(ValueError, match="at least one sample"):
        expert_ablation(vlm, [])


def test_cli_writes_the_table(tmp_path, capsys):
    from knoblib.__main__ import main

    out = tmp_path / "ablation.json"
    main(["expert-ablation", "--n", "12", "--out", str(out)])
    import json

    saved = json.loads(out.read_text())
    assert saved["n"] == 12 and saved["split"] == "test"
    assert [row["experts"] for row in saved["rows"]][-1] == 0
    assert "router probability kept" in capsys.readouterr().out
