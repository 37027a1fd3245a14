"""The same cells through the hf and vllm backends, side by side: evaluation wall time (a loglikelihood task and a
generation task, the model load / engine start apart), decode tokens/s at batch 1 and 8, throughput, weights in
memory, and the backend consistency check (per-item agreement with hf), printed as vllm / hf ratios.

    python bench/backends.py                      # baseline, W4A16 (gptq), W8A8 (smoothquant), FP8; 250 ARC items
    python bench/backends.py --arc 50 --gsm8k 2   # quicker
    python bench/backends.py --methods none,gptq --store /tmp/bench-backends   # reuse an earlier bench's store

Each (method, backend) is one `python -m qllm.run` cell in a fresh (or the given) store and cache; vllm cells run in
the vLLM environment (.venv-vllm). A scheme vllm cannot run on this device is refused at planning: its row says
why. On a CPU with AMX the W4A16 checkpoint also runs as W4A8 (eval.cpu_int4_w4a8=true), its own row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qllm.errors import QllmConfigError  # noqa: E402
from qllm.planning import compose_cell  # noqa: E402
from qllm.stages.backends import vllm  # noqa: E402

METHODS = {"none": ["method=none"], "gptq": ["method=gptq", "bits=4"], "smoothquant": ["method=smoothquant", "bits=8"],
           "fp8": ["method=fp8", "bits=8"]}


def run(args: list[str], store: Path, cache: Path) -> tuple[int, float]:
    env = {**os.environ, "QLLM_CACHE_DIR": str(cache)}
    cmd = [sys.executable, "-m", "qllm.run", *args, f"tracking.uri=sqlite:///{store}/mlflow.db",
           f"tracking.artifact_root={store}/artifacts", f"hydra.run.dir={store}/outputs/${{now:%H-%M-%S-%f}}"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    (store / "logs").mkdir(exist_ok=True)
    (store / "logs" / f"{int(time.time() * 1000)}.log").write_text(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    return proc.returncode, time.perf_counter() - t


def latest(store: Path, method: str, backend: str, w4a8: bool) -> dict | None:
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    df = mlflow.search_runs(experiment_names=["qllm"], filter_string=f"params.method = '{method}' and "
                            f"params.`eval.backend` = '{backend}' and tags.`qllm.status` = 'finished'",
                            order_by=["attributes.start_time DESC"])
    for _, r in df.iterrows():
        if (r.get("params.eval.cpu_int4_w4a8") == "True") == w4a8:
            return r.to_dict()
    return None


def fmt(v, digits=1) -> str:
    return "—" if v is None or v != v else f"{v:.{digits}f}"


def ratio(a, b) -> str:
    return "—" if not a or not b or a != a or b != b else f"{a / b:.2f}x"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="none,gptq,smoothquant,fp8")
    p.add_argument("--arc", type=int, default=250, help="ARC-Easy items (loglikelihood)")
    p.add_argument("--gsm8k", type=int, default=5, help="GSM8K items (5-shot generation)")
    p.add_argument("--max-gen-toks", type=int, default=128)
    p.add_argument("--calibration-samples", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--store", type=Path, default=None, help="store + cache dir (default: a fresh temp dir)")
    a = p.parse_args()
    root = a.store or Path(tempfile.mkdtemp(prefix="qllm-bench-backends-"))
    root.mkdir(parents=True, exist_ok=True)
    store, cache = root / "store", root / "cache"
    store.mkdir(exist_ok=True)
    common = ["model=smollm2-135m-instruct", "task=backend_check", f"task.tasks.arc_easy_offline.limit={a.arc}",
              f"task.tasks.gsm8k_offline.limit={a.gsm8k}", f"task.tasks.gsm8k_offline.max_gen_toks={a.max_gen_toks}",
              f"calibration.num_samples={a.calibration_samples}", "profile.speed=true",
              "profile.speed_batch_sizes=[1,8]", f"profile.speed_prompt_len={a.prompt_len}",
              f"profile.speed_output_len={a.output_len}", "profile.speed_repeats=3", "eval.max_length=2048"]
    amx = "amx_tile" in vllm._cpu_flags()
    print(f"[bench] store and cache under {root}; CPU AMX: {amx}", flush=True)
    rows = []
    for method in a.methods.split(","):
        variants = [("hf", False), ("vllm", False)] + ([("vllm", True)] if amx and method == "gptq" else [])
        for backend, w4a8 in variants:
            args = [*METHODS[method], *common, f"eval={backend}"] + (["eval.cpu_int4_w4a8=true"] if w4a8 else [])
            label = f"{method} · {backend}" + (" as W4A8" if w4a8 else "")
            try:
                compose_cell([*args, f"cache_dir={cache}"])
            except QllmConfigError as e:
                rows.append({"label": label, "refused": str(e)})
                print(f"[bench] {label}: refused at planning: {e}", flush=True)
                continue
            rc, wall = run(args, store, cache)
            r = latest(store, method, backend, w4a8)
            print(f"[bench] {label}: exit {rc} in {wall:.0f} s", flush=True)
            rows.append({"label": label, "method": method, "backend": backend, "run": r, "wall": wall, "rc": rc})
    report(rows)
    (root / "bench_backends.json").write_text(json.dumps(rows, indent=2, default=str))
    print(f"[bench] rows: {root / 'bench_backends.json'}")


def m(r: dict | None, key: str):
    return None if r is None else r.get(f"metrics.{key}")


def report(rows: list[dict]) -> None:
    hf = {x["method"]: x["run"] for x in rows if x.get("backend") == "hf" and x.get("run")}
    head = ("cell", "load s", "ARC s", "GSM8K s", "decode bs1 tok/s", "decode bs8 tok/s", "throughput tok/s",
            "weights MB", "ARC acc_norm", "agree w/ hf", "vs hf: ARC time", "decode bs1", "decode bs8")
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for x in rows:
        if "refused" in x:
            print(f"| {x['label']} | refused at planning: {x['refused'][:160]} |" + " |" * (len(head) - 2))
            continue
        r, base = x["run"], hf.get(x["method"])
        if r is None:
            print(f"| {x['label']} | failed (exit {x['rc']}): see the bench store's logs/ |" + " |" * (len(head) - 2))
            continue
        vs = x["backend"] != "hf"
        cells = [x["label"], fmt(m(r, "evaluate/load_wall_s")), fmt(m(r, "arc_easy_offline/eval_wall_s")),
                 fmt(m(r, "gsm8k_offline/eval_wall_s")), fmt(m(r, "speed/bs1/decode_tok_s")),
                 fmt(m(r, "speed/bs8/decode_tok_s")), fmt(m(r, "speed/throughput_output_tok_s")),
                 fmt((m(r, "size/weights_in_memory_gb") or float("nan")) * 1e3, 0),
                 fmt(m(r, "arc_easy_offline/acc_norm"), 3),
                 fmt(100 * (m(r, "consistency/arc_easy_offline/agreement") or float("nan"))) + " %" if vs else "",
                 ratio(m(base, "arc_easy_offline/eval_wall_s"), m(r, "arc_easy_offline/eval_wall_s")) if vs else "",
                 ratio(m(r, "speed/bs1/decode_tok_s"), m(base, "speed/bs1/decode_tok_s")) if vs else "",
                 ratio(m(r, "speed/bs8/decode_tok_s"), m(base, "speed/bs8/decode_tok_s")) if vs else ""]
        print("| " + " | ".join(cells) + " |")
    print("\nvs hf: ARC time = hf time / vllm time (> 1: vllm faster); decode = vllm tok/s / hf tok/s. hf speed is "
          "dense speed (weights decompressed), vllm speed is the checkpoint's own kernels; load s = model load / "
          "engine start, not in the task times.")


if __name__ == "__main__":
    main()
