"""Errors qllm raises for bad input: caught at the entry point and printed without a traceback."""


class QllmConfigError(ValueError):
    """A configuration that cannot run (bad bits, missing data, unreachable model, ...)."""
