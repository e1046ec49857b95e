"""Figures for the tutorial notebooks and the CLI (matplotlib).

Every plotting function takes plain data (lists, dicts, tensors, arrays, the package's own
dataclasses), draws one new figure, does no I/O and returns the ``matplotlib.figure.Figure``
(:func:`figure_png` turns one into PNG bytes). In a notebook the returned figure is shown inline; elsewhere save it with
``fig.savefig(path)``. Nothing here sets a matplotlib backend: an inherited
``MPLBACKEND=Agg`` would silently drop the figures of executed notebooks.

| function | what it shows |
|---|---|
| :func:`plot_pipeline` | the whole system (request to GRPO), one part highlighted |
| :func:`show_samples` | a grid of scenes with question / answer titles |
| :func:`show_crops`, :func:`show_tiers` | the crops the vision tower sees for a tier (or every tier) |
| :func:`plot_knob_table` | accuracy per question family and latency, each knob moved alone |
| :func:`plot_pareto` (+ :func:`pareto_front`) | accuracy vs profiled latency of every fixed configuration |
| :func:`plot_budget_choice` | one request at one budget: its image and answer beside the Pareto plot and the budget |
| :func:`plot_budget_response` | the latency each policy chooses for one request, against the budget |
| :func:`plot_block_importance` | accuracy lost when each block alone is removed |
| :func:`plot_expert_ablation` | router mass kept by the k strongest experts, accuracy with fewer experts |
| :func:`plot_latency_breakdown` | latency per value of each knob |
| :func:`plot_budgets` | sampled training budgets, the evaluation sweep, the achievable latencies |
| :func:`plot_stage1_distribution` | how Stage 1's choice probabilities move with the budget |
| :func:`plot_budget_encoding` | heatmaps of sinusoidal budget features across the budget range |
| :func:`plot_similarity_matrix` | a labelled square matrix (e.g. cosine similarity of question features) |
| :func:`plot_plane` | every policy on the accuracy / mean-latency plane, with intervals |
| :func:`plot_versus_baseline` (+ :func:`versus_baseline`, :func:`format_versus_baseline`, :func:`verdict`) | each controller minus the baseline, 95 % intervals |
| :func:`plot_training_curves` | metrics per training step, runs overlaid |
| :func:`plot_forward_counts` | forwards per request and measured time per training mode |
| :func:`plot_timings` | a labelled bar chart of measured times |
| :func:`plot_reward_curves` | reward against latency / budget per reward formula |
| :func:`plot_policy_update` | per rollout: advantage and the change of its log-probability |
| :func:`live_training_curves` | a trainer callback redrawing ``plot_training_curves`` in place |
| :func:`figure_png` | a figure as PNG bytes |
"""

from __future__ import annotations

import io
import itertools
import math
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from .data import FAMILIES
from .knobs import KNOB_FIELDS, TIERS, KnobConfig
from .latency import LatencyTable

# One color per tier and per question family, used consistently across figures.
TIER_COLORS = {"low": "#1b9e77", "medium": "#d95f02", "high": "#7570b3"}
FAMILY_COLORS = {"all": "#444444", "color": "#e41a1c", "mark": "#377eb8", "binding": "#4daf4a", "count": "#984ea3"}


