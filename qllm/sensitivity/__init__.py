"""Where quantization hurts: per-layer SQNR of each candidate quantizer (`qllm sensitivity`, profile.sensitivity),
the mixed-precision allocation over it (`method=mixed`), and the plots of both.

    capture     one calibration forward: each linear layer's input second moment (the GPTQ Hessian)
    candidates  (method, bits, group size) and what each costs in stored bits per weight
    sqnr        one layer quantized by one candidate (llmcompressor's own observer and GPTQ) and its output SQNR
    analysis    the table layers x candidates, the end-to-end check, the cache
    allocate    the greedy allocation under an average bits-per-weight budget
    heatmap     the table as a figure
"""
