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
	$(VENV)/bin/mypy python/datafold

bench: dev
	$(PY) -m pytest benches --benchmark-enable -p no:cacheprovider
	$(PY) benches/compare.py

clean:
	rm -rf $(VENV) .ci-venv target dist
