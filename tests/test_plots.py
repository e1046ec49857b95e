"""Every plotting function returns a Figure on small made-up inputs."""

import matplotlib

# Only this test module draws off-screen; notebooks must keep their inline figures, so
# the backend is never set through the environment.
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from knoblib import plots  # noqa: E402
from knoblib.data import FAMILIES, generate_split  # noqa: E402
from knoblib.knobs import KnobConfig, KnobSpace  # noqa: E402
from knoblib.latency import LatencyTable  # noqa: E402

SPACE = KnobSpace.for_model(8, 4)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def table():
    """A made-up latency table over the whole 8-block space: each knob costs something."""
    tier_ms = {"low": 10.0, "medium": 20.0, "high": 30.0}
    latency = {k: tier_ms[k.tier] + 2.0 * k.top_k + 3.0 * k.num_active_blocks for k in SPACE}
    return LatencyTable(latency, SPACE, vision_ms={"low": 1.0, "medium": 2.0, "high": 3.0})


@pytest.fixture(scope="module")
def accuracy():
    """Made-up accuracies that grow with the work done."""
    out = {}
    for k in SPACE:
        base = 0.3 + 0.2 * SPACE.tiers.index(k.tier) + 0.02 * k.top_k + 0.01 * k.num_active_blocks
        out[k] = {"all": min(base, 1.0), **{f: min(base + 0.01 * i, 1.0) for i, f in enumerate(FAMILIES)}}
    return out


def test_show_samples_and_crops():
    samples = generate_split(6, seed=5)
    assert isinstance(plots.show_samples(samples, n=4), Figure)
    image = samples[0].image()
    for tier in SPACE.tiers:
        assert isinstance(plots.show_crops(image, tier), Figure)
    fig = plots.show_tiers(image)
    assert isinstance(fig, Figure)
    with pytest.raises(ValueError):
        plots.show_samples([], n=3)


def test_plot_knob_table():
    rows = [
        {"name": name, "knobs": "x", "all": a, **{f: a for f in FAMILIES}, "latency_ms": ms, "latency_vs_full": ms / 40}
        for name, a, ms in (("full", 0.9, 40.0), ("tier=low", 0.6, 20.0), ("cheapest", 0.4, 10.0))
    ]
    assert isinstance(plots.plot_knob_table(rows), Figure)


def test_plot_expert_ablation():
    acc = {"all": 0.9, **{f: 0.9 for f in FAMILIES}}
    rows = [{"name": "top_k=4 (default)", "experts": 4, "accuracy": acc},
            {"name": "no experts in blocks >= 1", "experts": 0, "accuracy": {k: v / 2 for k, v in acc.items()}}]
    mass = {"kept": {"1": 0.4, "2": 0.6, "3": 0.8, "4": 1.0}}
    assert isinstance(plots.plot_expert_ablation(mass, rows, top_k_options=(2, 3, 4)), Figure)
    with pytest.raises(ValueError, match="at least one ablation row"):
        plots.plot_expert_ablation(mass, [])


def test_pareto_front_and_plot(table, accuracy):
    front = plots.pareto_front(accuracy, table)
    assert front[0] == table.fastest() or accuracy[front[0]]["all"] >= accuracy[table.fastest()]["all"]
    lat = [table.latency(k) for k in front]
    acc = [accuracy[k]["all"] for k in front]
    assert lat == sorted(lat) and acc == sorted(acc) and len(set(acc)) == len(acc)
    # No configuration dominates a front member.
    for f in front:
        assert not any(
            table.latency(k) <= table.latency(f) and accuracy[k]["all"] > accuracy[f]["all"] for k in accuracy
        )
    assert isinstance(plots.plot_pareto(accuracy, table), Figure)
    assert isinstance(plots.plot_pareto(accuracy, table, highlight=SPACE.full()), Figure)
    assert isinstance(plots.plot_pareto(accuracy, table, highlight={"pick": SPACE.cheapest()}, key="mark"), Figure)



def test_plot_budget_choice_marks_the_budget_and_the_choices(table, accuracy):
    sample = generate_split(1, seed=3)[0]
    chosen, lookup = KnobConfig("low", 1, 2, 6), KnobConfig("high", 3, 4, 8)
    budget = 0.5 * (table.latency(chosen) + table.latency(lookup))
    fig = plots.plot_budget_choice(
        accuracy, table, budget, {"controller": chosen, "lookup": lookup},
        sample.image(), sample.question, "red", sample.answer, table.latency(chosen),
    )
    pareto, image = fig.axes
    assert image.images and sample.question.split()[0] in image.get_title()
    assert [line for line in pareto.get_lines() if list(line.get_xdata()) == [budget, budget]]
    assert any(f"budget {budget:.1f} ms" in t.get_text() for t in pareto.get_legend().get_texts())
    assert {"controller", "lookup"} <= {t.get_text() for t in pareto.texts}
    verdict = "correct" if sample.answer == "red" else f"wrong, truth: {sample.answer}"
    assert f"answer: red ({verdict})" in image.get_xlabel() and "<= budget" in image.get_xlabel()
    assert plots.figure_png(fig).startswith(b"\x89PNG")


