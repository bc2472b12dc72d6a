# `make demo` runs the main job, `make test` the tests; both set up .venv on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Real chest X-rays: the shared PneumoniaMNIST copy beside the checkout, unless KD_DATA_DIR says otherwise.
KD_DATA_DIR ?= $(abspath ../shared/data)
export KD_DATA_DIR
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: install demo test test-all test-slow lint format bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: these wheels are on local disk here; an unpinned torch downloads gigabytes.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev,sweep,export]'
	touch $@

demo: install
	$(PY) -m kd_lightning +experiment=paper_cpu

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ''

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# BENCH_ARGS=--quick: reduced sizes, a few minutes (what the slow test runs).
bench: install
	$(PY) benchmarks/bench_data.py $(BENCH_ARGS)
	$(PY) benchmarks/bench_nst.py $(BENCH_ARGS)
	$(PY) benchmarks/bench_distill.py $(BENCH_ARGS)
	$(PY) benchmarks/bench_methods.py $(BENCH_ARGS)
	$(PY) benchmarks/bench_teacher_pass.py $(BENCH_ARGS)
	$(PY) benchmarks/bench_study.py $(BENCH_ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
