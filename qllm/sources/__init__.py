"""Where a model's weights come from, and turning them into a local Hugging Face directory once.

    models.py   model sources (hub, local, model=hf by path, gguf_package, llama2c, random): planning checks (no
                weights) and `prepare` (conversion into the cache, run inside a stage process)
    llama2c.py  Karpathy's llama2.c checkpoints -> Hugging Face Llama
    hub.py      is the Hugging Face hub reachable for a repo (one quick probe)

Planning imports this package on the orchestrator side: torch and transformers are imported inside the functions
that convert weights, never at module level (llama2c.py is only imported by `prepare`).
"""
