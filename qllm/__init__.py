"""qllm: evaluate what quantization costs an LLM, per task, in memory and speed."""

__version__ = "0.1.0"
