# Developer shortcuts. `make dev` builds the extension into ./.venv (editable install).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: dev test lint bench compare clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip maturin

dev: $(PY)
	$(PY) -m pip install --quiet -e '.[test,lint]'

test: dev
	$(PY) -m pytest
	cargo test --release

lint: dev
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python -- -D warnings
	$(VENV)/bin/ruff check python tests benches examples
	$(VENV)/bin/ruff format --check python tests benches examples
	$(VENV)/bin/mypy python/datafold

# Full size: the suites (DATAFOLD_BENCH_SCALE, default 0.25) take about a minute, compare.py
# (scale 1, median of 5, memory at 2 and 8 GiB) about 10 minutes; it rewrites docs/BENCHMARKS.md's
# marked regions and docs/benchmarks.png. BENCH_ARGS="--scale 0.02 --repeat 1 --no-write" for a smoke run.
bench: dev
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m pytest benches --benchmark-enable -p no:cacheprovider
	$(PY) benches/compare.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .ci-venv target dist
