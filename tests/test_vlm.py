"""The knob executor is exact: each knob is checked against transformers itself.

A randomly initialised model gives degenerate greedy tokens, so the tests run on a
deep copy of the session's tiny model with larger, seeded weights (conftest's
``peaky_vlm``) and compare both the greedy token sequences and the last-position prefill logits.
"""

import contextlib
import copy
import json
import math

import pytest
import torch

from knoblib.knobs import KnobConfig
from knoblib.vlm import (
    KNOBLIB_CONFIG_NAME,
    GenerationOutput,
    KnobVLM,
    VLMConfig,
    make_crops,
    tier_num_crops,
)
from transformers import LlavaForConditionalGeneration

N_NEW = 4
ATOL = 1e-5
RTOL = 1e-4


# --- fixtures and helpers ----------------------------------------------------------
@pytest.fixture(scope="module")
def vlm(peaky_vlm):
    """The tiny model with larger seeded weights (conftest), so greedy answers vary."""
    return peaky_vlm


@pytest.fixture(scope="module")
def batch(samples):
    """Three rows whose questions have different lengths (so left padding matters).

    Val samples 2, 5, 6 (binding, count, color; 8, 9 and 6 words): the greedy tokens of
    the seeded model vary for them, which the comparisons below need.
    """
    rows = [samples[i] for i in (2, 5, 6)]
    assert len({len(s.question.split()) for s in rows}) == 3, [s.question for s in rows]
    return [s.image() for s in rows], [s.question for s in rows]


def _row_knobs(vlm, knobs, batch_size):
    knobs = vlm.knob_space.full() if knobs is None else knobs
    return [knobs] * batch_size if isinstance(knobs, KnobConfig) else list(knobs)


@torch.no_grad()
def executor_logits(vlm, images, questions, knobs=None, probe_embeddings=None):
    """The executor's prefill logits (B, V) for the last prompt position, built from its pieces."""
    plan = vlm.plan(_row_knobs(vlm, knobs, len(images)))
    inputs = vlm.build_inputs(images, questions, plan.tiers)
    embeds = vlm.embed(inputs["input_ids"], inputs["pixel_values"])
    mask = inputs["attention_mask"]
    probe_index, last = None, -1
    if probe_embeddings is not None:
        embeds = torch.cat([embeds, probe_embeddings[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(len(images), 1)], dim=1)
        probe_index, last = embeds.shape[1] - 1, -2
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    hidden, _ = vlm.forward_blocks(embeds, mask, position_ids, plan, None, probe_index=probe_index)
    return vlm.logits(hidden[:, last])


@torch.no_grad()
def hf_generate(model, inputs, max_new_tokens=N_NEW):
    """Greedy new tokens (B, T) and the raw logits of every step (B, T, V) from transformers' ``generate``."""
    out = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits, dim=1)


@contextlib.contextmanager
def recording_logits(vlm):
    """Record the logits ``vlm.generate`` computes: prefill, then one entry per decode step."""
    steps = []

    def record(hidden):
        out = type(vlm).logits(vlm, hidden)
        steps.append(out.detach().clone())
        return out

    vlm.logits = record
    try:
        yield steps
    finally:
        del vlm.logits


def generate_with_logits(vlm, *args, **kwargs):
    """``vlm.generate`` plus the logits of every step it took (B, T, V)."""
    return answer_with_logits(vlm, vlm.generate, *args, **kwargs)


def answer_with_logits(vlm, method, *args, **kwargs):
    """``method(*args, **kwargs)``, a ``vlm`` answering method, plus the logits of every step it took (B, T, V)."""
    with recording_logits(vlm) as steps:
        out = method(*args, **kwargs)
    assert len(steps) == out.sequences.shape[1]
    return out, torch.stack(steps, dim=1)


@torch.no_grad()
def hf_last_logits(model, inputs):
    return model(**inputs).logits[:, -1]


def plain_hf_model(model):
    """A deep copy of a transformers model with the executor's router hooks removed."""
    model = copy.deepcopy(model)
    for layer in model.model.language_model.layers:
        layer.mlp.gate._forward_hooks.clear()
    return model


def without_layers(model, dropped):
    """A transformers model with ``dropped`` decoder layers physically removed."""
    model = plain_hf_model(model)
    lm = model.model.language_model
    kept = [layer for i, layer in enumerate(lm.layers) if i not in set(dropped)]
    lm.layers = torch.nn.ModuleList(kept)
    model.config.text_config.num_hidden_layers = len(kept)
    # The cache is indexed by layer_idx: kept layers must be numbered 0..n-1.
    for new_idx, layer in enumerate(kept):
        layer.self_attn.layer_idx = new_idx
    return model


