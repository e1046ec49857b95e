# Two commands do all set-up on a fresh machine:
#   make tutorial   venv + install + run every notebook in full mode (the main job)
#   make test       venv + install + the whole test suite (notebooks in smoke mode)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.knoblib-installed
# The venv's own kernelspec wins over any user-level one (see DESIGN.md section 6).
export JUPYTER_PATH := $(CURDIR)/$(VENV)/share/jupyter
# Executed notebooks must keep their figures.
unexport MPLBACKEND

.PHONY: install tutorial test test-fast benchmarks artifacts clean

# The variants beyond Mode B (vision-aware B, distilled B, the hybrid) train with the shipped
# Mode-B recipe where it applies; the distilled one starts from data/controller_A instead of a warm start.
VARIANT_RECIPE = --max-price 8 --average-fraction 0.5 --saving-bonus 0.01 --kl-coef 0.05 --steps 250

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU build that lies on this machine; a bare `torch` would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[notebooks,test]"
	# Kernelspec inside the venv only (--sys-prefix): nothing is registered outside it.
	$(BIN)/python -m ipykernel install --sys-prefix --name knoblib --display-name "knoblib (.venv)" >/dev/null
	touch $(STAMP)

install: $(STAMP)

tutorial: $(STAMP)
	$(BIN)/python -m knoblib tutorial

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not notebook and not browser and not slow"

# Rebuild every shipped artifact in data/ from scratch, in order (about an hour on 2 CPU cores).
# Commands write to runs/ by default; each step here names its data/ path and passes --overwrite.
artifacts: $(STAMP)
	$(BIN)/python -m knoblib data --out data/vqa --tokenizer-out data/tokenizer --overwrite
	$(BIN)/python -m knoblib pretrain --out data/model --overwrite
	$(BIN)/python -m knoblib rank-blocks --model data/model --out data/model --overwrite
	$(BIN)/python -m knoblib profile-latency --out data/latency_table.json --overwrite
	$(BIN)/python -m knoblib config-accuracy --out data/config_accuracy_val.json --overwrite
	$(BIN)/python -m knoblib knob-table --out data/knob_table.json --overwrite
	$(BIN)/python -m knoblib expert-ablation --out data/expert_ablation.json --overwrite
	$(BIN)/python -m knoblib train --mode B --warm-start-steps 300 --warm-start-entropy 0.5 --warm-start-teacher family-table --kl-coef 0.05 --out runs/B --export data/controller_B --overwrite
	$(BIN)/python -m knoblib train --mode A-resumable --out runs/A-resumable --export data/controller_A --overwrite
	KNOBLIB_LATENCY_TABLE=shipped $(BIN)/python -m knoblib train --mode B --vision-stats $(VARIANT_RECIPE) --warm-start-teacher correctness --warm-start-steps 3000 --warm-start-entropy 0.01 --out runs/B_vision --export data/controller_B_vision --overwrite
	KNOBLIB_LATENCY_TABLE=shipped $(BIN)/python -m knoblib train --mode B --distill-from data/controller_A --distill-steps 500 --distill-coef 0.1 $(VARIANT_RECIPE) --out runs/B_distilled --export data/controller_B_distilled --overwrite
	KNOBLIB_LATENCY_TABLE=shipped $(BIN)/python -m knoblib train --mode B --hybrid --distill-steps 500 --distill-coef 0.1 $(VARIANT_RECIPE) --warm-start-teacher correctness --warm-start-steps 3000 --warm-start-entropy 0.01 --out runs/hybrid --export data/controller_hybrid --overwrite
	$(BIN)/python -m knoblib evaluate --out data/eval --overwrite
	$(BIN)/python -m knoblib evaluate --variants --table shipped --out data/eval --overwrite

benchmarks: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
