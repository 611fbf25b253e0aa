# The two commands of the README: `make demo` (set up, then run the demo) and `make test`.
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast clean

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/zephyr-ray demo

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The inner loop while editing: every test that starts no vLLM engine and no Ray cluster (CI runs all).
test-fast: setup
	$(VENV)/bin/python -m pytest -m "not engine" -q $(PYTEST_ARGS)

clean:
	rm -rf artifacts .pytest_cache
