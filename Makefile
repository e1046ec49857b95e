# Two commands do all set-up on a fresh machine:
#   make tutorial   venv + install + run every notebook in full mode (the main job)
#   make test       venv + install + the whole test suite (notebooks in smoke mode)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.knoblib-installed
# The venv's own kernelspec wins over any user-level one.
export JUPYTER_PATH := $(CURDIR)/$(VENV)/share/jupyter
# Executed notebooks must keep their figures.
unexport MPLBACKEND

.PHONY: install tutorial test test-fast benchmarks artifacts clean

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

# Rebuild every shipped artifact in data/ from scratch, in order (about three hours on 2 CPU cores).
# Commands write to runs/ by default; each step here names its data/ path and passes --overwrite.
# Training and evaluation read the shipped latency table (profiled here by the step before), so
# the artifacts describe one machine; serving calibrates to the user's (knoblib.calibration).
ARTIFACT_ENV = KNOBLIB_LATENCY_TABLE=shipped
PRICE    = --max-price 8 --average-fraction 0.5 --saving-bonus 0.01
# Mode B and its budget-only ablation: warm start on the critic's best configuration (knoblib.critic), saving bonus 0.03.
TRAIN_B  = $(ARTIFACT_ENV) $(BIN)/python -m knoblib train --mode B $(PRICE) --saving-bonus 0.03 --warm-start-teacher critic --warm-start-steps 3000 --warm-start-entropy 0.01 --kl-coef 0.05 --steps 250 --overwrite
# The vision-aware B and the hybrid were trained with the expected-reward fit (--warm-start-teacher correctness).
TRAIN_BV = $(ARTIFACT_ENV) $(BIN)/python -m knoblib train --mode B $(PRICE) --warm-start-teacher correctness --warm-start-steps 3000 --warm-start-entropy 0.01 --kl-coef 0.05 --steps 250 --overwrite
TRAIN_A  = $(ARTIFACT_ENV) $(BIN)/python -m knoblib train --mode A-resumable $(PRICE) --steps 1500 --overwrite
artifacts: $(STAMP)
	$(BIN)/python -m knoblib data --out data/vqa --tokenizer-out data/tokenizer --overwrite
	$(BIN)/python -m knoblib pretrain --out data/model --overwrite
	$(BIN)/python -m knoblib rank-blocks --model data/model --out data/model --overwrite
	$(BIN)/python -m knoblib profile-latency --out data/latency_table.json --overwrite
	$(BIN)/python -m knoblib correctness --split val --n 1000 --out data/correctness_val.safetensors --overwrite
	$(BIN)/python -m knoblib correctness --split test --n 1000 --out data/correctness_test.safetensors --overwrite
	$(BIN)/python -m knoblib correctness --split train --n 3000 --out data/correctness_train.safetensors --overwrite
	$(BIN)/python -m knoblib config-accuracy --correctness data/correctness_val.safetensors --out data/config_accuracy_val.json --overwrite
	$(BIN)/python -m knoblib knob-table --out data/knob_table.json --overwrite
	$(BIN)/python -m knoblib expert-ablation --out data/expert_ablation.json --overwrite
	for seed in 0 1 2; do \
	  suffix=$$( [ $$seed = 0 ] || echo _seed$$seed ); \
	  $(TRAIN_B) --seed $$seed --out runs/B_seed$$seed --export data/controller_B$$suffix; \
	  $(TRAIN_B) --seed $$seed --no-question --out runs/B_budget_only_seed$$seed --export data/controller_B_budget_only$$suffix; \
	  $(TRAIN_A) --seed $$seed --out runs/A_seed$$seed --export data/controller_A$$suffix; \
	done
	$(TRAIN_BV) --vision-stats --out runs/B_vision --export data/controller_B_vision
	$(ARTIFACT_ENV) $(BIN)/python -m knoblib train --mode B $(PRICE) --distill-from data/controller_A --distill-steps 500 --distill-coef 0.1 --kl-coef 0.05 --steps 250 --out runs/B_distilled --export data/controller_B_distilled --overwrite
	$(TRAIN_BV) --hybrid --distill-steps 500 --distill-coef 0.1 --out runs/hybrid --export data/controller_hybrid
	$(ARTIFACT_ENV) $(BIN)/python -m knoblib evaluate --out data/eval --overwrite
	$(ARTIFACT_ENV) $(BIN)/python -m knoblib evaluate --measured --out data/eval --overwrite
	$(ARTIFACT_ENV) $(BIN)/python -m knoblib evaluate --variants --out data/eval --overwrite

benchmarks: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
