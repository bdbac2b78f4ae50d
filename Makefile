# The verbs of the Kasmina fleet. Every target that needs Python calls `setup` first, which is
# idempotent: it (re)installs only when a requirements or pyproject file changed.
PY       := .venv/bin/python
PYPROJ   := $(sort $(wildcard services/*/pyproject.toml))
SERVICES := $(patsubst %/pyproject.toml,%,$(PYPROJ))
# Extras a service's tests need: kasmina-runtime's library needs only torch and numpy, its tests
# every extra (the fleet, the digits demo, the Lightning and Hugging Face integrations, Triton).
EXTRAS_kasmina-runtime := [all]

.PHONY: setup run demo test bench proto lint clean up down smoke
setup: .venv/.installed

.venv/.installed: requirements.txt $(PYPROJ)
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt $(foreach s,$(SERVICES),-e './$(s)$(EXTRAS_$(notdir $(s)))')
	touch $@

# The main job: the whole fleet as processes and a real training job (see README).
run: setup
	$(PY) -m kasmina fleet $(ARGS)

# Seed layers grown in-process by the LocalController, no fleet.
demo: setup
	$(PY) -m kasmina demo $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

bench: setup
	$(PY) benchmarks/bench_dormant.py --device cpu
	$(PY) benchmarks/bench_bus.py
	$(PY) benchmarks/bench_regress.py

# After editing proto/: regenerate oona's Python and check nothing released was broken.
proto: setup
	$(PY) -m oona.codegen
	$(PY) -m oona.compat

# The fleet in containers (deploy/README.md): build every image offline, start in health-check
# order, stop. COMPOSE: `docker compose` (v2) where it is installed, else `docker-compose` (v1,
# what Debian ships). Removing containers on the vfs storage driver outlasts compose v1's 60 s
# default API timeout, which left a half-removed stack that broke the next `up`.
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo docker compose || echo docker-compose)
DEPLOY  = $(COMPOSE) -f deploy/docker-compose.yml $(if $(GPU),-f deploy/docker-compose.gpu.yml)
export COMPOSE_HTTP_TIMEOUT ?= 600
up:
	COMPOSE="$(COMPOSE)" GPU="$(GPU)" deploy/up.sh
down:
	$(DEPLOY) --profile grafana down --remove-orphans
# End to end without a registry: root, a running dockerd, debootstrap (deploy/smoke.sh).
smoke:
	COMPOSE="$(COMPOSE)" deploy/smoke.sh

lint: setup
	$(PY) -m pip install -q ruff && $(PY) -m ruff check services tests benchmarks examples

clean:
	rm -rf .venv runs .pytest_cache .hypothesis
