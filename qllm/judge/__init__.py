"""MT-Bench's judge: planning it (no network), talking to any OpenAI-compatible chat endpoint, starting a local one,
grading answers (single and pairwise, every verdict cached) and turning verdicts into scores.

    planning.py  the `judge` config checked and resolved at planning (which server, the local model's identity)
    client.py    one OpenAI-compatible chat endpoint: requests with retries and backoff, reachability at start
    server.py    a local OpenAI-compatible server (`vllm serve` or `transformers serve`) for the judge stage
    grading.py   the judgments a cell needs, each cached by what it was asked; run with a concurrency limit
    scores.py    single-answer scores and the pairwise verdict against the baseline, with bootstrap CIs

Imports neither torch nor the stages (the judge stage, qllm.stages.judge, runs this in its own process).
"""