# --- helpers --------------------------------------------------------------------------
def _array(x: Any) -> np.ndarray:
    """A float numpy array from a tensor, array or nested list."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=float)


def _grid(n: int, ncols: int, size: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    """A figure with ``n`` panels in rows of ``ncols``; unused panels are hidden. Returns (fig, axes (n,))."""
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    axes = axes.ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _label(value: float) -> str:
    """A bar label: 3 significant digits, never scientific notation."""
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def _image_hwc(image: torch.Tensor) -> np.ndarray:
    """uint8 (3, H, W) or float (3, H, W) in [-1, 1] -> float (H, W, 3) in [0, 1] for imshow."""
    x = image.detach().cpu()
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    else:
        x = (x.float() + 1.0) / 2.0
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


# --- the big picture ---------------------------------------------------------------------
# The boxes of the pipeline figure: key -> (title, detail, x, y). One request flows along
# the top row, left to right; its reward flows back along the bottom row to GRPO, which
# updates both stages. The latency table and budget guard feed the stages and the reward.
PIPELINE_BOXES: dict[str, tuple[str, str, float, float]] = {
    "request": ("request", "image, question,\nbudget B or price λ", 0.0, 2.2),
    "features": ("features", "lang_feat (question)\nbudget_feat (B, λ)", 2.0, 2.2),
    "stage1": ("Stage 1", "tier,\ninsertion position p", 4.0, 2.2),
    "partial": ("partial forward", "blocks < p → latency\ntoken (Mode A only)", 6.0, 2.2),
    "stage2": ("Stage 2", "top_k,\nnum_active_blocks", 8.0, 2.2),
    "executor": ("executor", "the VLM runs\nthe four knobs", 10.0, 2.2),
    "guard": ("budget guard", "latency table: what each\nconfiguration costs here", 2.0, 0.0),
    "grpo": ("GRPO", "update both stages\nfrom group advantages", 5.0, 0.0),
    "reward": ("reward", "correct − violation\n(or − λ·latency)", 7.5, 0.0),
    "answer": ("answer", "one word,\nits latency", 10.0, 0.0),
}
# (from, to, style): solid = data flow, dashed = training signal, dotted = reads the latency table.
PIPELINE_ARROWS: tuple[tuple[str, str, str], ...] = (
    ("request", "features", "solid"),
    ("features", "stage1", "solid"),
    ("stage1", "partial", "solid"),
    ("partial", "stage2", "solid"),
    ("stage2", "executor", "solid"),
    ("executor", "answer", "solid"),
    ("answer", "reward", "solid"),
    ("reward", "grpo", "dashed"),
    ("grpo", "stage1", "dashed"),
    ("grpo", "stage2", "dashed"),
    ("guard", "stage1", "dotted"),
    ("guard", "reward", "dotted"),
)
PIPELINE_HIGHLIGHT = "#fdb863"


def plot_pipeline(highlight: str | Sequence[str] | None = None, title: str | None = None) -> Figure:
    """The whole system on one page, with the part a notebook is about highlighted.

    A request (image, question, latency budget or price) becomes two cheap features; Stage 1
    picks the tier and insertion position p; in Mode A a partial forward to block p yields
    the latency token (Mode B skips it: the curved arrow); Stage 2 picks top_k and the
    number of blocks; the executor runs the VLM with all four knobs; the answer and its
    latency give a reward, and GRPO updates both stages from group advantages. The
    latency table and the budget guard feed the choices and the reward.

    Args:
        highlight: one key of ``PIPELINE_BOXES`` or several (``request``, ``features``,
            ``stage1``, ``partial``, ``stage2``, ``executor``, ``answer``, ``reward``,
            ``grpo``, ``guard``); None highlights nothing.
        title: drawn above the figure.
    """
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    keys = [] if highlight is None else [highlight] if isinstance(highlight, str) else list(highlight)
    unknown = [k for k in keys if k not in PIPELINE_BOXES]
    if unknown:
        raise ValueError(f"highlight={unknown[0]!r} is not a part of the pipeline: allowed {list(PIPELINE_BOXES)}")
    width, height = 1.7, 1.0
    fig, ax = plt.subplots(figsize=(11.0, 4.6))
    for key, (name, detail, x, y) in PIPELINE_BOXES.items():
        on = key in keys
        box = FancyBboxPatch(
            (x - width / 2, y - height / 2), width, height, boxstyle="round,pad=0.05,rounding_size=0.12",
            facecolor=PIPELINE_HIGHLIGHT if on else "#f2f2f2", edgecolor="#333333" if on else "#999999",
            lw=2.0 if on else 1.0, ls="--" if key == "partial" else "-", gid=f"pipeline-{key}",
        )
        ax.add_patch(box)
        ax.text(x, y + 0.22, name, ha="center", va="center", fontsize=9.5, fontweight="bold",
                color="black" if on or not keys else "#555555")
        ax.text(x, y - 0.18, detail, ha="center", va="center", fontsize=7.2, color="#222222" if on or not keys else "#777777")

    def edge(a: str, b: str) -> tuple[tuple[float, float], tuple[float, float]]:
        (_, _, xa, ya), (_, _, xb, yb) = PIPELINE_BOXES[a], PIPELINE_BOXES[b]
        if ya == yb:  # same row: leave and enter through the sides
            sign = 1 if xb > xa else -1
            return (xa + sign * width / 2, ya), (xb - sign * width / 2, yb)
        sign = 1 if yb > ya else -1  # between rows: leave and enter through top / bottom
        return (xa + 0.25 * (xb - xa) / max(abs(xb - xa), 1e-9) * min(abs(xb - xa), width / 2), ya + sign * height / 2), (
            xb, yb - sign * height / 2)

    styles = {"solid": ("-", "#333333"), "dashed": ("--", "#b2182b"), "dotted": (":", "#2166ac")}
    for a, b, style in PIPELINE_ARROWS:
        start, end = edge(a, b)
        ls, color = styles[style]
        bend = "arc3,rad=0.0"
        if a == "guard" and b == "reward":  # under the GRPO box
            start, end = (start[0] - width / 2 + 0.25, start[1] - height / 2), (end[0] + width / 2 - 0.25, end[1] - height / 2)
            bend = "arc3,rad=0.18"
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color=color, ls=ls, lw=1.3,
                                     shrinkA=2, shrinkB=2, connectionstyle=bend))
    # Mode B: Stage 2 reads the features directly, no partial forward.
    (_, _, xf, yf), (_, _, xs, ys) = PIPELINE_BOXES["features"], PIPELINE_BOXES["stage2"]
    ax.add_patch(FancyArrowPatch((xf + 0.3, yf + height / 2), (xs - 0.3, ys + height / 2), arrowstyle="-|>",
                                 mutation_scale=12, color="#666666", lw=1.1, connectionstyle="arc3,rad=-0.22"))
    ax.text((xf + xs) / 2, yf + height / 2 + 0.78, "Mode B: Stage 2 reads the features, before the model runs",
            ha="center", va="center", fontsize=7.5, color="#444444")
    ax.text(PIPELINE_BOXES["grpo"][2] - 1.15, 0.95, "training only", fontsize=7.5, color="#b2182b", ha="center")
    ax.set_xlim(-1.0, 11.0)
    ax.set_ylim(-1.45, 3.7)
    ax.set_aspect("equal")
    ax.axis("off")
    legend = "solid: one request's path   dashed red: training signal   dotted blue: reads the latency table"
    ax.text(5.0, -1.25, legend, ha="center", va="center", fontsize=7.5, color="#444444")
    if title:
        ax.set_title(title, fontsize=11)
    fig.tight_layout()
    return fig


# --- data ------------------------------------------------------------------------------
def show_samples(samples: Sequence, n: int = 8, ncols: int = 4, width: int = 32) -> Figure:
    """A grid of the first ``n`` samples: each scene with its question, answer and family.

    Args:
        samples: ``VQASample`` objects (anything with ``image()``, ``question``,
            ``answer`` and ``family``).
        n: how many to show.
        ncols: panels per row.
        width: characters per title line (long questions wrap).
    """
    shown = list(samples)[:n]
    if not shown:
        raise ValueError("show_samples needs at least one sample")
    fig, axes = _grid(len(shown), ncols, (2.6, 3.3))
    for ax, s in zip(axes, shown):
        ax.imshow(_image_hwc(s.image()), interpolation="nearest")
        title = textwrap.fill(s.question, width) + f"\n-> {s.answer}  [{s.family}]"
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def show_crops(image: torch.Tensor, tier: str) -> Figure:
    """The crops of one tier, as the vision tower sees them (16x16 each, shown enlarged).

    Args:
        image: uint8 tensor (3, 48, 48).
        tier: ``low``, ``medium`` or ``high``.
    """
    from .vlm import make_crops

    crops = make_crops(image, tier)
    fig, axes = _grid(len(crops), len(crops), (1.6, 1.9))
    for i, (ax, crop) in enumerate(zip(axes, crops)):
        ax.imshow(_image_hwc(crop), interpolation="nearest")
        ax.set_title("global" if i == 0 else f"tile {i}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"tier {tier}: {len(crops)} crop(s)", fontsize=10)
    fig.tight_layout()
    return fig


def show_tiers(image: torch.Tensor, tiers: Sequence[str] = TIERS) -> Figure:
    """Every tier's crops side by side, one row per tier, with the original image first.

    Args:
        image: uint8 tensor (3, 48, 48).
        tiers: the tiers to show, one row each.
    """
    from .vlm import make_crops

    crops = {t: make_crops(image, t) for t in tiers}
    ncols = 1 + max(len(c) for c in crops.values())
    fig, axes = plt.subplots(len(tiers), ncols, figsize=(1.5 * ncols, 1.7 * len(tiers)), squeeze=False)
    for row, tier in enumerate(tiers):
        axes[row, 0].imshow(_image_hwc(image), interpolation="nearest")
        axes[row, 0].set_title("image 48x48" if row == 0 else "", fontsize=8)
        axes[row, 0].set_ylabel(f"{tier}\n({len(crops[tier])} crops)", fontsize=9)
        for col in range(1, ncols):
            ax = axes[row, col]
            if col - 1 < len(crops[tier]):
                ax.imshow(_image_hwc(crops[tier][col - 1]), interpolation="nearest")
                ax.set_title("global" if col == 1 else f"tile {col - 1}", fontsize=7)
            else:
                ax.set_frame_on(False)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return fig


# --- accuracy and latency of fixed configurations --------------------------------------
def plot_knob_table(rows: Sequence[Mapping], families: Sequence[str] = FAMILIES) -> Figure:
    """Accuracy per question family (and overall) and latency, each knob moved alone.

    Args:
        rows: the ``rows`` of ``data/knob_table.json`` (``python -m knoblib knob-table``),
            each with keys ``name``, ``knobs``, ``all``, one per family,
            ``latency_ms`` and ``latency_vs_full``.
        families: the family keys to draw.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("plot_knob_table needs at least one row")
    names = [r["name"] for r in rows]
    keys = ["all", *families]
    x = np.arange(len(rows))
    width = 0.8 / len(keys)
    fig, (ax_acc, ax_lat) = plt.subplots(
        2, 1, figsize=(max(7.0, 0.9 * len(rows)), 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]}
    )
    for i, key in enumerate(keys):
        values = [100 * float(r[key]) for r in rows]
        ax_acc.bar(x + (i - (len(keys) - 1) / 2) * width, values, width, label=key, color=FAMILY_COLORS.get(key))
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_ylim(0, 105)
    ax_acc.legend(ncol=len(keys), fontsize=8, loc="upper right")
    ax_acc.set_title("each knob moved alone from the full configuration")
    ax_acc.grid(axis="y", alpha=0.3)
    ratio = [float(r["latency_vs_full"]) for r in rows]
    bars = ax_lat.bar(x, ratio, 0.6, color="#888888")
    for bar, r in zip(bars, rows):
        ax_lat.annotate(f"{float(r['latency_ms']):.0f} ms", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax_lat.axhline(1.0, color="black", lw=0.8, ls="--")
    ax_lat.set_ylabel("latency / full")
    ax_lat.set_ylim(0, max(ratio) * 1.25)
    ax_lat.set_xticks(x)
    ax_lat.set_xticklabels([f"{n}\n{r.get('knobs', '')}" for n, r in zip(names, rows)], fontsize=7, rotation=30, ha="right")
    fig.tight_layout()
    return fig


def plot_expert_ablation(
    mass: Mapping, rows: Sequence[Mapping], top_k_options: Sequence[int] = (), families: Sequence[str] = FAMILIES
) -> Figure:
    """Why ``top_k`` is cheap: router mass kept by the k strongest experts, and accuracy per expert setting.

    Args:
        mass: :func:`knoblib.experts.router_mass`'s result (``kept``: {k: mass}; JSON keys may be strings).
        rows: :func:`knoblib.experts.expert_ablation`'s ``rows`` (``name``, ``experts``, ``accuracy``).
        top_k_options: the knob's options, shaded on the left panel.
        families: the family keys to draw.
    """
    rows = list(rows)
    if not rows or not mass.get("kept"):
        raise ValueError("plot_expert_ablation needs router mass and at least one ablation row")
    kept = sorted((int(k), float(v)) for k, v in mass["kept"].items())
    fig, (ax_mass, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 2]})
    ax_mass.plot([k for k, _ in kept], [v for _, v in kept], marker="o", color="#333333")
    if top_k_options:
        ax_mass.axvspan(min(top_k_options) - 0.3, max(top_k_options) + 0.3, color="#4C72B0", alpha=0.15,
                        label="top_k knob options")
        ax_mass.legend(fontsize=8, loc="lower right")
    ax_mass.set_xlabel("k strongest experts")
    ax_mass.set_ylabel("router probability kept")
    ax_mass.set_ylim(0, 1.05)
    ax_mass.set_title("how much of the mixture top_k keeps")
    ax_mass.grid(alpha=0.3)
    keys = ["all", *families]
    x = np.arange(len(rows))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        values = [100 * float(r["accuracy"].get(key, float("nan"))) for r in rows]
        ax_acc.bar(x + (i - (len(keys) - 1) / 2) * width, values, width, label=key, color=FAMILY_COLORS.get(key))
    ax_acc.set_xticks(x)
    ax_acc.set_xticklabels([textwrap.fill(r["name"], 16) for r in rows], fontsize=7)
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_ylim(0, 118)
    ax_acc.legend(ncol=len(keys), fontsize=8, loc="upper center")
    ax_acc.set_title("accuracy with fewer experts (blocks >= 1)")
    ax_acc.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def pareto_front(
    config_accuracy: Mapping[KnobConfig, Mapping[str, float]], table: LatencyTable, key: str = "all"
) -> list[KnobConfig]:
    """The Pareto-optimal configurations: no other is both at least as fast and more accurate.

    Returns them sorted by latency (fastest first); only configurations present in both
    ``config_accuracy`` and ``table`` count.
    """
    configs = [k for k in config_accuracy if k in table]
    ordered = sorted(configs, key=lambda k: (table.latency(k), -config_accuracy[k][key]))
    front, best = [], -math.inf
    for k in ordered:
        if config_accuracy[k][key] > best:
            front.append(k)
            best = config_accuracy[k][key]
    return front


