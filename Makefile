# Every target CI needs; `make test` and `make demo` work on a fresh machine with Python 3.11 and make.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export DS_BUILD_OPS := 0
export DS_ACCELERATOR := cpu
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup test lint demo crd clean
setup: $(VENV)/.installed

# torch goes first, from the CPU wheel, under the same constraint as everything else: deepspeed's
# metadata would otherwise pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[operator,trainer,dev]'
	$(BIN)/pip check
	touch $@

lint: setup
	$(BIN)/ruff check operator trainer tests bench examples
	$(BIN)/ruff format --check operator trainer tests bench examples
	$(BIN)/mypy
	$(BIN)/lint-imports

test: setup lint
	$(BIN)/pytest -q -m "not gpu and not e2e"

demo: setup
	$(BIN)/kubetrain validate examples/*.yaml
	$(BIN)/kubetrain render examples/tinystories-cpu.yaml > /dev/null
	$(BIN)/kubetrain run examples/tinystories-cpu.yaml

crd: setup
	$(BIN)/kubetrain crd > crds/trainingruns.kubetrain.dev.yaml
	cp crds/trainingruns.kubetrain.dev.yaml charts/kubetrain/crds/

clean:
	rm -rf $(VENV) build *.egg-info
