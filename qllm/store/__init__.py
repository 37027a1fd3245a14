"""Where results are kept: the content-addressed cache and the MLflow store.

    cache.py         checkpoints, converted models, finished tasks and speed benchmarks on disk: locks, atomic
                     publication, integrity checks (the `qllm cache` CLI is qllm/cache.py)
    tracking.py      one MLflow run per cell under one parent run per sweep: params, metrics, tags, artifacts
    mlflow_store.py  opening a sqlite store safely from many processes

Imports no torch and nothing from qllm.stages (the report reads the store through here).
"""
