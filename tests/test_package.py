"""The package's front door: ``from knoblib import ...`` works for every name in ``__all__``, lazily."""

import importlib
import subprocess
import sys

import pytest

import knoblib


def test_from_knoblib_import_budgeted_vlm():
    from knoblib import BudgetedVLM
    from knoblib.serving import BudgetedVLM as defined

    assert BudgetedVLM is defined


@pytest.mark.parametrize("name", knoblib.__all__)
def test_every_exported_name_resolves_to_its_definition(name):
    value = getattr(knoblib, name)
    module = importlib.import_module(f"knoblib.{knoblib._EXPORTS[name]}")
    assert value is getattr(module, name)
    assert name in dir(knoblib)


def test_the_names_notebooks_and_the_readme_use_are_exported():
    expected = {
        "BudgetedVLM", "KnobVLM", "VLMConfig", "KnobConfig", "KnobSpace", "TIERS", "LatencyTable", "BudgetGuard",
        "TwoStageController", "ControllerConfig", "GRPOConfig", "JointGRPOTrainer", "RewardConfig", "compute_reward",
        "load_assets", "load_samples", "data_path",
    }
    assert expected <= set(knoblib.__all__)
    assert len(knoblib.__all__) == len(set(knoblib.__all__))


def test_unknown_names_and_submodules():
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        knoblib.nonexistent  # noqa: B018
    from knoblib import plots  # a submodule, not an export

    assert plots.__name__ == "knoblib.plots"


def test_import_knoblib_loads_no_heavy_module():
    heavy = ("transformers", "matplotlib", "knoblib.vlm")
    code = f"import sys, knoblib; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
