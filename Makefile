# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-chaos bench-train bench-partitioner bench-move clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch; other torch requests may pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m sims.demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 tests

bench: $(STAMP)
	$(PY) -m sims.bench_inference

bench-train: $(STAMP)
	$(PY) -m sims.bench_train

bench-partitioner: $(STAMP)
	$(PY) -m sims.bench_partitioner

bench-move: $(STAMP)
	$(PY) -m sims.bench_move

bench-chaos: $(STAMP)
	$(PY) -m sims.chaos

clean:
	rm -rf $(VENV) build *.egg-info
