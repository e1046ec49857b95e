"""Base training of the tiny MoE VLM with randomly sampled knob configurations.

Each batch runs under one configuration drawn from the knob space (or the full one, a
fixed fraction of the time), so the model learns to answer with fewer vision tokens,
fewer experts and fewer blocks: it degrades gracefully instead of collapsing when a
controller turns a knob down. Stage-2 knobs are drawn rarely (``stage2_full_fraction``),
so that turning them down still costs something: a knob that costs nothing leaves a
controller nothing to decide. This is LayerDrop / random-top-k training with the same
executor that serves the model, so training and serving apply the knobs identically.

Run it with ``python -m knoblib pretrain`` (writes ``runs/model``; ``make artifacts``
replaces ``data/model``), then compute the block ranking with ``python -m knoblib rank-blocks``.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .accuracy import accuracy
from .assets import load_samples
from .data import DESCRIBE_QUESTION, VQASample, load_tokenizer
from .vlm import KnobVLM, VLMConfig


@dataclass
class PretrainConfig:
    """Arguments of ``pretrain``.

    Attributes:
        steps: optimizer steps.
        batch_size: samples per step (all rows share one sampled configuration).
        lr: peak AdamW learning rate (linear warm-up, cosine decay).
        warmup_steps: steps of linear warm-up.
        weight_decay: AdamW weight decay.
        full_config_fraction: share of steps run at the full configuration; the rest
            draw uniformly from the knob space.
        stage2_full_fraction: share of the randomly configured steps whose Stage-2 knobs
            (top_k, num_active_blocks) are reset to their largest values. At 0.95 every
            top-k and block count is still trained (on 2.5 % of all steps), yet the model
            relies on its depth, so dropping blocks costs accuracy where a family needs
            it (``count``); with 0 it learned to leave the droppable blocks unused, and
            no Stage-2 knob cost anything measurable.
        describe_fraction: share of rows whose target is replaced by the auxiliary
            captioning task ("describe the picture ?" -> every object's color and type):
            dense supervision that makes a from-scratch model learn to read the image
            in far fewer steps than the one-word answers alone.
        train_size: how many training samples to use (None = the whole split).
        eval_every: steps between validation accuracy checks (0 = only at the end).
        eval_size: validation samples per check.
        seed: seeds the model init, the batch order and the knob draws.
        vlm: the model sizes.
    """

    steps: int = 5000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    full_config_fraction: float = 0.5
    stage2_full_fraction: float = 0.95
    describe_fraction: float = 0.3
    train_size: int | None = None
    eval_every: int = 500
    eval_size: int = 200
    seed: int = 0
    vlm: VLMConfig = field(default_factory=VLMConfig)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: must be >= 1")
        for name in ("full_config_fraction", "stage2_full_fraction", "describe_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: allowed [0, 1]")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr={self.lr} is invalid: must be a positive finite number")


def render_all(samples: list[VQASample]) -> torch.Tensor:
    """Render every sample once: uint8 (N, 3, 48, 48). Rendering per step would dominate a CPU step."""
    return torch.stack([s.image() for s in samples])


def pretrain(
    cfg: PretrainConfig,
    data_dir: Path,
    log=print,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
    device: str | torch.device = "cpu",
) -> tuple[KnobVLM, list[dict]]:
    """Train a fresh ``KnobVLM`` on the train split; return it and the per-step log rows.

    With ``checkpoint_dir``, the model is saved there (atomically) at every evaluation.
    ``device`` is where the model trains (images are rendered on the CPU and moved per batch).
    """
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tokenizer = load_tokenizer(Path(data_dir) / "tokenizer")
    train = load_samples("train", cfg.train_size, Path(data_dir) / "vqa")
    val = load_samples("val", cfg.eval_size, Path(data_dir) / "vqa")
    if not val:
        raise ValueError(f"the val split in {Path(data_dir) / 'vqa'} is empty: pretraining checks its accuracy there")
    images = render_all(train)
    val_images = render_all(val)
    vlm = KnobVLM.from_config(cfg.vlm, tokenizer, seed=cfg.seed)
    vlm.model.to(device)
    space = vlm.knob_space
    configs = list(space)
    full = space.full()
    optimizer = torch.optim.AdamW(vlm.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress_frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress_frac))

    order: list[int] = []
    history: list[dict] = []
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="pretrain", disable=not progress)
    for step in bar:
        if len(order) < cfg.batch_size:
            fresh = list(range(len(train)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        knobs = full if rng.random() < cfg.full_config_fraction else rng.choice(configs)
        if knobs is not full and cfg.stage2_full_fraction > 0 and rng.random() < cfg.stage2_full_fraction:
            knobs = space.with_full_stage2(knobs)
        vlm.model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        describe = [rng.random() < cfg.describe_fraction for _ in idx]
        questions = [DESCRIBE_QUESTION if d else train[i].question for d, i in zip(describe, idx)]
        answers = [train[i].description() if d else train[i].answer for d, i in zip(describe, idx)]
        loss, stats = vlm.loss([images[i] for i in idx], questions, answers, knobs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vlm.model.parameters(), 1.0)
        optimizer.step()
        row = {"step": step, "loss": float(loss.detach()), **stats, "knobs": knobs.short(), "time_s": time.perf_counter() - start}
        last_step = step == cfg.steps - 1
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last_step:
            vlm.model.eval()
            row["val_acc_full"] = accuracy(vlm, val, full, images=val_images)
            row["val_acc_cheapest"] = accuracy(vlm, val, space.cheapest(), images=val_images)
            log(
                f"step {step + 1}: loss {row['loss']:.3f} val acc full {row['val_acc_full']:.3f} "
                f"cheapest {row['val_acc_cheapest']:.3f} ({row['time_s']:.0f} s)"
            )
            if checkpoint_dir is not None:
                save_atomically(vlm, Path(checkpoint_dir))
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
    vlm.model.eval()
    return vlm, history


def save_atomically(vlm: KnobVLM, path: Path) -> None:
    """Save to a sibling temp folder, then swap it in: a crash never leaves half a model."""
    import shutil

    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    vlm.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.replace(old)
    tmp.replace(path)
    shutil.rmtree(old, ignore_errors=True)
