"""qllm's overhead on one cell: the default cell through `python -m qllm.run` vs the same work as a bare script.

The bare script does in one process what a user would write by hand: load the model, llmcompressor `oneshot` with
the same recipe and calibration data, save the compressed checkpoint, evaluate it with lm-eval `simple_evaluate` on
the same task configs and limits. qllm adds Hydra, planning, two stage processes and MLflow logging.
Both start from the converted base model (converted once, beforehand, not timed). Target: qllm/bare <= 1.10.

    python bench/one_cell.py [--repeats N] [overrides for both, e.g. task=arc_easy_offline task.limit=50]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

BARE = r'''
import sys, yaml, torch
from qllm.planning import compose_cell
from qllm.stages.calibration import calibration_dataset
from qllm.tasks.spec import lm_eval_config
from qllm.sources.models import prepare
cell = compose_cell(sys.argv[2:])  # only to get the identical model, recipe, calibration and task configs
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM, AutoTokenizer
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
src = prepare(cell.model, cell.data_dir, cell.cache_dir)
tok = AutoTokenizer.from_pretrained(src)
model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, cell.model["dtype"]))
ds = calibration_dataset(cell.calibration, tok, cell.data_dir)
oneshot(model=model, tokenizer=tok, recipe=yaml.safe_dump(cell.recipe, sort_keys=False), dataset=ds,
        num_calibration_samples=len(ds), max_seq_length=cell.calibration["max_seq_len"])
model.save_pretrained(sys.argv[1], save_compressed=True); tok.save_pretrained(sys.argv[1])
lm = HFLM(pretrained=sys.argv[1], dtype=cell.model["dtype"], device="cpu", batch_size=cell.eval["batch_size"])
for key, entry in cell.tasks.items():
    r = simple_evaluate(model=lm, tasks=[lm_eval_config(entry, lm.tokenizer)], limit=entry["limit"],
                        bootstrap_iters=cell.eval["bootstrap_iters"])
    print(key, {k: v for k, v in next(iter(r["results"].values())).items() if "," in k})
'''


def timed(cmd: list[str], env: dict, log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, check=True, cwd=REPO)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=1)
    a, overrides = p.parse_known_args()
    py = sys.executable
    cache = Path(os.environ.get("QLLM_CACHE_DIR", REPO / ".cache" / "qllm"))
    env = {**os.environ, "QLLM_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory(prefix="qllm-bench-") as tmp:
        tmp = Path(tmp)
        # convert the base model once, untimed, for both sides
        subprocess.run([py, "-c", "import sys; from qllm.planning import compose_cell; from qllm.sources.models import prepare; "
                        "c = compose_cell(sys.argv[1:]); print(prepare(c.model, c.data_dir, c.cache_dir))",
                        *overrides], env=env, check=True, cwd=REPO)
        rows = []
        for i in range(a.repeats):
            bare = timed([py, "-c", BARE, str(tmp / f"bare-ckpt-{i}"), *overrides], env, tmp / "bare.log")
            qllm = timed([py, "-m", "qllm.run", *overrides, "force=true",
                          f"tracking.uri=sqlite:///{tmp}/mlruns/mlflow.db", f"tracking.artifact_root={tmp}/mlruns/a",
                          f"hydra.run.dir={tmp}/out-{i}"], env, tmp / "qllm.log")
            rows.append((bare, qllm))
            print(f"repeat {i + 1}: bare {bare:7.1f} s   qllm {qllm:7.1f} s   qllm/bare {qllm / bare:.3f}", flush=True)
        bare_t, qllm_t = sorted(r[0] for r in rows)[len(rows) // 2], sorted(r[1] for r in rows)[len(rows) // 2]
        print(f"\nmedian over {len(rows)}: bare {bare_t:.1f} s, qllm {qllm_t:.1f} s, "
              f"ratio qllm/bare = {qllm_t / bare_t:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
