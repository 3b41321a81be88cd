# The README's two commands: `make run` and `make test`. Both set up first (idempotent).
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: setup run test bench eval clean-venv

setup:
	@bash scripts/setup.sh

run: setup
	$(PY) -m inlaid.demo

# Two test workers (pytest-xdist), each taking whole files (a module's fixtures stay in one
# process): most tests wait on servers and child processes, and one worker kept the 2-core
# machine ~40 % busy (955 s serial, 555 s with two). TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile tests

# make bench: the end-to-end suite (~14 min quiet); QUICK=1: its 1-2 minute smoke run; FULL=1: both
# popularities (19-41 min by machine); ALL=1: every bench/*.py but quality.py (make eval) and soak.py
bench: setup
	$(PY) bench/run_all.py $(if $(QUICK),--quick) $(if $(FULL),--full) $(if $(ALL),--all)

eval: setup
	$(PY) bench/quality.py

clean-venv:
	rm -rf $(VENV)