def test_plot_budget_response_draws_each_policy(table):
    budgets = [40.0, 50.0, 60.0]
    cheap, rich = KnobConfig("low", 1, 2, 6), KnobConfig("medium", 1, 4, 8)
    policies = {
        "Mode B": [(table.latency(k), hit, k) for k, hit in ((cheap, True), (cheap, False), (rich, True))],
        "lookup table": [(table.latency(cheap), False, cheap)] * 3,
    }
    fig = plots.plot_budget_response(budgets, policies, "request 0-1 [color]")
    (ax,) = fig.axes
    assert "request 0-1 [color]" in ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["latency = budget", "Mode B", "lookup table"]
    # The knobs are written at the start and where they change: twice for Mode B, once for the table.
    assert sorted(t.get_text() for t in ax.texts) == sorted([cheap.short(), rich.short(), cheap.short()])

def test_plot_block_importance():
    assert isinstance(plots.plot_block_importance([0.6, 0.01, 0.05, -0.01]), Figure)
    result = {"full_accuracy": 0.9, "importance": [0.6, 0.01, 0.05, -0.01], "drop_order": [3, 1, 2]}
    assert isinstance(plots.plot_block_importance(result), Figure)


def test_plot_latency_breakdown_and_budgets(table):
    assert isinstance(plots.plot_latency_breakdown(table), Figure)
    sampled = torch.rand(100) * 50 + 30
    fig = plots.plot_budgets(sampled, torch.linspace(30, 80, 8), list(table.latency_ms.values()))
    assert isinstance(fig, Figure)
    assert isinstance(plots.plot_budgets(sampled.tolist()), Figure)


def test_plot_stage1_distribution():
    budgets = torch.linspace(10, 100, 7)
    tier = torch.softmax(torch.randn(7, 3), -1)
    position = torch.softmax(torch.randn(7, 3), -1)
    fig = plots.plot_stage1_distribution(
        {"tier": tier, "insertion position": position}, budgets, {"tier": list(SPACE.tiers), "insertion position": ["1", "2", "3"]}
    )
    assert isinstance(fig, Figure)
    assert isinstance(plots.plot_stage1_distribution(tier.numpy(), budgets.tolist(), list(SPACE.tiers)), Figure)
    with pytest.raises(ValueError):
        plots.plot_stage1_distribution(tier[:3], budgets, list(SPACE.tiers))


def test_plot_budget_encoding_and_similarity():
    budgets = torch.linspace(10, 100, 20)
    fig = plots.plot_budget_encoding(budgets, {"ours": torch.rand(20, 13) * 2 - 1, "original": torch.rand(20, 12)})
    assert isinstance(fig, Figure)
    with pytest.raises(ValueError):
        plots.plot_budget_encoding(budgets, torch.rand(5, 3))
    assert isinstance(plots.plot_similarity_matrix(torch.eye(len(FAMILIES)), list(FAMILIES)), Figure)


def test_every_family_has_its_color():
    # A family without an entry would be drawn in matplotlib's default cycle, unlike the legend elsewhere.
    assert set(FAMILIES) | {"all"} == set(plots.FAMILY_COLORS)


def test_plot_training_curves():
    history = [
        {"step": s, "mode": mode, "reward_mean": 0.1 * s, "accuracy": 0.5, **({"val_reward": 0.2} if s == 3 else {})}
        for mode in ("A-resumable", "B")
        for s in range(1, 4)
    ]
    assert isinstance(plots.plot_training_curves(history, ["reward_mean", "accuracy", "val_reward"], by="mode"), Figure)
    assert isinstance(plots.plot_training_curves(history[:3], ["reward_mean"]), Figure)


def test_plot_forward_counts_and_timings():
    counts = {"A-naive": {"partial": 5, "full": 5}, "A-resumable": {"partial": 0, "full": 5}, "B": {"full": 5}}
    assert isinstance(plots.plot_forward_counts(counts), Figure)
    assert isinstance(plots.plot_forward_counts(counts, {"A-naive": 0.5, "A-resumable": 0.3, "B": 0.2}), Figure)
    assert isinstance(plots.plot_timings({"partial forward": 3.0, "full generate": 50.0}), Figure)


