"""knoblib: latency-budget-aware inference of a tiny MoE vision-language model, with a
two-stage knob controller trained by GRPO.

The names in ``__all__`` are the package's front door (``from knoblib import
BudgetedVLM``); the modules (``knoblib.vlm``, ``knoblib.plots``, ...) hold the rest. Each
name is imported from its module on first use (PEP 562), so ``import knoblib`` loads
neither transformers nor matplotlib, and running a module (``python -m knoblib.data``)
does not import the others.
"""

from __future__ import annotations

import importlib

# Each exported name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    # the model and its knobs
    "KnobVLM": "vlm",
    "VLMConfig": "vlm",
    "KnobConfig": "knobs",
    "KnobSpace": "knobs",
    "TIERS": "knobs",
    # latency and budgets
    "LatencyTable": "latency",
    "BudgetGuard": "guard",
    # the controller and its training
    "TwoStageController": "controller",
    "ControllerConfig": "controller",
    "GRPOConfig": "grpo",
    "JointGRPOTrainer": "grpo",
    "RewardConfig": "reward",
    "compute_reward": "reward",
    # serving
    "BudgetedVLM": "serving",
    # the shipped assets and data
    "load_assets": "assets",
    "load_samples": "assets",
    "data_path": "data",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
