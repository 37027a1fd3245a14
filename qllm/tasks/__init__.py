"""Benchmark tasks: what a task entry of conf/task/ means to lm-eval, and what qllm keeps of its results.

    spec.py      a task entry -> lm-eval task config or group (py: references, caps, checks at planning)
    wikitext.py  WikiText-2 documents and perplexity metrics from the local file
    results.py   lm-eval's result dict -> TaskResult, per-sample records, difficulty buckets, the suite score
    twins/       offline twins: the hub tasks' benchmarks read from data_dir in the hub datasets' schema

Imported on both sides (planning checks entries; the evaluate stage builds them): nothing here imports torch at
module level, and nothing imports from qllm.stages.
"""
