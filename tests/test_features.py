"""Tests for knoblib.features: question features, the budget encoding, the Mode-A probe."""

import math

import pytest
import torch
import torch.nn.functional as F

from knoblib.features import BudgetOutOfRangeWarning, BudgetProbe, LanguageFeatureExtractor, LatencyBudgetEncoder

LO, HI = 100.0, 400.0


@pytest.fixture
def extractor(tokenizer):  # the shipped tokenizer (conftest)
    torch.manual_seed(0)
    return LanguageFeatureExtractor(torch.nn.Embedding(len(tokenizer), 8), tokenizer)


def original_encoding(u: torch.Tensor, dim: int) -> torch.Tensor:
    """The original repo's transformer schedule on u in [0, 1]: sin/cos(u / 10000^(2i/dim))."""
    frequencies = 1.0 / 10000 ** (2 * torch.arange(dim // 2) / dim)
    return torch.cat([torch.sin(u[:, None] * frequencies), torch.cos(u[:, None] * frequencies)], dim=-1)


# --- LanguageFeatureExtractor ---------------------------------------------------------
def test_mean_pooling_matches_hand_computation(extractor, tokenizer):
    questions = ["what color is the circle ?", "how many shapes"]
    features = extractor(questions)
    assert features.shape == (2, 8)
    for row, question in enumerate(questions):
        ids = tokenizer.convert_tokens_to_ids(question.split())
        expected = extractor.embedding.weight[ids].mean(0)
        torch.testing.assert_close(features[row], expected.detach())


def test_features_are_detached(extractor):
    assert extractor.embedding.weight.requires_grad
    assert not extractor(["is the circle red ?"]).requires_grad


def test_no_special_tokens_are_pooled(extractor, tokenizer):
    # One word: the mean is exactly that word's embedding (no BOS/EOS mixed in).
    word_id = tokenizer.convert_tokens_to_ids("circle")
    torch.testing.assert_close(extractor(["circle"])[0], extractor.embedding.weight[word_id].detach())


# A single str is a TypeError (tests/test_bad_inputs.py).
@pytest.mark.parametrize("questions, match", [([], "empty"), (["red", "   "], "question 1 is empty")])
def test_bad_questions_raise(extractor, questions, match):
    with pytest.raises(ValueError, match=match):
        extractor(questions)


def test_mean_embedding_norm(extractor):
    expected = extractor.embedding.weight.norm(dim=-1).mean().item()
    assert extractor.mean_embedding_norm() == pytest.approx(expected)


# --- LatencyBudgetEncoder ---------------------------------------------------------------
def test_sinusoidal_layout():
    encoder = LatencyBudgetEncoder((LO, HI), num_frequencies=6)
    budgets = torch.tensor([LO, 250.0, HI, 500.0])
    with pytest.warns(BudgetOutOfRangeWarning, match=r"outside the range \[100.000, 400.000\]"):
        features = encoder.sinusoidal(budgets)
    assert features.shape == (4, 13)
    u = ((budgets - LO) / (HI - LO)).clamp(0, 1)
    torch.testing.assert_close(features[:, 0], u)  # u itself, saturated at 1 above the range
    frequencies = (math.pi / 2) * 2.0 ** torch.arange(6)
    torch.testing.assert_close(features[:, 1:7], torch.sin(u[:, None] * frequencies))
    torch.testing.assert_close(features[:, 7:], torch.cos(u[:, None] * frequencies))


def test_sinusoidal_varies_across_the_range_unlike_the_original():
    encoder = LatencyBudgetEncoder((LO, HI), num_frequencies=6)
    grid = torch.linspace(LO, HI, 21)  # neighbours are 5% of the range apart
    ours = encoder.sinusoidal(grid)
    u = (grid - LO) / (HI - LO)
    original = original_encoding(u, dim=ours.shape[1] - 1)

    # The lowest and highest budgets look different ...
    assert F.cosine_similarity(ours[:1], ours[-1:]).item() < 0.5
    # ... and so do budgets 5% of the range apart, anywhere in it.
    assert F.cosine_similarity(ours[:-1], ours[1:]).max().item() < 0.9
    # The original schedule barely moves over u in [0, 1].
    assert F.cosine_similarity(original[:1], original[-1:]).item() > 0.9
    assert F.cosine_similarity(original[:-1], original[1:]).min().item() > 0.999


def test_forward_shape_and_gradients():
    encoder = LatencyBudgetEncoder((LO, HI), num_frequencies=4, hidden_dim=16, out_dim=8)
    out = encoder([120.0, 300.0, 390.0])  # a list is accepted
    assert out.shape == (3, 8)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


def test_no_budget_is_the_top_of_the_range():
    """inf means no per-request budget (the average-latency mode): encoded as the range's top, without a warning."""
    import warnings

    encoder = LatencyBudgetEncoder((LO, HI))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(encoder(torch.tensor([float("inf")])), encoder(torch.tensor([HI])))


@pytest.mark.parametrize(
    "budgets, match",
    [
        ([100.0, -5.0], r"-5\.0"),
        ([0.0], r"0\.0"),
        ([float("nan")], "nan"),
        ([[100.0, 200.0]], r"1-D.*\(1, 2\)"),
        ([], "empty"),
    ],
)
def test_bad_budgets_raise(budgets, match):
    encoder = LatencyBudgetEncoder((LO, HI))
    with pytest.raises(ValueError, match=match):
        encoder.sinusoidal(torch.tensor(budgets))
    with pytest.raises(ValueError, match=match):
        encoder(torch.tensor(budgets))


@pytest.mark.parametrize("budget_range", [(400.0, 100.0), (100.0, float("inf")), (-1.0, 10.0)])
def test_bad_budget_range_raises(budget_range):
    with pytest.raises(ValueError, match="budget_range"):
        LatencyBudgetEncoder(budget_range)


def test_budgets_outside_the_range_saturate_and_warn_once():
    encoder = LatencyBudgetEncoder((0.5, 1.1))
    with pytest.warns(BudgetOutOfRangeWarning) as record:
        far = encoder(torch.tensor([2.0, 10.0, 1000.0, 1e9]))
        encoder(torch.tensor([0.01]))
    assert len(record) == 1 and "[0.500, 1.100]" in str(record[0].message)
    edge = encoder(torch.tensor([1.1]))
    # More budget than the controller ever saw is served like the most it saw.
    torch.testing.assert_close(far, edge.expand(4, -1))
    torch.testing.assert_close(encoder(torch.tensor([0.01])), encoder(torch.tensor([0.5])))


# --- BudgetProbe --------------------------------------------------------------------------
def test_budget_probe_is_fixed_deterministic_and_scaled():
    encoder = LatencyBudgetEncoder((LO, HI), num_frequencies=6)
    features = encoder.sinusoidal(torch.tensor([LO, 200.0, HI]))
    probe = BudgetProbe(encoder.encoding_dim, d_model=32, seed=3, scale=2.5)
    again = BudgetProbe(encoder.encoding_dim, d_model=32, seed=3, scale=2.5)
    other = BudgetProbe(encoder.encoding_dim, d_model=32, seed=4, scale=2.5)

    out = probe(features)
    assert out.shape == (3, 32)
    torch.testing.assert_close(out, again(features))
    assert not torch.allclose(out, other(features))
    torch.testing.assert_close(out.norm(dim=-1), torch.full((3,), 2.5))
    # Not trainable: a buffer, saved in the state dict, no parameters.
    assert list(probe.parameters()) == []
    assert "projection" in probe.state_dict()
    # Different budgets give different probes.
    assert F.cosine_similarity(out[:1], out[-1:]).item() < 0.9


def test_budget_probe_rejects_wrong_width():
    probe = BudgetProbe(13, d_model=8)
    with pytest.raises(ValueError, match=r"expected \(N, 13\)"):
        probe(torch.zeros(2, 12))
    with pytest.raises(ValueError, match="scale"):
        BudgetProbe(13, d_model=8, scale=0.0)
