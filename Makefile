# Every target CI needs; `make test` and `make demo` work on a fresh machine with Python 3.11 and make.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export DS_BUILD_OPS := 0
export DS_ACCELERATOR := cpu
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup check test lint demo crd chart prometheus clean
setup: $(VENV)/.installed prometheus

# promtool and the Prometheus server, for the alert and dashboard tests: Debian's package (CI runs
# as root with the Debian registry); nothing to do where both are on the PATH already.
prometheus:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || \
	  { apt-get update -q && apt-get install -y -q --no-install-recommends prometheus; }

# torch goes first, from the CPU wheel, under the same constraint as everything else: deepspeed's
# metadata would otherwise pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[operator,trainer,dev]'
	$(BIN)/pip check
	touch $@

lint: setup
	$(BIN)/ruff check operator trainer contract standin tests bench examples observability
	$(BIN)/ruff format --check operator trainer contract standin tests bench examples observability
	$(BIN)/mypy
	$(BIN)/lint-imports

# The fast loop: lint and every test that is not slow (tests/conftest.py marks what trains, starts
# a process or runs the stand-in); under 5 minutes on 2 cores. Two xdist workers: 1.2-1.6x faster
# here. The whole suite stays serial: its slow tests already use both cores (torchrun, preprocess
# workers) and its session fixtures (model assets, warm launcher, moto) would be built per worker.
check: setup lint
	$(BIN)/pytest -q -n 2 -m "not slow and not gpu and not e2e"

# The whole suite, for CI.
test: setup lint
	$(BIN)/pytest -q -m "not gpu and not e2e"

# Examples with local paths, for `kubetrain run` only (tests/support/runspecs.py: LOCAL_ONLY).
LOCAL_EXAMPLES := examples/tinystories-cpu.yaml examples/mixture-cpu.yaml

# The demo needs only the venv (Prometheus is for the alert and dashboard tests).
demo: $(VENV)/.installed
	$(BIN)/kubetrain validate $(filter-out $(LOCAL_EXAMPLES),$(wildcard examples/*.yaml))
	$(BIN)/kubetrain validate --target local $(LOCAL_EXAMPLES)
	$(BIN)/kubetrain render examples/tinystories.yaml > /dev/null
	$(BIN)/kubetrain run examples/tinystories-cpu.yaml

crd: setup
	$(BIN)/kubetrain crd > crds/trainingruns.kubetrain.dev.yaml
	cp crds/trainingruns.kubetrain.dev.yaml charts/kubetrain/crds/
	$(MAKE) chart

# The chart's generated files (CRD template, RBAC rules, dashboard JSON, health checks) from their
# sources; tests/chart/test_chart.py fails when one is stale.
chart: $(VENV)/.installed
	$(BIN)/python observability/generate.py

clean:
	rm -rf $(VENV) build *.egg-info
