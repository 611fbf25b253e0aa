# The two commands of the README: `make demo` (set up, then run the demo) and `make test`.
VENV ?= .venv
PYTEST_ARGS ?=
# Test processes side by side (pytest-xdist), each running whole test files with a Ray of its own
# (tests/conftest.py). For machines with cores to spare: on this project's 2-core CI machine two processes took as
# long as one (each test ran ~1.8x slower beside the other), so the default is one.
TEST_WORKERS ?= 1
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
