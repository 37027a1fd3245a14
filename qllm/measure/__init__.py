"""What a cell costs besides accuracy, measured without knowing which stage asks.

    profiling.py     per-stage and per-phase memory (RSS high-water marks, CUDA peaks, NVML, timelines, snapshots)
    sizes.py         checkpoint sizes and effective bits per weight from safetensors headers (no torch); bytes of a
                     loaded model
    speed.py         prefill/decode speed, TTFT/TPOT and the memory-bandwidth bound of a loaded model
    fingerprint.py   which weights a loaded model holds (quantization grid, on-the-fly activation quantization)
    cost_metrics.py  all of it as MLflow metrics (names from qllm.names)

torch is imported inside the functions that need a loaded model. Imports nothing from qllm.stages.
"""
