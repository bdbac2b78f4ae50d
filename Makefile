# The verbs of the Kasmina fleet. Every target that needs Python calls `setup` first, which is
# idempotent: it (re)installs only when a requirements or pyproject file changed.
PY       := .venv/bin/python
PYPROJ   := $(sort $(wildcard services/*/pyproject.toml))
SERVICES := $(patsubst %/pyproject.toml,%,$(PYPROJ))

.PHONY: setup run test bench lint clean
setup: .venv/.installed

.venv/.installed: requirements.txt $(PYPROJ)
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt $(foreach s,$(SERVICES),-e ./$(s))
	touch $@

# The main job: a real training run with seed layers (see README).
run: setup
	$(PY) -m kasmina demo $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

bench: setup
	$(PY) benchmarks/bench_dormant.py --device cpu

lint: setup
	$(PY) -m pip install -q ruff && $(PY) -m ruff check services tests benchmarks examples

clean:
	rm -rf .venv runs .pytest_cache .hypothesis
