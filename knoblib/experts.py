"""How much of an MoE block's work its strongest experts carry (why ``top_k`` is cheap here).

The knob table shows that halving ``top_k`` costs the shipped model no accuracy. Two
measurements say why, and anyone can repeat them on another checkpoint:

* **Router mass** (:func:`router_mass`): the mean share of the router's softmax
  probability held by the strongest expert, the two strongest, and so on, over every
  token of blocks >= 1 at the full configuration. OLMoE does not renormalise the kept
  weights (``norm_topk_prob=False``), so at ``top_k = k`` a block's output is the
  experts' outputs weighted by exactly these probabilities, and the mass past rank k is
  the part of the mixture a smaller ``top_k`` removes.
* **Expert ablation** (:func:`expert_ablation`): per-family accuracy with ``top_k`` at
  each knob option, with one expert per token (``top_k = 1``, outside the knob space),
  with the default top-k minus its strongest expert, and with the MoE output of blocks
  >= 1 removed altogether. If removing every expert costs many points, the MoE blocks
  matter; if the strongest expert alone keeps the accuracy while the others without it
  do not, the experts are specialised and the router's first choice does the work, so
  the weaker experts a smaller ``top_k`` drops were adding little.

Both use torch forward hooks on ``layer.mlp`` and its router ``layer.mlp.gate`` and
remove them before returning; the executor is not changed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from .accuracy import correct_answers, family_accuracy
from .data import VQASample
from .evaluate import knob_table_configs
from .knobs import KnobConfig
from .vlm import KnobVLM


@contextlib.contextmanager
def expert_override(
    vlm: KnobVLM,
    *,
    top_k: int | None = None,
    drop_strongest: bool = False,
    remove_experts: bool = False,
    first_block: int = 1,
) -> Iterator[None]:
    """Inside the block, MoE blocks ``>= first_block`` run with ``top_k`` experts (any
    value in 1..num_experts, the knob space is not consulted); with ``drop_strongest``
    also the strongest of them gets weight 0 (the others keep their own weights); with
    ``remove_experts`` they add nothing to the residual stream (their output is zeros;
    attention still runs).

    The executor sets ``gate.top_k`` before each block; a forward pre-hook on the
    router runs after that and wins. Every hook is removed on exit, also on errors.
    """
    num_experts = vlm.layers[0].mlp.gate.num_experts
    if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= num_experts):
        raise ValueError(f"top_k={top_k!r} is invalid: must be an integer in 1..{num_experts}")
    if remove_experts and (top_k is not None or drop_strongest):
        raise ValueError("remove_experts removes every expert: give it without top_k or drop_strongest")
    if drop_strongest and (top_k or 0) < 2:
        raise ValueError(f"drop_strongest needs top_k >= 2 (got {top_k!r}): otherwise no expert is left")
    if not (isinstance(first_block, int) and 0 <= first_block < vlm.num_layers):
        raise ValueError(f"first_block={first_block!r} is invalid: must be in 0..{vlm.num_layers - 1}")

    def set_top_k(router, args):
        router.top_k = top_k

    def zero_output(mlp, args, output):
        return torch.zeros_like(output)

    def zero_strongest(router, args, output):
        logits, scores, indices = output  # scores (tokens, top_k), sorted by torch.topk
        return logits, torch.cat([torch.zeros_like(scores[:, :1]), scores[:, 1:]], dim=-1), indices

    handles = []
    try:
        for layer in vlm.layers[first_block:]:
            if top_k is not None:
                handles.append(layer.mlp.gate.register_forward_pre_hook(set_top_k))
            if drop_strongest:
                handles.append(layer.mlp.gate.register_forward_hook(zero_strongest))
            if remove_experts:
                handles.append(layer.mlp.register_forward_hook(zero_output))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _full_knobs(vlm: KnobVLM) -> KnobConfig:
    """The knob table's full configuration: p = 1, so a top-k setting acts on blocks >= 1."""
    return knob_table_configs(vlm.knob_space)[0][1]