def with_top_k(vlm, insertion_position, top_k):
    """A transformers model built with ``num_experts_per_tok = top_k``, blocks < p back at the default."""
    config = copy.deepcopy(vlm.model.config)
    config.text_config.num_experts_per_tok = top_k
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.load_state_dict(vlm.model.state_dict())
    for idx, layer in enumerate(model.model.language_model.layers):
        expected = vlm.default_top_k if idx < insertion_position else top_k
        if idx < insertion_position:
            layer.mlp.gate.top_k = vlm.default_top_k
        assert layer.mlp.gate.top_k == expected
    return model


@torch.no_grad()
def uncached_greedy(vlm, images, questions, knobs, max_new_tokens=N_NEW):
    """Greedy decoding that re-runs the whole sequence through the block loop each step, no cache."""
    plan = vlm.plan(_row_knobs(vlm, knobs, len(images)))
    inputs = vlm.build_inputs(images, questions, plan.tiers)
    embeds = vlm.embed(inputs["input_ids"], inputs["pixel_values"])
    mask = inputs["attention_mask"]
    eos, pad = vlm.tokenizer.eos_token_id, vlm.tokenizer.pad_token_id
    unfinished = torch.ones(len(images), dtype=torch.bool)
    tokens, step_logits = [], []
    for _ in range(max_new_tokens):
        position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        hidden, _ = vlm.forward_blocks(embeds, mask, position_ids, plan, cache=None)
        step_logits.append(vlm.logits(hidden[:, -1]))
        token = step_logits[-1].argmax(-1)
        token = torch.where(unfinished, token, torch.full_like(token, pad))
        tokens.append(token)
        unfinished &= token != eos
        if not bool(unfinished.any()):
            break
        embeds = torch.cat([embeds, vlm.input_embeddings(token[:, None])], dim=1)
        mask = torch.cat([mask, mask.new_ones(len(images), 1)], dim=1)
    return torch.stack(tokens, dim=1), torch.stack(step_logits, dim=1)


def assert_not_degenerate(sequences):
    """The comparison means something only if the greedy tokens vary."""
    assert len(set(sequences.flatten().tolist())) >= 3, sequences


