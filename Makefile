# r1mega: `make demo` runs the main job, `make test` the test suite; both set up .venv first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test demo lint clean

setup:
	R1MEGA_VENV=$(VENV) bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/r1mega demo

lint: setup
	$(VENV)/bin/ruff check r1mega tools tests

clean:
	rm -rf build runs .pytest_cache *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
