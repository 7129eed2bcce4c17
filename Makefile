# make demo : install into .venv, generate the synthetic world, run the whole two-stage pipeline (outputs/demo/)
# make test : install into .venv and run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PYOPENGL_PLATFORM ?= egl

.PHONY: demo test venv clean-demo bench

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	PY=$(PY) bash demo.sh

test: $(STAMP)
	$(PY) -m pytest -q --durations=10 tests

bench: $(STAMP)
	for f in benchmarks/bench_*.py; do $(PY) $$f || exit 1; done

clean-demo:
	rm -rf outputs/demo