# --- 1. the full configuration is transformers' own generate ----------------------
def test_full_configuration_matches_transformers_generate(vlm, batch):
    images, questions = batch
    inputs = vlm.build_inputs(images, questions, ["high"] * 3)
    lengths = inputs["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == 3  # left padding is exercised
    out, step_logits = generate_with_logits(vlm, images, questions, knobs=None, max_new_tokens=N_NEW)
    assert isinstance(out, GenerationOutput)
    expected, expected_logits = hf_generate(vlm.model, inputs)
    assert_not_degenerate(expected)
    assert torch.equal(out.sequences, expected)
    torch.testing.assert_close(step_logits, expected_logits, atol=ATOL, rtol=RTOL)
    assert out.knobs == [vlm.knob_space.full()] * 3
    assert torch.equal(out.num_prompt_tokens, lengths)
    assert out.latency_tokens is None
    assert len(out.answers) == 3 and all(isinstance(a, str) for a in out.answers)
    torch.testing.assert_close(
        executor_logits(vlm, images, questions), hf_last_logits(vlm.model, inputs), atol=ATOL, rtol=RTOL
    )


# --- 2. skipping blocks is a model with those layers removed ----------------------
@pytest.mark.parametrize("p, n", [(1, 6), (2, 7)])
def test_skipped_blocks_match_model_without_those_layers(vlm, batch, p, n):
    images, questions = batch
    dropped = vlm.dropped_blocks(p, n)
    assert len(dropped) == vlm.num_layers - n
    # Without a ranking, the latest blocks count as least important.
    assert dropped == list(range(n, vlm.num_layers))
    _check_against_removed(vlm, images, questions, KnobConfig("high", p, vlm.default_top_k, n), dropped)


def test_skipped_blocks_follow_block_importance(vlm, batch):
    images, questions = batch
    ranked = copy.deepcopy(vlm)
    # Block 0 is the least important but never dropped; block 1 next, then 2.
    ranked.set_block_importance([0.0, 0.05, 0.1, 3.0, 0.2, 4.0, 6.0, 7.0])
    assert ranked.dropped_blocks(1, 6) == [1, 2]
    assert ranked.dropped_blocks(2, 7) == [2]  # block 1 < p is never dropped
    assert ranked.dropped_blocks(2, 6) == [2, 4]
    assert ranked.dropped_blocks(3, 8) == []
    assert ranked.run_mask(1, 6).tolist() == [True, False, False, True, True, True, True, True]
    # The kept layers are 0, 3..7: renumbering their layer_idx matters here.
    _check_against_removed(ranked, images, questions, KnobConfig("high", 1, ranked.default_top_k, 6), [1, 2])


def _check_against_removed(vlm, images, questions, knobs, dropped):
    reference = without_layers(vlm.model, dropped)
    assert len(reference.model.language_model.layers) == knobs.num_active_blocks
    inputs = vlm.build_inputs(images, questions, [knobs.tier] * len(images))
    out, step_logits = generate_with_logits(vlm, images, questions, knobs, max_new_tokens=N_NEW)
    expected, expected_logits = hf_generate(reference, inputs)
    assert_not_degenerate(expected)
    assert torch.equal(out.sequences, expected)
    torch.testing.assert_close(step_logits, expected_logits, atol=ATOL, rtol=RTOL)
    assert out.knobs == [knobs] * len(images)
    logits = executor_logits(vlm, images, questions, knobs)
    torch.testing.assert_close(logits, hf_last_logits(reference, inputs), atol=ATOL, rtol=RTOL)
    # ...and skipping really changed the computation.
    assert not torch.allclose(logits, executor_logits(vlm, images, questions), atol=1e-3)


def test_dropped_blocks_rejects_too_many(vlm):
    with pytest.raises(ValueError, match="num_active_blocks"):
        vlm.dropped_blocks(7, 6)


# --- 3. router top-k is a model built with that num_experts_per_tok ---------------
@pytest.mark.parametrize("p, k", [(1, 2), (3, 3)])
def test_top_k_matches_model_built_with_that_top_k(vlm, batch, p, k):
    images, questions = batch
    knobs = KnobConfig("high", p, k, vlm.num_layers)
    reference = with_top_k(vlm, p, k)
    inputs = vlm.build_inputs(images, questions, ["high"] * 3)
    out, step_logits = generate_with_logits(vlm, images, questions, knobs, max_new_tokens=N_NEW)
    expected, expected_logits = hf_generate(reference, inputs)
    assert_not_degenerate(expected)
    assert torch.equal(out.sequences, expected)
    torch.testing.assert_close(step_logits, expected_logits, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(
        executor_logits(vlm, images, questions, knobs), hf_last_logits(reference, inputs), atol=ATOL, rtol=RTOL
    )


def test_router_top_k_attribute_is_what_changes_the_computation(vlm, batch):
    images, questions = batch
    inputs = vlm.build_inputs(images, questions, ["high"] * 3)
    model = plain_hf_model(vlm.model)
    default = hf_last_logits(model, inputs)
    for layer in model.model.language_model.layers:
        layer.mlp.gate.top_k = 2
    reduced = hf_last_logits(model, inputs)
    assert not torch.allclose(default, reduced, atol=1e-3)
    # The executor's k=2 agrees with the router attribute set by hand (p=1: block 0 keeps k0).
    model.model.language_model.layers[0].mlp.gate.top_k = vlm.default_top_k
    torch.testing.assert_close(
        executor_logits(vlm, images, questions, KnobConfig("high", 1, 2, vlm.num_layers)),
        hf_last_logits(model, inputs),
        atol=ATOL,
        rtol=RTOL,
    )
    # The executor leaves every router at the default afterwards.
    assert all(layer.mlp.gate.top_k == vlm.default_top_k for layer in vlm.layers)


# --- 4. cached decoding equals re-running the whole sequence -----------------------
@pytest.mark.parametrize(
    "knobs",
    [
        None,
        KnobConfig("high", 1, 2, 6),
        KnobConfig("low", 2, 3, 7),
        KnobConfig("medium", 3, 4, 8),
        "mixed",
    ],
    ids=["full", "high-p1-k2-b6", "low-p2-k3-b7", "medium-p3-k4-b8", "mixed"],
)
def test_cached_decode_equals_uncached(vlm, samples, knobs):
    rows = samples[:3]
    images, questions = [s.image() for s in rows], [s.question for s in rows]
    if knobs == "mixed":
        knobs = [KnobConfig("low", 1, 2, 6), KnobConfig("high", 2, 4, 8), KnobConfig("medium", 1, 3, 7)]
    out, step_logits = generate_with_logits(vlm, images, questions, knobs, max_new_tokens=N_NEW)
    expected, expected_logits = uncached_greedy(vlm, images, questions, knobs)
    assert_not_degenerate(expected)
    assert torch.equal(out.sequences, expected)
    torch.testing.assert_close(step_logits, expected_logits, atol=ATOL, rtol=RTOL)


# --- 5. per-row knobs in one batch equal separate runs ------------------------------
def test_per_row_knobs_equal_separate_runs(vlm, samples):
    rows = samples[:4]
    images, questions = [s.image() for s in rows], [s.question for s in rows]
    knobs = [
        KnobConfig("high", 1, 2, 6),
        KnobConfig("low", 3, 4, 8),
        KnobConfig("medium", 2, 3, 7),
        KnobConfig("high", 1, 4, 8),
    ]
    out, step_logits = generate_with_logits(vlm, images, questions, knobs, max_new_tokens=N_NEW)
    assert out.knobs == knobs
    batch_logits = executor_logits(vlm, images, questions, knobs)
    for i in range(4):
        alone, alone_logits = generate_with_logits(vlm, [images[i]], [questions[i]], knobs[i], max_new_tokens=N_NEW)
        width = alone.sequences.shape[1]
        assert torch.equal(out.sequences[i, :width], alone.sequences[0])
        torch.testing.assert_close(step_logits[i, :width], alone_logits[0], atol=ATOL, rtol=RTOL)
        # A row that stopped early is padded while the others continue.
        assert bool((out.sequences[i, width:] == vlm.tokenizer.pad_token_id).all())
        assert out.answers[i] == alone.answers[0]
        single = executor_logits(vlm, [images[i]], [questions[i]], knobs[i])
        torch.testing.assert_close(batch_logits[i : i + 1], single, atol=ATOL, rtol=RTOL)
    assert_not_degenerate(out.sequences)


# --- 6. the probe token leaves answers unchanged -------------------------------------
def test_probe_leaves_answers_unchanged(vlm, batch):
    images, questions = batch
    probe = torch.randn(3, vlm.hidden_size)
    knobs = [KnobConfig("high", 1, 2, 6), KnobConfig("medium", 2, 3, 7), KnobConfig("low", 3, 4, 8)]
    plain, plain_logits = generate_with_logits(vlm, images, questions, knobs, max_new_tokens=N_NEW)
    probed, probed_logits = generate_with_logits(
        vlm, images, questions, knobs, max_new_tokens=N_NEW, probe_embeddings=probe
    )
    assert torch.equal(plain.sequences, probed.sequences)
    # Every step, decode steps included: the probe is gone from the cache after prefill.
    torch.testing.assert_close(probed_logits, plain_logits, atol=ATOL, rtol=RTOL)
    assert torch.equal(plain.num_prompt_tokens, probed.num_prompt_tokens)
    assert probed.latency_tokens.shape == (3, vlm.hidden_size)
    assert torch.isfinite(probed.latency_tokens).all()
    torch.testing.assert_close(
        executor_logits(vlm, images, questions, knobs, probe_embeddings=probe),
        executor_logits(vlm, images, questions, knobs),
        atol=ATOL,
        rtol=RTOL,
    )


def test_partial_forward_gives_the_latency_tokens_of_generate(vlm, batch):
    images, questions = batch
    probe = torch.randn(3, vlm.hidden_size)
    knobs = [KnobConfig("high", 1, 2, 6), KnobConfig("medium", 2, 3, 7), KnobConfig("low", 3, 4, 8)]
    stage1 = [(k.tier, k.insertion_position) for k in knobs]
    full = vlm.generate(images, questions, knobs, max_new_tokens=1, probe_embeddings=probe).latency_tokens
    partial = vlm.partial_forward(images, questions, stage1, probe)
    assert partial.shape == (3, vlm.hidden_size)
    torch.testing.assert_close(partial, full, atol=ATOL, rtol=RTOL)
    # The latency token reflects the probe and the insertion position.
    other_probe = vlm.partial_forward(images, questions, stage1, torch.randn(3, vlm.hidden_size))
    assert not torch.allclose(other_probe, partial, atol=1e-3)
    shifted = vlm.partial_forward(images, questions, [(t, p % 3 + 1) for t, p in stage1], probe)
    for i in range(3):
        assert not torch.allclose(shifted[i], partial[i], atol=1e-3)
    # Stage-2 knobs (top_k, blocks >= p) do not affect a latency token read before block p.
    other_stage2 = [KnobConfig("high", 1, 4, 8), KnobConfig("medium", 2, 2, 8), KnobConfig("low", 3, 2, 8)]
    again = vlm.generate(images, questions, other_stage2, max_new_tokens=1, probe_embeddings=probe).latency_tokens
    torch.testing.assert_close(again, full, atol=ATOL, rtol=RTOL)


# --- 7. resumable Mode A --------------------------------------------------------------
def test_resumable_mode_a_equals_full_knob_configs(vlm, samples):
    rows = samples[:4]
    images, questions = [s.image() for s in rows], [s.question for s in rows]
    knobs = [
        KnobConfig("high", 2, 2, 7),
        KnobConfig("low", 1, 3, 6),
        KnobConfig("medium", 2, 4, 8),
        KnobConfig("high", 3, 2, 8),
    ]
    probe = torch.randn(4, vlm.hidden_size)
    calls = []

    def decide(latency, rows_idx):
        calls.append((latency.clone(), rows_idx.clone()))
        chosen = [knobs[int(r)] for r in rows_idx]
        return [k.top_k for k in chosen], [k.num_active_blocks for k in chosen]

    stage1 = [(k.tier, k.insertion_position) for k in knobs]
    out, step_logits = generate_with_logits(
        vlm, images, questions, stage1=stage1, probe_embeddings=probe, decide=decide, max_new_tokens=N_NEW
    )
    reference, reference_logits = generate_with_logits(
        vlm, images, questions, knobs, max_new_tokens=N_NEW, probe_embeddings=probe
    )
    assert torch.equal(out.sequences, reference.sequences)
    torch.testing.assert_close(step_logits, reference_logits, atol=ATOL, rtol=RTOL)
    assert torch.equal(out.sequences, vlm.generate(images, questions, knobs, max_new_tokens=N_NEW).sequences)
    assert_not_degenerate(out.sequences)
    assert out.knobs == knobs
    torch.testing.assert_close(out.latency_tokens, reference.latency_tokens, atol=ATOL, rtol=RTOL)
    # One call per distinct p, in block order, with that p's rows and their latency tokens.
    assert [c[1].tolist() for c in calls] == [[1], [0, 2], [3]]
    for latency, rows_idx in calls:
        assert latency.shape == (len(rows_idx), vlm.hidden_size)
        torch.testing.assert_close(latency, reference.latency_tokens[rows_idx], atol=ATOL, rtol=RTOL)


def test_resumable_mode_a_validates_decisions(vlm, batch):
    images, questions = batch
    probe = torch.randn(3, vlm.hidden_size)
    stage1 = [("low", 3)] * 3

    def bad(latency, rows_idx):
        return [4] * len(rows_idx), [7] * len(rows_idx)  # p=3 allows only 8 blocks

    with pytest.raises(ValueError, match="num_active_blocks=7"):
        vlm.generate(images, questions, stage1=stage1, probe_embeddings=probe, decide=bad)

    def too_few(latency, rows_idx):
        return [4] * (len(rows_idx) - 1), [8] * len(rows_idx)

    # A decider that answers for fewer rows must not leave the rest silently at the full config.
    with pytest.raises(ValueError, match="decide"):
        vlm.generate(images, questions, stage1=stage1, probe_embeddings=probe, decide=too_few)


# --- 8. the tier changes the work ----------------------------------------------------
def test_tier_sets_crops_and_image_tokens(vlm, samples):
    image = samples[0].image()
    assert VLMConfig().patch_size == vlm.vlm_config.patch_size == 8
    assert vlm.tokens_per_crop == 4  # (16 px crop / patch 8)^2
    expected_crops = {"low": 1, "medium": 5, "high": 10}
    for tier, crops in expected_crops.items():
        assert tier_num_crops(tier) == crops
        cut = make_crops(image, tier)
        assert cut.shape == (crops, 3, 16, 16)
        assert cut.dtype == torch.float32 and cut.min() >= -1 and cut.max() <= 1
        inputs = vlm.build_inputs([image, samples[1].image()], [samples[0].question, samples[1].question], [tier] * 2)
        image_tokens = (inputs["input_ids"] == vlm.image_token_id).sum(1)
        assert image_tokens.tolist() == [crops * vlm.tokens_per_crop] * 2 == [4 * crops] * 2
        assert inputs["pixel_values"].shape == (2 * crops, 3, 16, 16)
    # The global crop is the same view at every tier.
    assert torch.equal(make_crops(image, "low")[0], make_crops(image, "high")[0])
    # Mixed tiers in a batch: each row gets its own crops.
    mixed = vlm.build_inputs([image] * 3, [samples[0].question] * 3, ["low", "medium", "high"])
    assert (mixed["input_ids"] == vlm.image_token_id).sum(1).tolist() == [4, 20, 40]
    assert mixed["pixel_values"].shape[0] == 16
    with pytest.raises(ValueError, match="tier"):
        make_crops(image, "ultra")


def test_prompt_is_bos_image_tokens_then_question(vlm, samples):
    tok = vlm.tokenizer
    short, long = sorted(samples[:8], key=lambda s: len(s.question.split()))[:: len(samples[:8]) - 1]
    assert len(short.question.split()) < len(long.question.split())
    rows = [short, long]
    inputs = vlm.build_inputs(
        [s.image() for s in rows], [s.question for s in rows], ["medium"] * 2, answers=[s.answer for s in rows]
    )
    width = inputs["input_ids"].shape[1]
    for i, s in enumerate(rows):
        question = tok(s.question, add_special_tokens=False)["input_ids"]
        answer = tok(s.answer, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in question + answer
        expected = [tok.bos_token_id] + [vlm.image_token_id] * 20 + question + answer + [tok.eos_token_id]
        pad = width - len(expected)
        assert inputs["input_ids"][i].tolist() == [tok.pad_token_id] * pad + expected  # left padding
        assert inputs["attention_mask"][i].tolist() == [0] * pad + [1] * len(expected)
        labels = [-100] * (pad + 1 + len(question) + 20) + answer + [tok.eos_token_id]
        assert inputs["labels"][i].tolist() == labels
    assert inputs["attention_mask"][1].all()  # the longer question needs no padding
    # Without answers the prompt ends with the question: the answer is generated right after it.
    prompt = vlm.build_inputs([long.image()], [long.question], ["low"])["input_ids"][0].tolist()
    assert prompt[0] == tok.bos_token_id and prompt[1:5] == [vlm.image_token_id] * 4
    assert vlm.tokenizer.decode(prompt[5:]) == long.question


# --- 9. bad inputs raise clear errors -------------------------------------------------
def test_bad_inputs_raise_clear_errors(vlm, batch):
    images, questions = batch
    image, question = images[0], questions[0]
    gen = vlm.generate
    with pytest.raises(ValueError, match=r"shape \(3, 32, 32\)"):
        gen([torch.zeros(3, 32, 32, dtype=torch.uint8)], [question])
    with pytest.raises(ValueError, match="dtype"):
        gen([image.float()], [question])
    with pytest.raises(TypeError, match="torch.Tensor"):
        gen([image.tolist()], [question])
    with pytest.raises(ValueError, match="empty"):
        gen([image], ["   "])
    with pytest.raises(ValueError, match="empty"):
        gen([image], [""])
    with pytest.raises(ValueError, match="batch sizes differ"):
        gen(images[:2], questions[:1])
    with pytest.raises(ValueError, match="empty batch"):
        gen([], [])
    with pytest.raises(ValueError, match="top_k=1"):
        gen([image], [question], KnobConfig("high", 1, 1, 8))
    with pytest.raises(ValueError, match="num_active_blocks=6"):
        gen([image], [question], KnobConfig("high", 2, 4, 6))
    with pytest.raises(ValueError, match="tier"):
        gen([image], [question], KnobConfig("huge", 1, 4, 8))
    with pytest.raises(TypeError, match="KnobConfig"):
        gen([image], [question], [{"tier": "high"}])
    with pytest.raises(ValueError, match="probe_embeddings"):
        gen([image], [question], probe_embeddings=torch.randn(1, vlm.hidden_size + 1))
    with pytest.raises(ValueError, match="probe_embeddings"):
        gen(images, questions, probe_embeddings=torch.randn(2, vlm.hidden_size))
    with pytest.raises(ValueError, match="knob configurations"):
        gen(images, questions, [vlm.knob_space.full()] * 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen([image], [question], max_new_tokens=0)
    probe = torch.randn(1, vlm.hidden_size)
    decide = lambda latency, rows: ([4] * len(rows), [8] * len(rows))  # noqa: E731
    with pytest.raises(ValueError, match="decide"):
        gen([image], [question], stage1=[("high", 1)])
    with pytest.raises(ValueError, match="stage1"):
        gen([image], [question], probe_embeddings=probe, decide=decide)
    with pytest.raises(ValueError, match="knobs"):
        gen([image], [question], vlm.knob_space.full(), stage1=[("high", 1)], probe_embeddings=probe, decide=decide)
    with pytest.raises(ValueError, match="probe_embeddings"):
        gen([image], [question], stage1=[("high", 1)], decide=decide)
    with pytest.raises(ValueError, match="stage1 has 2 rows"):
        gen([image], [question], stage1=[("high", 1)] * 2, probe_embeddings=probe, decide=decide)
    with pytest.raises(ValueError, match="insertion_position=4"):
        gen([image], [question], stage1=[("high", 4)], probe_embeddings=probe, decide=decide)
    with pytest.raises(ValueError, match="probe_embeddings"):
        vlm.partial_forward([image], [question], [("high", 1)], torch.randn(2, vlm.hidden_size))
    with pytest.raises(ValueError, match="block_importance has 3 entries"):
        copy.deepcopy(vlm).set_block_importance([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="NaN"):
        copy.deepcopy(vlm).set_block_importance([float("nan")] * vlm.num_layers)


# --- 10. save / load ---------------------------------------------------------------------
def test_save_and_load_round_trip(vlm, batch, tmp_path):
    images, questions = batch
    ranked = copy.deepcopy(vlm)
    importance = [0.0, 0.05, 0.1, 3.0, 0.2, 4.0, 6.0, 7.0]
    ranked.set_block_importance(importance)
    ranked.save_pretrained(tmp_path)
    assert (tmp_path / KNOBLIB_CONFIG_NAME).is_file()
    loaded = KnobVLM.from_pretrained(tmp_path)
    assert loaded.block_importance == importance
    assert loaded.vlm_config == ranked.vlm_config
    assert loaded.knob_space == ranked.knob_space
    assert loaded.dropped_blocks(1, 6) == [1, 2]
    for knobs in (None, KnobConfig("high", 1, 2, 6)):
        a = ranked.generate(images, questions, knobs, max_new_tokens=N_NEW)
        b = loaded.generate(images, questions, knobs, max_new_tokens=N_NEW)
        assert torch.equal(a.sequences, b.sequences)
        assert a.answers == b.answers
    # Weights are stored in float16 and loaded as float32: close, not bit-equal.
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    torch.testing.assert_close(
        executor_logits(loaded, images, questions), executor_logits(ranked, images, questions), atol=2e-2, rtol=1e-2
    )


def test_from_pretrained_errors(vlm, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=str(empty)):
        KnobVLM.from_pretrained(empty)

    saved = tmp_path / "saved"
    vlm.save_pretrained(saved)
    meta = saved / KNOBLIB_CONFIG_NAME
    good = meta.read_text()
    meta.write_text(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        KnobVLM.from_pretrained(saved)
    meta.write_text(json.dumps({"block_importance": None}))
    with pytest.raises(ValueError, match="corrupt"):
        KnobVLM.from_pretrained(saved)
    meta.write_text(json.dumps({"vlm_config": {"hidden_size": 32, "bogus": 1}}))
    with pytest.raises(ValueError, match="corrupt"):
        KnobVLM.from_pretrained(saved)
    meta.write_text(good)
    assert KnobVLM.from_pretrained(saved).num_layers == vlm.num_layers

    # A tokenizer with a smaller vocabulary than the checkpoint's embedding table.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from knoblib.data import SPECIAL_TOKENS

    vocab = {t: i for i, t in enumerate(list(SPECIAL_TOKENS) + ["what", "color", "red"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    small = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
        extra_special_tokens=["<image>"], padding_side="left",
    )
    assert len(small) != len(vlm.tokenizer)
    small.save_pretrained(saved)
    with pytest.raises(ValueError, match="does not match its tokenizer"):
        KnobVLM.from_pretrained(saved)


# --- 11. the training loss ------------------------------------------------------------------
def test_loss_is_finite_and_gradients_reach_the_right_parameters(vlm, samples):
    model = copy.deepcopy(vlm)
    model.train()
    rows = samples[:3]
    knobs = KnobConfig("low", 2, 3, 7)
    dropped = model.dropped_blocks(2, 7)
    assert dropped == [7]
    loss, stats = model.loss([s.image() for s in rows], [s.question for s in rows], [s.answer for s in rows], knobs)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(stats) == {"ce", "aux"} and math.isfinite(stats["ce"]) and math.isfinite(stats["aux"])
    assert stats["ce"] > 0
    loss.backward()

    def has_grad(module):
        return any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.parameters())

    inner = model.model.model
    assert has_grad(inner.vision_tower)
    assert has_grad(inner.multi_modal_projector)
    for idx, layer in enumerate(model.layers):
        if idx in dropped:
            assert all(p.grad is None or not p.grad.any() for p in layer.parameters()), idx
        else:
            assert has_grad(layer.mlp.experts), idx
            if idx >= knobs.insertion_position:
                assert layer.mlp.gate.weight.grad is not None and layer.mlp.gate.weight.grad.any(), idx
    # Routers are left at the default after the loss.
    assert all(layer.mlp.gate.top_k == model.default_top_k for layer in model.layers)


# --- 12. the entry points: generate dispatches to them --------------------------------------
def test_answer_with_knobs_is_what_generate_runs(vlm, batch):
    images, questions = batch
    knobs = [KnobConfig("high", 1, 2, 6), KnobConfig("medium", 2, 3, 7), KnobConfig("low", 3, 4, 8)]
    probe = torch.randn(3, vlm.hidden_size)
    out, logits = generate_with_logits(vlm, images, questions, knobs, max_new_tokens=N_NEW, probe_embeddings=probe)
    direct, direct_logits = answer_with_logits(
        vlm, vlm.answer_with_knobs, images, questions, knobs, N_NEW, probe_embeddings=probe
    )
    assert torch.equal(direct.sequences, out.sequences) and direct.answers == out.answers
    torch.testing.assert_close(direct_logits, logits, atol=0, rtol=0)
    assert direct.knobs == knobs
    torch.testing.assert_close(direct.latency_tokens, out.latency_tokens, atol=0, rtol=0)
    # The default is the full configuration; min_new_tokens keeps decoding past eos.
    assert vlm.answer_with_knobs(images, questions).knobs == [vlm.knob_space.full()] * 3
    fixed = vlm.answer_with_knobs(images, questions, None, N_NEW, min_new_tokens=N_NEW)
    assert fixed.sequences.shape == (3, N_NEW)


def test_answer_resumable_decides_at_the_pause_and_equals_known_knobs(vlm, samples):
    rows = samples[:3]
    images, questions = [s.image() for s in rows], [s.question for s in rows]
    knobs = [KnobConfig("low", 1, 2, 6), KnobConfig("high", 3, 3, 8), KnobConfig("medium", 2, 4, 7)]
    probe = torch.randn(3, vlm.hidden_size)
    seen = []

    def decide(latency, rows_idx):
        seen.append(rows_idx.tolist())
        return [knobs[r].top_k for r in rows_idx.tolist()], [knobs[r].num_active_blocks for r in rows_idx.tolist()]

    stage1 = [(k.tier, k.insertion_position) for k in knobs]
    out = vlm.answer_resumable(images, questions, stage1, probe, decide, N_NEW)
    assert seen == [[0], [2], [1]]  # in block order: p = 1, 2, 3
    assert out.knobs == knobs
    known = vlm.answer_with_knobs(images, questions, knobs, N_NEW, probe_embeddings=probe)
    assert torch.equal(out.sequences, known.sequences)
    torch.testing.assert_close(out.latency_tokens, known.latency_tokens, atol=ATOL, rtol=RTOL)
    partial = vlm.partial_forward(images, questions, stage1, probe)
    torch.testing.assert_close(out.latency_tokens, partial, atol=ATOL, rtol=RTOL)
    via_generate = vlm.generate(images, questions, None, N_NEW, probe_embeddings=probe, decide=decide, stage1=stage1)
    assert torch.equal(via_generate.sequences, out.sequences)
    with pytest.raises(TypeError, match="decide must be callable"):
        vlm.answer_resumable(images, questions, stage1, probe, None)
    with pytest.raises(ValueError, match="probe_embeddings"):
        vlm.answer_resumable(images, questions, stage1, None, decide)
    with pytest.raises(ValueError, match="stage1 has 2 rows"):
        vlm.partial_forward(images, questions, stage1[:2], probe)


@pytest.mark.parametrize("skip", [[2, 5], [0]], ids=["blocks-2-5", "block-0"])
def test_generate_skipping_matches_model_without_those_layers(vlm, batch, skip):
    images, questions = batch
    out, step_logits = answer_with_logits(vlm, vlm.generate_skipping, images, questions, skip, N_NEW)
    reference = without_layers(vlm.model, skip)
    expected, expected_logits = hf_generate(reference, vlm.build_inputs(images, questions, ["high"] * 3))
    assert_not_degenerate(expected)
    assert torch.equal(out.sequences, expected)
    torch.testing.assert_close(step_logits, expected_logits, atol=ATOL, rtol=RTOL)
    # The knobs report the blocks that ran, inside the knob space or not (block 0 is never a knob choice).
    assert [k.num_active_blocks for k in out.knobs] == [vlm.num_layers - len(skip)] * 3
    # An empty list is the full configuration.
    full = vlm.answer_with_knobs(images, questions, None, N_NEW)
    assert torch.equal(vlm.generate_skipping(images, questions, [], N_NEW).sequences, full.sequences)


def test_skip_blocks_is_its_own_entry_point(vlm, batch):
    images, questions = batch
    for bad in ([8], [-1], [True], ["1"]):
        with pytest.raises(ValueError, match="skip_blocks="):
            vlm.generate_skipping(images, questions, bad)
    with pytest.raises(TypeError, match="skip_blocks"):
        vlm.generate(images, questions, skip_blocks=[1])