@torch.no_grad()
def router_mass(vlm: KnobVLM, samples: Sequence[VQASample], batch_size: int = 64, first_block: int = 1) -> dict:
    """Mean router probability by rank, over every prompt token of blocks >= ``first_block``.

    Returns a dict with ``by_rank`` (E floats, descending: the mean probability of the
    strongest expert, the second, ...), ``kept`` ({k: mean probability mass of the k
    strongest experts} for k = 1..E) and ``tokens`` (routed token-blocks counted).
    Measured on the prefill at the full configuration, where nearly all tokens are.
    """
    if not samples:
        raise ValueError("router_mass needs at least one sample")
    sums = None
    count = 0

    def record(router, args, output):
        nonlocal sums, count
        probs = torch.softmax(output[0].float(), dim=-1).sort(dim=-1, descending=True).values  # (tokens, E)
        sums = probs.sum(0) if sums is None else sums + probs.sum(0)
        count += probs.shape[0]

    handles = [layer.mlp.gate.register_forward_hook(record) for layer in vlm.layers[first_block:]]
    try:
        knobs = _full_knobs(vlm)
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            vlm.generate([s.image() for s in chunk], [s.question for s in chunk], knobs, max_new_tokens=1)
    finally:
        for handle in handles:
            handle.remove()
    by_rank = (sums / count).tolist()
    kept = {k: float(sum(by_rank[:k])) for k in range(1, len(by_rank) + 1)}
    return {"by_rank": by_rank, "kept": kept, "tokens": count}


def _accuracy(vlm: KnobVLM, samples: Sequence[VQASample], images: list[torch.Tensor], knobs: KnobConfig, batch_size: int) -> dict:
    correct = correct_answers(vlm, samples, knobs, images=images, batch_size=batch_size)
    return family_accuracy(samples, correct)


@torch.no_grad()
def expert_ablation(vlm: KnobVLM, samples: Sequence[VQASample], batch_size: int = 64) -> dict:
    """Per-family accuracy (``accuracy.family_accuracy``'s dict: fractions, ``all`` overall) per expert setting.

    Returns ``{"rows": [{"name", "experts" (experts used per token), "accuracy": {...}}, ...]}`` in
    this order: every ``top_k`` knob option from the default down (all blocks, high tier,
    p = 1), ``top_k = 1`` in blocks >= 1, the default top-k without its strongest expert,
    and no expert output in blocks >= 1.
    """
    if not samples:
        raise ValueError("expert_ablation needs at least one sample")
    images = [s.image() for s in samples]
    full = _full_knobs(vlm)
    rows = []
    for k in sorted(vlm.knob_space.top_k_options, reverse=True):
        knobs = KnobConfig(full.tier, 1, k, full.num_active_blocks)
        name = f"top_k={k}" + (" (default)" if k == vlm.default_top_k else "")
        rows.append({"name": name, "experts": k, "accuracy": _accuracy(vlm, samples, images, knobs, batch_size)})
    if 1 not in vlm.knob_space.top_k_options:
        with expert_override(vlm, top_k=1):
            rows.append({"name": "top_k=1 (outside the knob space)", "experts": 1,
                         "accuracy": _accuracy(vlm, samples, images, full, batch_size)})
    k0 = vlm.default_top_k
    if k0 >= 2:
        with expert_override(vlm, top_k=k0, drop_strongest=True):
            rows.append({"name": f"top_k={k0} without the strongest expert", "experts": k0 - 1,
                         "accuracy": _accuracy(vlm, samples, images, full, batch_size)})
    with expert_override(vlm, remove_experts=True):
        rows.append({"name": "no experts in blocks >= 1", "experts": 0,
                     "accuracy": _accuracy(vlm, samples, images, full, batch_size)})
    return {"rows": rows}
