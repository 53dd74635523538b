# Two commands for a fresh machine: `make demo` and `make test` (each builds .venv/ if needed).
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 2

.PHONY: env demo demo-quality test test-unit lint bench-fidelity bench-decode bench-overhead \
	bench-capacity bench-quality

env:
	@bash devtools/setup_cpu_env.sh

demo: env
	$(PY) examples/demo.py

demo-quality: env
	$(PY) examples/quality_demo.py

test: env
	$(PY) -m pytest tests -q -ra

test-unit: env
	$(PY) -m pytest tests/unit -q

lint: env
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench-fidelity: env
	$(PY) bench/fidelity.py

bench-decode: env
	$(PY) bench/decode_speed.py

bench-overhead: env
	TRITON_INTERPRET=1 $(PY) bench/decode_overhead.py

bench-capacity: env
	$(PY) bench/capacity.py

bench-quality: env
	$(PY) bench/quality.py
