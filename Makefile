# Two commands matter: `make run` (the pipeline on ml-100k) and `make test`.
# Each creates ./.venv and installs the package into it first (once; again
# whenever setup.cfg changes).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= runs/ml100k
CONFIG ?= configs/ml100k.py
PYTEST_ARGS ?=

.PHONY: install run test test-fast bench cot-ablation rl-table pareto pareto-tune format clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) experiments/pipeline.py --config=$(CONFIG) --workdir=$(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=10 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) experiments/bench/sasrec_train.py --workdir=runs/bench
	$(PY) experiments/bench/sft_train.py --workdir=runs/bench
	$(PY) experiments/bench/beam_search.py --workdir=runs/bench
	$(PY) experiments/bench/popo_cost.py --workdir=runs/bench

# The reasoning ablation (README, "Reasoning"); needs the SIDs of `make run`.
cot-ablation: $(STAMP)
	$(PY) experiments/cot_ablation.py --config=configs/ml100k_cot_ablation.py --workdir=runs/ml100k_cot

# RL (GRPO) vs SFT over 3 seeds (README, "RL alignment"); needs the sasrec
# and sids stages of `make run`.
rl-table: $(STAMP)
	$(PY) experiments/rl_table.py --config=configs/ml100k_rl_table.py --workdir=runs/ml100k_rl

# Fixed weights vs POPO, POPO-light and MGDA over 3 seeds (README, "Pareto
# front"); needs the sasrec and sids stages of `make run`.
pareto: $(STAMP)
	$(PY) experiments/pareto.py --config=configs/ml100k_pareto.py --workdir=runs/ml100k_pareto

# POPO's mu and min_weight on the valid split of a tuning seed (not reported).
pareto-tune: $(STAMP)
	$(PY) experiments/pareto.py --config=configs/ml100k_pareto.py:tune --workdir=runs/ml100k_pareto_tune

format: $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m yapf -i -r taiji_jax experiments configs tests
	$(PY) -m isort taiji_jax experiments configs tests

clean:
	rm -rf $(VENV) runs .pytest_cache