def plot_pareto(
    config_accuracy: Mapping[KnobConfig, Mapping[str, float]],
    table: LatencyTable,
    highlight: KnobConfig | Mapping[str, KnobConfig] | Sequence[KnobConfig] | None = None,
    key: str = "all",
) -> Figure:
    """Accuracy vs profiled latency of every fixed configuration, Pareto front drawn, colored by tier.

    Args:
        config_accuracy: configuration -> {"all": ..., family: ...} (``config_accuracy`` /
            ``load_config_accuracy``).
        table: the profiled latencies.
        highlight: configurations to mark: one ``KnobConfig``, a list, or {label: KnobConfig}.
        key: which accuracy to plot (``all`` or a family).
    """
    configs = [k for k in config_accuracy if k in table]
    if not configs:
        raise ValueError("no configuration has both an accuracy and a latency")
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for tier in TIERS:
        ks = [k for k in configs if k.tier == tier]
        if ks:
            ax.scatter([table.latency(k) for k in ks], [100 * config_accuracy[k][key] for k in ks],
                       s=22, alpha=0.75, color=TIER_COLORS[tier], label=f"tier {tier}")
    front = pareto_front(config_accuracy, table, key)
    # The front holds until the slowest configuration: extend the last step to it.
    fx = [table.latency(k) for k in front] + [max(table.latency(k) for k in configs)]
    fy = [100 * config_accuracy[k][key] for k in front]
    fy.append(fy[-1])
    ax.step(fx, fy, where="post", color="black", lw=1.2, label=f"Pareto front ({len(front)})")
    if highlight is not None:
        if isinstance(highlight, KnobConfig):
            marks = {highlight.short(): highlight}
        elif isinstance(highlight, Mapping):
            marks = dict(highlight)
        else:
            marks = {k.short(): k for k in highlight}
        # Several labels may mark one configuration (e.g. the lookup pick at several budgets): one annotation.
        labels_by_config: dict[KnobConfig, list[str]] = {}
        for label, k in marks.items():
            if k in table and k in config_accuracy:
                labels_by_config.setdefault(k, []).append(str(label))
        for k, labels in labels_by_config.items():
            x, y = table.latency(k), 100 * config_accuracy[k][key]
            ax.scatter([x], [y], s=140, facecolors="none", edgecolors="red", linewidths=1.8)
            ax.annotate(textwrap.fill(", ".join(labels), 28), (x, y), xytext=(6, -12), textcoords="offset points",
                        fontsize=7, color="red", va="top")
    ys = [100 * config_accuracy[k][key] for k in configs]
    low, high = min(ys), max(ys)
    if high - low < 10:  # a flat cloud: keep a readable span instead of zooming into noise
        low, high = (low + high) / 2 - 5, (low + high) / 2 + 5
    pad = 0.08 * (high - low)
    ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel("profiled latency, batch 1 (ms)")
    ax.set_ylabel(f"accuracy {key} (%)")
    ax.set_title(f"{len(configs)} fixed configurations")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def plot_budget_choice(
    config_accuracy: Mapping[KnobConfig, Mapping[str, float]],
    table: LatencyTable,
    budget_ms: float,
    choices: Mapping[str, KnobConfig],
    image: torch.Tensor,
    question: str,
    answer: str,
    truth: str,
    latency_ms: float,
    price: float | None = None,
) -> Figure:
    """One request at one budget: its image, question and answer, beside ``plot_pareto``
    with the chosen configurations circled and the budget drawn as a vertical line (the
    latencies over it shaded).

    Args:
        config_accuracy, table: as in ``plot_pareto``.
        budget_ms: the latency budget (``inf`` in the average-latency mode: no line).
        choices: {label: configuration} to circle (e.g. the controller's and the lookup table's).
        image: the request's uint8 image (3, H, W); question: its question.
        answer / truth: the model's answer and the true one; latency_ms: the answer's
            profiled latency (compared with the budget in the caption).
        price: the latency price in the average-latency mode (named in the title and caption).
    """
    fig = plot_pareto(config_accuracy, table, highlight=choices)
    pareto = fig.axes[0]
    capped = math.isfinite(budget_ms)
    if capped:
        lo, hi = pareto.get_xlim()
        lo, hi = min(lo, budget_ms * 0.97), max(hi, budget_ms * 1.03)
        pareto.axvline(budget_ms, color="#e31a1c", ls="--", lw=1.5, label=f"budget {budget_ms:.1f} ms")
        pareto.axvspan(budget_ms, hi, color="#e31a1c", alpha=0.06)
        pareto.set_xlim(lo, hi)
    pareto.set_ylim(-8, 104)  # full scale, room for labels below 0 %: the axes stay put as the budget moves
    pareto.legend(fontsize=8, loc="best")
    if capped:
        pareto.set_title(f"{pareto.get_title()}; shaded: over the budget", fontsize=10)
    else:
        pareto.set_title(f"{pareto.get_title()}; no budget, latency price {price or 0:.2f}", fontsize=10)
    # Widen the figure and put the request's image on its left.
    width, height = fig.get_size_inches()
    extra = 3.4
    total = width + extra
    for ax in fig.axes:
        box = ax.get_position()
        ax.set_position([(extra + box.x0 * width) / total, box.y0, box.width * width / total, box.height])
    fig.set_size_inches(total, height)
    image_ax = fig.add_axes([0.25 / total, 0.2, (extra - 0.6) / total, 0.62])
    image_ax.imshow(_image_hwc(image), interpolation="nearest")
    image_ax.set_xticks([])
    image_ax.set_yticks([])
    image_ax.set_title(textwrap.fill(question, 30), fontsize=9)
    correct = answer == truth
    verdict = "correct" if correct else f"wrong, truth: {truth}"
    where = (f"{'>' if latency_ms > budget_ms else '<='} budget {budget_ms:.1f} ms" if capped
             else f"at latency price {price or 0:.2f}")
    image_ax.set_xlabel(
        f"answer: {answer or '<empty>'} ({verdict})\n{latency_ms:.1f} ms {where}",
        fontsize=9,
        color="#1a7f37" if correct else "#b2182b",
    )
    return fig


