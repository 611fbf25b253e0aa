# The two commands of the README: `make demo` (set up, then run the demo) and `make test`.
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: setup demo test clean

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/zephyr-ray demo

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf artifacts .pytest_cache