def test_plots_module_never_sets_a_backend():
    # Executed notebooks keep their figures only if nothing forces a non-inline backend.
    source = open(plots.__file__, encoding="utf-8").read()
    assert "matplotlib.use(" not in source


def test_plot_pipeline_highlights_the_named_parts():
    from matplotlib.colors import to_hex

    def faces(fig):
        return {p.get_gid(): to_hex(p.get_facecolor()) for p in fig.axes[0].patches if (p.get_gid() or "").startswith("pipeline-")}

    plain = faces(plots.plot_pipeline())
    assert set(plain) == {f"pipeline-{k}" for k in plots.PIPELINE_BOXES}
    assert len(set(plain.values())) == 1  # nothing highlighted
    one = faces(plots.plot_pipeline("stage2", title="Stage 2"))
    assert one["pipeline-stage2"] == plots.PIPELINE_HIGHLIGHT
    assert all(color != plots.PIPELINE_HIGHLIGHT for gid, color in one.items() if gid != "pipeline-stage2")
    two = faces(plots.plot_pipeline(["reward", "grpo"]))
    assert {gid for gid, c in two.items() if c == plots.PIPELINE_HIGHLIGHT} == {"pipeline-reward", "pipeline-grpo"}
    with pytest.raises(ValueError, match="not a part of the pipeline"):
        plots.plot_pipeline("controller")


def _plane():
    """A made-up plane: the lookup table, a static hull and one controller with intervals over 3 seeds."""
    points = []
    for x, acc in ((30.0, 0.6), (40.0, 0.9)):
        points.append({"policy": "lookup table", "kind": "budget", "x": x, "accuracy": acc, "mean_latency_ms": x - 1,
                       "violation_rate": 0.0})
        points.append({"policy": "static hull (random mix)", "kind": "target", "x": x, "accuracy": acc,
                       "mean_latency_ms": x, "violation_rate": 0.0})
        for kind in ("budget", "target"):
            points.append({
                "policy": "controller (Mode B)", "kind": kind, "x": x, "accuracy": acc + 0.01, "mean_latency_ms": x - 3,
                "violation_rate": 0.0, "seeds": 3, "accuracy_ci": [acc - 0.01, acc + 0.03],
                "mean_latency_ms_ci": [x - 4, x - 2],
                "accuracy_vs_baseline": [0.01, -0.005, 0.03] if x == 30.0 else [0.02, 0.01, 0.03],
                "latency_saving_vs_baseline": [0.05, 0.04, 0.06] if kind == "budget" else None,
            })
    return {"points": points, "static": [[30.0, 0.6, "a"], [40.0, 0.9, "b"]], "hull": [[30.0, 0.6], [40.0, 0.9]]}


def test_plot_plane_draws_intervals():
    fig = plots.plot_plane(_plane())
    assert isinstance(fig, Figure)
    # The controller's error bars: one LineCollection per direction and panel.
    assert sum(len(ax.collections) for ax in fig.axes) > sum(
        len(ax.collections) for ax in plots.plot_plane(_plane(), errorbars=False).axes)


def test_verdicts_follow_the_intervals():
    assert plots.verdict([0.02, 0.01, 0.03]) == "better"
    assert plots.verdict([-0.02, -0.03, -0.01]) == "worse"
    assert plots.verdict([0.01, -0.005, 0.03]) == "tie"
    assert plots.verdict([-1e-16, -2e-16, -1e-17]) == "tie"  # the same configuration: rounding noise is no difference
    rows = plots.versus_baseline(_plane())
    assert len(rows) == 4 and {r["baseline"] for r in rows} == {"lookup table", "static hull (random mix)"}
    by = {(r["kind"], r["x"]): r for r in rows}
    assert by["budget", 30.0]["accuracy_verdict"] == "tie" and by["budget", 40.0]["accuracy_verdict"] == "better"
    assert by["budget", 30.0]["latency_verdict"] == "better" and by["target", 30.0]["latency_verdict"] is None
    text = plots.format_versus_baseline(rows)
    assert "tie" in text and "better" in text and "3" in text
    assert isinstance(plots.plot_versus_baseline(_plane()), Figure)
    with pytest.raises(ValueError, match="accuracy_vs_baseline"):
        plots.plot_versus_baseline({"points": [p for p in _plane()["points"] if p["policy"] == "lookup table"]})