def plot_budget_response(
    budgets_ms: Sequence[float], policies: Mapping[str, Sequence[tuple[float, bool, KnobConfig]]], request: str
) -> Figure:
    """The profiled latency each policy chooses for one request, against the budget.

    Points above the diagonal violate the budget; filled markers answered correctly; the
    knobs are written where they change.

    Args:
        budgets_ms: the budgets (x).
        policies: name -> one (latency_ms, correct, knobs) per budget.
        request: names the request in the title.
    """
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.plot(budgets_ms, budgets_ms, color="#999999", ls="--", lw=1, label="latency = budget")
    for (name, points), marker in zip(policies.items(), "osD"):
        latencies = [p[0] for p in points]
        (line,) = ax.plot(budgets_ms, latencies, marker=marker, ms=6, lw=1.2, label=name, mfc="none")
        hits = [(b, p[0]) for b, p in zip(budgets_ms, points) if p[1]]
        if hits:
            ax.plot(*zip(*hits), ls="none", marker=marker, ms=6, color=line.get_color())
        # Label the knobs where they change (and at the start): the budget's effect, in words.
        for i, (b, p) in enumerate(zip(budgets_ms, points)):
            if i == 0 or p[2] != points[i - 1][2]:
                ax.annotate(p[2].short(), (b, p[0]), xytext=(4, 5), textcoords="offset points",
                            fontsize=7, color=line.get_color())
    ax.set_xlabel("latency budget (ms)")
    ax.set_ylabel("profiled latency of the chosen knobs (ms)")
    ax.set_title(f"{request}: above the diagonal = over budget; filled = correct", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_block_importance(importance: Sequence[float] | Mapping, drop_order: Sequence[int] | None = None) -> Figure:
    """Accuracy points lost when each block alone is removed (higher = more important).

    Args:
        importance: L floats (accuracy drop, as fractions), or the dict returned by
            ``block_importance`` / stored in ``block_importance.json`` (keys
            ``importance`` and optionally ``drop_order``, ``full_accuracy``).
        drop_order: blocks in the order ``num_active_blocks`` drops them (least important
            first); annotated on the bars when given.
    """
    title = "accuracy lost when one block is removed"
    if isinstance(importance, Mapping):
        drop_order = importance.get("drop_order", drop_order)
        if importance.get("full_accuracy") is not None:
            title += f" (full: {100 * importance['full_accuracy']:.1f}%)"
        importance = importance["importance"]
    values = 100 * _array(importance)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(values)), 3.6))
    colors = ["#b2182b" if i == 0 else "#4393c3" for i in range(len(values))]
    bars = ax.bar(np.arange(len(values)), values, color=colors)
    if drop_order is not None:
        for rank, block in enumerate(drop_order):
            bar = bars[block]
            ax.annotate(f"drop #{rank + 1}", (bar.get_x() + bar.get_width() / 2, max(bar.get_height(), 0)),
                        ha="center", va="bottom", fontsize=7)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(np.arange(len(values)))
    ax.set_xlabel("block (0 is never dropped)")
    ax.set_ylabel("accuracy drop (points)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_latency_breakdown(table: LatencyTable) -> Figure:
    """Latency per value of each knob: every configuration as a dot, the median as a bar.

    One panel per knob (tier, insertion position, top-k, active blocks), plus the
    vision tower's share per tier when the table measured it.
    """
    rows = table.to_rows()
    panels = list(KNOB_FIELDS) + (["vision"] if table.vision_ms else [])
    fig, axes = _grid(len(panels), len(panels), (2.7, 3.4))
    for ax, knob in zip(axes, panels):
        if knob == "vision":
            tiers = [t for t in TIERS if t in table.vision_ms]
            ax.bar(range(len(tiers)), [table.vision_ms[t] for t in tiers], color=[TIER_COLORS[t] for t in tiers])
            ax.set_xticks(range(len(tiers)))
            ax.set_xticklabels(tiers)
            ax.set_title("vision tower (ms)", fontsize=9)
            continue
        values = sorted({r[knob] for r in rows}, key=lambda v: TIERS.index(v) if knob == "tier" else v)
        medians = []
        for i, v in enumerate(values):
            lat = [r["latency_ms"] for r in rows if r[knob] == v]
            medians.append(float(np.median(lat)))
            jitter = np.linspace(-0.2, 0.2, len(lat)) if len(lat) > 1 else np.zeros(1)
            ax.scatter(i + jitter, lat, s=8, alpha=0.6, color="#555555")
        ax.bar(range(len(values)), medians, 0.6, alpha=0.35, color="#1f78b4")
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels([str(v) for v in values])
        ax.set_title(knob.replace("_", " "), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("latency (ms)")
    fig.suptitle("latency of every configuration, grouped by each knob's value (bar = median)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_budgets(
    sampled_ms: Sequence[float] | torch.Tensor,
    sweep_ms: Sequence[float] | torch.Tensor | None = None,
    latencies_ms: Sequence[float] | torch.Tensor | None = None,
    bins: int = 30,
) -> Figure:
    """Histogram of sampled training budgets, the evaluation sweep and the achievable latencies.

    Args:
        sampled_ms: budgets from ``BudgetSampler.sample``.
        sweep_ms: evaluation budgets (``BudgetSampler.sweep``), drawn as vertical lines.
        latencies_ms: the profiled latencies of every configuration, drawn as a rug.
        bins: histogram bins.
    """
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    ax.hist(_array(sampled_ms), bins=bins, color="#a6cee3", edgecolor="white", label="sampled training budgets")
    if sweep_ms is not None:
        for i, b in enumerate(_array(sweep_ms)):
            ax.axvline(b, color="#e31a1c", lw=1, ls="--", label="evaluation sweep" if i == 0 else None)
    if latencies_ms is not None:
        lat = _array(latencies_ms)
        ax.plot(lat, np.zeros_like(lat), "|", color="black", ms=14, label="configuration latencies")
    ax.set_xlabel("budget (ms)")
    ax.set_ylabel("count")
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    fig.tight_layout()
    return fig


# --- controller -----------------------------------------------------------------------
def plot_stage1_distribution(
    probs_by_budget: Mapping[str, Any] | Any,
    budgets: Sequence[float] | torch.Tensor,
    labels: Mapping[str, Sequence[str]] | Sequence[str],
    ncols: int = 3,
) -> Figure:
    """How Stage 1's choice probabilities move with the budget: stacked areas, one panel per head.

    Args:
        probs_by_budget: {panel title: probabilities (len(budgets), K)}, e.g.
            ``{"tier": ..., "insertion position": ...}`` or one entry per question family;
            a single array draws one panel.
        budgets: the budgets (ms), the x axis.
        labels: {panel title: K option labels}, or one list used for every panel.
        ncols: panels per row.
    """
    if not isinstance(probs_by_budget, Mapping):
        probs_by_budget = {"probability": probs_by_budget}
    x = _array(budgets)
    fig, axes = _grid(len(probs_by_budget), ncols, (4.2, 3.2))
    for ax, (title, probs) in zip(axes, probs_by_budget.items()):
        p = _array(probs)
        if p.ndim != 2 or p.shape[0] != len(x):
            raise ValueError(f"probabilities for {title!r} have shape {p.shape}: expected ({len(x)}, K)")
        names = labels[title] if isinstance(labels, Mapping) else labels
        cmap = plt.get_cmap("tab10")
        colors = [TIER_COLORS.get(str(n), cmap(i)) for i, n in enumerate(names)]
        ax.stackplot(x, p.T, labels=[str(n) for n in names], colors=colors, alpha=0.85)
        ax.set_xlim(x.min(), x.max())
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("budget (ms)")
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_ylabel("probability")
    fig.tight_layout()
    return fig


def plot_budget_encoding(
    budgets: Sequence[float] | torch.Tensor, encodings: Mapping[str, Any] | Any
) -> Figure:
    """Heatmaps of budget features (features x budgets), side by side for comparison.

    Args:
        budgets: the budgets (ms), (N,), increasing.
        encodings: {title: features (N, D)} (e.g. knoblib's sinusoidal encoding and the
            original 10000^(2i/d) schedule), or one (N, D) array.
    """
    if not isinstance(encodings, Mapping):
        encodings = {"encoding": encodings}
    x = _array(budgets)
    fig, axes = _grid(len(encodings), len(encodings), (4.6, 3.6))
    for ax, (title, enc) in zip(axes, encodings.items()):
        e = _array(enc)
        if e.ndim != 2 or e.shape[0] != len(x):
            raise ValueError(f"encoding {title!r} has shape {e.shape}: expected ({len(x)}, D)")
        image = ax.imshow(e.T, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, origin="lower",
                          extent=(x.min(), x.max(), -0.5, e.shape[1] - 0.5), interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("budget (ms)")
        ax.set_ylabel("feature")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def plot_similarity_matrix(matrix: Any, labels: Sequence[str], title: str = "cosine similarity") -> Figure:
    """A labelled square matrix with its values written in the cells.

    Args:
        matrix: (K, K) values, e.g. cosine similarities between question families' features.
        labels: K row / column labels.
        title: the figure title.
    """
    m = _array(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(labels):
        raise ValueError(f"matrix has shape {m.shape}: expected ({len(labels)}, {len(labels)})")
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(labels), 0.6 + 0.8 * len(labels)))
    image = ax.imshow(m, cmap="viridis", vmin=min(0.0, float(m.min())), vmax=1.0)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if m[i, j] < 0.6 else "black")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels)
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


