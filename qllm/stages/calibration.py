"""Calibration data for methods that need it (GPTQ, AWQ, SmoothQuant): tokenized, fixed-length, seeded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import QllmConfigError
from ..tasks.wikitext import split_wikitext_documents


def calibration_dataset(calib: dict, tokenizer: Any, data_dir: str) -> Any:
    """`num_samples` sequences of at most `max_seq_len` tokens, as a datasets.Dataset of input_ids/attention_mask."""
    import datasets

    n, seq, seed = calib["num_samples"], calib["max_seq_len"], calib["seed"]
    if calib["source"] == "local_text":
        text = (Path(data_dir) / calib["path"]).read_text(encoding="utf-8")
        docs = split_wikitext_documents(text)[calib.get("skip_docs_from_start", 0):]
        ids = torch.tensor(tokenizer("".join(docs), add_special_tokens=False)["input_ids"])
        if len(ids) < seq + 1:
            raise QllmConfigError(f"calibration text has {len(ids)} tokens, fewer than max_seq_len={seq}")
        # Random windows (GPTQ's protocol), reproducible through the seed.
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(ids) - seq, (n,), generator=g).tolist()
        rows = [ids[s : s + seq].tolist() for s in starts]
    elif calib["source"] == "hub":
        ds = datasets.load_dataset(calib["path"], calib.get("hub_config"), split=calib["split"])
        ds = ds.shuffle(seed=seed).select(range(min(n, len(ds))))
        col = calib["text_column"]
        texts = [
            tokenizer.apply_chat_template(x, tokenize=False) if isinstance(x, list) else x for x in ds[col]
        ]
        rows = [tokenizer(t, add_special_tokens=False, truncation=True, max_length=seq)["input_ids"] for t in texts]
    else:
        raise QllmConfigError(f"calibration source '{calib['source']}' unknown; valid: local_text, hub")
    return datasets.Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
