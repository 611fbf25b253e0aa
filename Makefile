# The two commands of the README: `make demo` (set up, then run the demo) and `make test`.
VENV ?= .venv
PYTEST_ARGS ?=
# Test processes side by side (pytest-xdist), each running whole test files with a Ray of its own
# (tests/conftest.py). Two on this project's 2-core CI machine: one process leaves a third of it idle (one core
# imports vLLM while the other waits); the same 11 files took 850 s in two against 1053 s in one, back to back.
TEST_WORKERS ?= 2
XDIST = $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

.PHONY: setup demo test test-fast clean

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/zephyr-ray demo

test: setup
	$(VENV)/bin/python -m pytest $(XDIST) $(PYTEST_ARGS)

# The inner loop while editing: every test that starts no vLLM engine and no Ray cluster (CI runs all).
test-fast: setup
	$(VENV)/bin/python -m pytest -m "not engine" -q $(PYTEST_ARGS)

clean:
	rm -rf artifacts .pytest_cache