# --- evaluation and training ----------------------------------------------------------
PLANE_STYLES = {
    "lookup table": {"color": "black", "ls": "--", "marker": "s"},
    "static hull (random mix)": {"color": "black", "ls": "--", "marker": "s"},
    "best single configuration": {"color": "grey", "ls": ":", "marker": "x"},
    "random feasible": {"color": "grey", "ls": ":", "marker": "x"},
    "full model": {"color": "grey", "ls": "-.", "marker": "+"},
    "per-request oracle": {"color": "#999999", "ls": "-", "marker": "*", "alpha": 0.7},
    "per-family oracle": {"color": "#bbbbbb", "ls": "-", "marker": "^", "alpha": 0.7},
    "per-family mix (oracle)": {"color": "#bbbbbb", "ls": "-", "marker": "^", "alpha": 0.7},
}


def plot_plane(plane: Mapping, skip: Sequence[str] = ("full model",), errorbars: bool = True) -> Figure:
    """Every policy on the accuracy / mean-latency plane: per-request budgets (left), target mean latencies (right).

    Args:
        plane: ``knoblib.plane.evaluate_plane``'s result (or ``data/eval/plane.json``):
            ``points`` (policy, kind, x, accuracy, mean_latency_ms), ``static`` (every
            configuration: ms, accuracy, label) and ``hull``.
        skip: policies left out of the figure.
        errorbars: draw each controller point's 95 % intervals (``accuracy_ci``,
            ``mean_latency_ms_ci``: bootstrap over test requests and training seeds).
    """
    points = [p for p in plane["points"] if p["policy"] not in skip]
    if not points:
        raise ValueError("plot_plane needs at least one point")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    static = plane.get("static", [])
    # More controllers than the colour cycle holds (the variants, the budget-only ablation) reuse
    # its colours with another marker.
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    cycle = ((palette[i % len(palette)], "osD^v"[(i // len(palette)) % 5]) for i in itertools.count())
    colors: dict[str, str] = {}
    for ax, kind, title in (
        (axes[0], "budget", "per-request budget: one point per budget"),
        (axes[1], "target", "target mean latency: one point per target"),
    ):
        if static:
            ax.scatter([s[0] for s in static], [100 * s[1] for s in static], s=10, color="#dddddd", label="fixed configurations")
        if kind == "target" and plane.get("hull"):
            hull = plane["hull"]
            ax.plot([h[0] for h in hull], [100 * h[1] for h in hull], color="black", lw=1, alpha=0.4)
        for policy in dict.fromkeys(p["policy"] for p in points if p["kind"] == kind):
            pts = sorted((p for p in points if p["policy"] == policy and p["kind"] == kind), key=lambda p: p["x"])
            style = dict(PLANE_STYLES.get(policy, {}))
            if "color" not in style:
                style["color"], marker = colors.setdefault(policy, next(cycle))
                style.setdefault("marker", marker)
                style["lw"] = 2
            (line,) = ax.plot([p["mean_latency_ms"] for p in pts], [100 * p["accuracy"] for p in pts], ms=4, label=policy,
                              **style)
            # 95 % intervals (bootstrap over test requests and training seeds) where the point has them.
            bars = [p for p in pts if p.get("accuracy_ci") and p.get("mean_latency_ms_ci")]
            if errorbars and bars and policy not in PLANE_STYLES:
                x = np.array([p["mean_latency_ms"] for p in bars])
                y = np.array([100 * p["accuracy"] for p in bars])
                yerr = np.abs(np.array([[100 * p["accuracy_ci"][0] for p in bars], [100 * p["accuracy_ci"][1] for p in bars]]) - y)
                xerr = np.abs(np.array([[p["mean_latency_ms_ci"][0] for p in bars], [p["mean_latency_ms_ci"][1] for p in bars]]) - x)
                ax.errorbar(x, y, yerr=yerr, xerr=xerr, fmt="none", ecolor=line.get_color(), elinewidth=1, capsize=2, alpha=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("mean latency (ms, this machine's table)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("test accuracy (%)")
    fig.tight_layout()
    return fig


def plot_family_choices(choices: Mapping, table: LatencyTable) -> Figure:
    """The controller's most frequent configuration per question family (rows) and budget (columns).

    Args:
        choices: ``knoblib.plane.choices_by_family``'s result.
        table: this machine's latency table (cells are coloured by the configuration's median latency).
    """
    families = list(choices)
    budgets = sorted({b for per in choices.values() for b in per})
    latency = np.full((len(families), len(budgets)), np.nan)
    fig, ax = plt.subplots(figsize=(1.3 * len(budgets) + 2, 0.6 * len(families) + 1.6))
    by_label = {k.short(): k for k in table.configs}
    for i, family in enumerate(families):
        for j, budget in enumerate(budgets):
            counts = choices[family].get(budget, {})
            if not counts:
                continue
            label, share = next(iter(counts.items()))
            latency[i, j] = table.latency(by_label[label])
            ax.text(j, i, f"{label}\n{100 * share:.0f}%", ha="center", va="center", fontsize=7)
    image = ax.imshow(latency, cmap="Blues", aspect="auto", alpha=0.6)
    fig.colorbar(image, ax=ax, label="median latency (ms)")
    ax.set_xticks(range(len(budgets)), [f"{b:.0f}" for b in budgets])
    ax.set_yticks(range(len(families)), families)
    ax.set_xlabel("per-request budget (ms)")
    ax.set_title("the controller's most frequent configuration (and its share of the family's questions)", fontsize=9)
    fig.tight_layout()
    return fig


def verdict(interval: Sequence[float], unit: str = "") -> str:
    """``better`` / ``worse`` / ``tie`` from a [mean, low, high] difference interval (95 %): a
    difference counts only when its interval excludes 0."""
    # Rounding noise (a latency saving of -1e-16 when both serve the same configuration) is no difference.
    mean, low, high = (round(float(v), 9) for v in interval)
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "tie"


def versus_baseline(plane: Mapping) -> list[dict]:
    """Each controller point's comparison with the baseline at the same budget or target.

    Per-request budgets compare with the lookup table (accuracy difference and latency
    saving), targets with the static hull (accuracy difference). Rows: ``policy``, ``kind``,
    ``x``, ``seeds``, ``accuracy_vs_baseline`` and ``latency_saving_vs_baseline`` ([mean,
    low, high], 95 %: bootstrap over test requests and seeds), and the verdicts they imply.
    """
    rows = []
    for p in plane["points"]:
        if p.get("accuracy_vs_baseline") is None:
            continue
        row = {k: p.get(k) for k in ("policy", "kind", "x", "seeds", "accuracy", "mean_latency_ms",
                                    "accuracy_vs_baseline", "latency_saving_vs_baseline")}
        row["baseline"] = "lookup table" if p["kind"] == "budget" else "static hull (random mix)"
        row["accuracy_verdict"] = verdict(p["accuracy_vs_baseline"])
        saving = p.get("latency_saving_vs_baseline")
        row["latency_verdict"] = verdict(saving) if saving is not None else None
        rows.append(row)
    return rows


def format_versus_baseline(rows: Sequence[Mapping]) -> str:
    """:func:`versus_baseline`'s rows as a plain-text table (differences in points and percent)."""
    head = (f"{'policy':>28} | {'kind':>6} | {'x ms':>6} | seeds | {'accuracy vs baseline (95 %)':>30} | "
            f"{'latency saved (95 %)':>27}")
    lines = [head, "-" * len(head)]
    for r in rows:
        m, lo, hi = (100 * v for v in r["accuracy_vs_baseline"])
        acc = f"{m:+5.1f} [{lo:+5.1f}, {hi:+5.1f}] {r['accuracy_verdict']:>6}"
        if r.get("latency_saving_vs_baseline") is not None:
            sm, slo, shi = (100 * v for v in r["latency_saving_vs_baseline"])
            lat = f"{sm:+5.1f}% [{slo:+5.1f}, {shi:+5.1f}] {r['latency_verdict']:>6}"
        else:
            lat = ""
        lines.append(f"{r['policy'][:28]:>28} | {r['kind']:>6} | {r['x']:6.1f} | {r.get('seeds') or 1:>5} | {acc:>30} | {lat:>27}")
    lines.append("(accuracy in points, latency saving in % of the baseline's mean; 'tie': the interval contains 0)")
    return "\n".join(lines)


def plot_versus_baseline(plane: Mapping) -> Figure:
    """Each controller against the baseline, with 95 % intervals (error bars).

    Left: accuracy difference to the lookup table per per-request budget; middle: latency
    saved against it; right: accuracy difference to the static hull per target mean latency.
    A difference whose bar crosses 0 is a tie.
    """
    rows = versus_baseline(plane)
    if not rows:
        raise ValueError("plot_versus_baseline needs controller points with accuracy_vs_baseline intervals")
    panels = [
        ("budget", "accuracy_vs_baseline", "accuracy − lookup table (points)", "per-request budget (ms)"),
        ("budget", "latency_saving_vs_baseline", "latency saved vs lookup table (%)", "per-request budget (ms)"),
        ("target", "accuracy_vs_baseline", "accuracy − static hull (points)", "target mean latency (ms)"),
    ]
    panels = [pn for pn in panels if any(r["kind"] == pn[0] and r.get(pn[1]) is not None for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    offsets = {p: (i - (len(policies) - 1) / 2) * 0.25 for i, p in enumerate(policies)}
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (kind, key, ylabel, xlabel) in zip(axes[0], panels):
        for i, policy in enumerate(policies):
            pts = sorted((r for r in rows if r["policy"] == policy and r["kind"] == kind and r.get(key)), key=lambda r: r["x"])
            if not pts:
                continue
            x = np.array([r["x"] for r in pts]) + offsets[policy]
            mean = np.array([100 * r[key][0] for r in pts])
            err = np.abs(np.array([[100 * r[key][1] for r in pts], [100 * r[key][2] for r in pts]]) - mean)
            ax.errorbar(x, mean, yerr=err, fmt="o-", ms=4, lw=1, capsize=3, color=cycle[i % len(cycle)],
                        label=f"{policy} ({pts[0].get('seeds') or 1} seeds)")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("controllers against the baseline: 95 % intervals over test requests and training seeds", fontsize=10)
    fig.tight_layout()
    return fig


def plot_training_curves(
    history: Sequence[Mapping], keys: Sequence[str], by: str | None = None, x: str = "step", ncols: int = 3
) -> Figure:
    """Metrics per training step, one panel per key; runs overlaid when ``by`` groups them.

    Args:
        history: metric dicts, one per step (``JointGRPOTrainer.history`` or the lines of
            ``metrics.jsonl``), possibly from several runs concatenated.
        keys: the metrics to draw (entries without a key, e.g. validation metrics logged
            only every few steps, are skipped for that key).
        by: a key whose value names the run of each entry (e.g. ``"mode"``); one line per value.
        x: the x-axis key (the entry's position in its run when absent).
        ncols: panels per row.
    """
    history = list(history)
    keys = list(keys)
    if not keys:
        raise ValueError("plot_training_curves needs at least one key")
    groups: dict[str, list[Mapping]] = {}
    for entry in history:
        groups.setdefault(str(entry.get(by)) if by is not None else "", []).append(entry)
    fig, axes = _grid(len(keys), ncols, (4.0, 3.0))
    for ax, key in zip(axes, keys):
        for name, entries in groups.items():
            pts = [(e.get(x, i + 1), e[key]) for i, e in enumerate(entries) if e.get(key) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 20 else None, ms=3, label=name or None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        if by is not None:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_forward_counts(
    counts: Mapping[str, Mapping[str, float]], times_s: Mapping[str, float] | None = None, time_label: str = "step time (s)"
) -> Figure:
    """Forwards per request per training mode (stacked partial + full) and, optionally, measured time.

    Args:
        counts: mode -> {"partial": forwards per request, "full": forwards per request},
            e.g. from ``JointGRPOTrainer.train_step`` metrics divided by the batch size.
        times_s: mode -> measured seconds (e.g. mean step time), a second panel.
        time_label: y label of the time panel.
    """
    modes = list(counts)
    if not modes:
        raise ValueError("plot_forward_counts needs at least one mode")
    partial = np.array([float(counts[m].get("partial", 0.0)) for m in modes])
    full = np.array([float(counts[m].get("full", 0.0)) for m in modes])
    npanels = 2 if times_s is not None else 1
    fig, axes = plt.subplots(1, npanels, figsize=(4.6 * npanels, 3.6), squeeze=False)
    ax = axes[0, 0]
    xs = np.arange(len(modes))
    ax.bar(xs, partial, 0.6, label="partial forwards (blocks < p)", color="#fdbf6f")
    ax.bar(xs, full, 0.6, bottom=partial, label="full forwards (generate)", color="#1f78b4")
    for i, total in enumerate(partial + full):
        ax.annotate(f"{total:g}", (i, total), ha="center", va="bottom", fontsize=9)
    ax.set_xticks(xs)
    ax.set_xticklabels(modes)
    ax.set_ylabel("forwards per request")
    ax.set_ylim(0, max(partial + full) * 1.2 + 1e-9)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("counted forwards", fontsize=10)
    if times_s is not None:
        ax = axes[0, 1]
        values = [float(times_s[m]) for m in modes]
        ax.bar(xs, values, 0.6, color="#33a02c")
        for i, v in enumerate(values):
            ax.annotate(_label(v), (i, v), ha="center", va="bottom", fontsize=9)
        ax.set_xticks(xs)
        ax.set_xticklabels(modes)
        ax.set_ylabel(time_label)
        ax.set_ylim(0, max(values) * 1.2 + 1e-9)
        ax.set_title("measured on this machine", fontsize=10)
    fig.tight_layout()
    return fig


def plot_timings(times: Mapping[str, float], ylabel: str = "time (ms)", title: str | None = None) -> Figure:
    """A bar per measured time, each labelled with its value.

    Args:
        times: label -> time.
        ylabel: unit of the times.
        title: optional figure title.
    """
    if not times:
        raise ValueError("plot_timings needs at least one time")
    labels = list(times)
    values = [float(times[k]) for k in labels]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.5 * len(labels)), 3.4))
    ax.bar(range(len(labels)), values, 0.6, color="#6a3d9a")
    for i, v in enumerate(values):
        ax.annotate(_label(v), (i, v), ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max(values) * 1.2 + 1e-9)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


# --- used by notebooks 04/05
def plot_reward_curves(
    ratio: Sequence[float] | torch.Tensor,
    curves: Mapping[str, Any],
    points: Mapping[str, tuple[Any, Any]] | None = None,
) -> Figure:
    """Reward against latency / budget: one line per reward formula, rollouts as dots.

    Args:
        ratio: (M,) latency / budget values, the x axis.
        curves: {label: (M,) rewards at those ratios}, e.g. ``compute_reward`` and
            ``original_reward`` for a correct and a wrong answer.
        points: {label: (ratios (n,), rewards (n,))} scattered on top (e.g. one step's rollouts).
    """
    x = _array(ratio)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for label, y in curves.items():
        ax.plot(x, _array(y), lw=1.6, ls="--" if "original" in label else "-", label=label)
    for i, (label, (px, py)) in enumerate((points or {}).items()):
        ax.scatter(_array(px), _array(py), s=36, marker="ox^s"[i % 4], zorder=3, label=label)
    ax.axvline(1.0, color="black", lw=0.8, ls=":")
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_xlabel("latency / budget")
    ax.set_ylabel("reward")
    ax.set_title("reward vs latency/budget (right of the dotted line: over budget)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_policy_update(
    advantages: Sequence[float] | torch.Tensor,
    delta_log_prob: Sequence[float] | torch.Tensor,
    group_size: int,
    labels: Sequence[str] | None = None,
) -> Figure:
    """Per rollout: its advantage and the change of its log-probability after an update (two panels).

    Args:
        advantages: (N,) group-normalised advantages, rows grouped by request.
        delta_log_prob: (N,) log pi_new(c_i) - log pi_old(c_i).
        group_size: G, rollouts per request (groups are shaded alternately).
        labels: N x-tick labels (e.g. ``KnobConfig.short()``).
    """
    adv, delta = _array(advantages), _array(delta_log_prob)
    if adv.shape != delta.shape or adv.ndim != 1:
        raise ValueError(f"advantages {adv.shape} and delta_log_prob {delta.shape} must be the same (N,)")
    xs = np.arange(len(adv))
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.6 * len(adv)), 5.2), sharex=True)
    for ax, values, title in ((axes[0], adv, "advantage A"), (axes[1], delta, "change of log pi(c) after the step")):
        colors = ["#1a9850" if v > 0 else "#d73027" if v < 0 else "#999999" for v in adv]
        ax.bar(xs, values, 0.7, color=colors)
        for g in range(0, len(adv), 2 * group_size):
            ax.axvspan(g - 0.5, g + group_size - 0.5, color="#eeeeee", zorder=0)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    agree = np.sign(adv) == np.sign(delta)
    for x, ok, v in zip(xs, agree, delta):
        if adv[x] != 0:
            axes[1].annotate("ok" if ok else "x", (x, v), ha="center", va="bottom" if v >= 0 else "top", fontsize=7)
    axes[1].set_xticks(xs)
    axes[1].set_xticklabels(labels if labels is not None else [str(i) for i in xs], rotation=45, ha="right", fontsize=7)
    fig.suptitle("both panels colored by the sign of the advantage (ok: moved that way); shaded: every other group", fontsize=9)
    fig.tight_layout()
    return fig


def live_training_curves(keys: Sequence[str], every: int = 10, total_steps: int | None = None, by: str | None = None):
    """A ``JointGRPOTrainer.train`` callback that redraws ``plot_training_curves`` in place (Jupyter).

    The figure is replaced through an IPython display handle (``update_display``) every
    ``every`` steps and at ``total_steps``, so a progress bar in the same cell stays
    visible and an executed notebook keeps the last drawing.

    Args:
        keys, by: as in ``plot_training_curves``.
        every: steps between redraws.
        total_steps: the step that always redraws (the run's last).

    Returns:
        the callback ``callback(metrics)``; ``callback.history`` holds the metrics seen.
    """
    from IPython.display import Markdown, display

    if every < 1:
        raise ValueError(f"every={every} is invalid: must be >= 1")
    handle = display(Markdown(f"*training curves: redrawn every {every} steps*"), display_id=True)
    history: list[Mapping] = []

    def callback(metrics: Mapping) -> None:
        history.append(dict(metrics))
        if len(history) % every == 0 or metrics.get("step") == total_steps:
            fig = plot_training_curves(history, keys, by=by)
            handle.update(fig)
            plt.close(fig)

    callback.history = history
    return callback


# --- output ------------------------------------------------------------------------------
def figure_png(fig: Figure, dpi: int = 80) -> bytes:
    """PNG bytes of a figure (what a widget shows in place of an inline figure)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
