"""The quantize stage's wall time, before and after qllm's speed settings, side by side in one run: AWQ and GPTQ W4
on SmolLM2 with the default calibration (64 x 512 WikiText-2 tokens), and the WikiText-2 perplexity of each
checkpoint, so a faster setting is only taken if its checkpoint is as good.

    python bench/quantize_speed.py                       # the six rows below (45-85 min on 2 cores, by machine)
    python bench/quantize_speed.py --rows awq-after,gptq-after --ppl-docs 10

Rows (each a `python -m qllm.run` cell with force=true, so nothing is reused; one fresh store per row):
  awq-before   llmcompressor's defaults: n_grid=20, calibration batch 1, the grid search under the eager attention
               that calibration forces, every grid point a forward (QLLM_COMPAT_OFF=awq_sdpa_grid_search,
               awq_linear_loss_by_gram)
  awq-after    method.settings.n_grid=<--awq-n-grid>, with qllm's two grid-search fixes (compat.py): attention
               through SDPA, and Linear parents (down_proj) scored by the inputs' Gram matrix
  awq-autocast as awq-after, with calibration.autocast=<--awq-autocast>: the calibration forwards' GEMMs in bf16
  awq-fast     as awq-autocast, with calibration.propagate_error=false: no second (propagation) pass per layer, the
               next layer calibrates on the first pass's outputs (for AWQ equal up to rounding: smoothing is an
               equivalence transform and quantization is off during calibration)
  gptq-before  calibration batch 1
  gptq-after   calibration.batch_size=<--gptq-batch>

Times are the stage's `quantize/wall_s` (calibration data + oneshot, what the method costs; model load and save
apart) and the stage process's wall time. Perplexity: word perplexity on the first --ppl-docs WikiText-2 test
documents (the calibration text comes from the file's end), each truncated to --ppl-doc-tokens tokens. The ratio
columns are row / the method's before row.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow

REPO = Path(__file__).resolve().parent.parent
MODEL = "model=smollm2-135m-instruct"


def rows(a: argparse.Namespace) -> dict[str, tuple[str, list[str], dict[str, str]]]:
    """name -> (method, overrides, extra env)."""
    awq_after = ["method=awq", "bits=4", f"method.settings.n_grid={a.awq_n_grid}"] \
        + ([f"method.settings.duo_scaling={a.awq_duo_scaling}"] if a.awq_duo_scaling != "true" else []) \
        + ([f"calibration.batch_size={a.awq_batch}"] if a.awq_batch > 1 else [])
    return {
        "awq-before": ("awq", ["method=awq", "bits=4"],
                       {"QLLM_COMPAT_OFF": "awq_sdpa_grid_search,awq_linear_loss_by_gram"}),
        "awq-after": ("awq", awq_after, {}),
        "awq-autocast": ("awq", [*awq_after, f"calibration.autocast={a.awq_autocast}"], {}),
        "awq-fast": ("awq", [*awq_after, f"calibration.autocast={a.awq_autocast}", "calibration.propagate_error=false"],
                     {}),
        "gptq-before": ("gptq", ["method=gptq", "bits=4"], {}),
        "gptq-after": ("gptq", ["method=gptq", "bits=4", f"calibration.batch_size={a.gptq_batch}"], {}),
    }


def run_cell(overrides: list[str], env_extra: dict[str, str], store: Path, cache: Path) -> tuple[int, float]:
    env = {**os.environ, "QLLM_CACHE_DIR": str(cache), **env_extra}
    cmd = [sys.executable, "-m", "qllm.run", *overrides, "force=true", f"tracking.uri=sqlite:///{store}/mlflow.db",
           f"tracking.artifact_root={store}/artifacts", f"hydra.run.dir={store}/outputs"]
    t = time.perf_counter()
    with open(store / "log.txt", "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    return rc, time.perf_counter() - t


def finished_run(store: Path) -> dict | None:
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    df = mlflow.search_runs(experiment_names=["qllm"], filter_string="tags.`qllm.status` = 'finished'")
    return None if df.empty else df.iloc[0].to_dict()


def metric(run: dict | None, suffix: str) -> float | None:
    if run is None:
        return None
    hits = [v for k, v in run.items() if k.startswith("metrics.") and k.endswith(suffix)]
    return float(hits[0]) if hits else None


def fmt(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="awq-before,awq-after,awq-autocast,awq-fast,gptq-before,gptq-after")
    p.add_argument("--awq-n-grid", type=int, default=6, help="AWQ grid points in the after row (>= 3)")
    p.add_argument("--awq-duo-scaling", default="true", choices=["true", "false", "both"],
                   help="AWQ's duo_scaling in the after and autocast rows (false: activation-only scales, n_grid points)")
    p.add_argument("--awq-batch", type=int, default=1, help="calibration batch size of the AWQ after and autocast rows")
    p.add_argument("--awq-autocast", default="bfloat16", help="calibration.autocast of the awq-autocast row")
    p.add_argument("--gptq-batch", type=int, default=16, help="calibration batch size of the GPTQ after row")
    p.add_argument("--ppl-docs", type=int, default=20, help="WikiText-2 documents for the perplexity (<= 40)")
    p.add_argument("--ppl-doc-tokens", type=int, default=1024, help="tokens per document")
    p.add_argument("--store", type=Path, default=None, help="where stores and the cache go (default: a temp dir)")
    a = p.parse_args()
    root = a.store or Path(tempfile.mkdtemp(prefix="qllm-bench-quantize-"))
    cache = root / "cache"
    table = rows(a)
    unknown = [r for r in a.rows.split(",") if r not in table]
    if unknown:
        sys.exit(f"unknown rows {unknown}; valid: {', '.join(table)}")
    task = ["task=wikitext_offline", f"task.limit={a.ppl_docs}", f"task.tasks.wikitext_offline.max_doc_tokens={a.ppl_doc_tokens}",
            "profile.speed=false"]
    print(f"[bench] stores and cache under {root}; {os.cpu_count()} cores", flush=True)
    results: dict[str, dict] = {}
    for name in a.rows.split(","):
        method, overrides, env = table[name]
        store = root / name
        store.mkdir(parents=True, exist_ok=True)
        print(f"[bench] {name}: {' '.join(overrides)} {' '.join(f'{k}={v}' for k, v in env.items())}", flush=True)
        rc, wall = run_cell([MODEL, *overrides, *task], env, store, cache)
        run = finished_run(store) if rc == 0 else None
        results[name] = {"method": method, "rc": rc, "cell_s": wall, "quantize_s": metric(run, "quantize/wall_s"),
                         "stage_s": metric(run, "quantize/stage_wall_s"), "ppl": metric(run, "/word_perplexity"),
                         "log": store / "log.txt"}
        r = results[name]
        print(f"[bench] {name}: rc={rc} quantize {fmt(r['quantize_s'])} s, ppl {fmt(r['ppl'], 3)}", flush=True)

    print(f"\nQuantize stage, SmolLM2-135M W4, calibration 64x512 (default), {os.cpu_count()} cores; "
          f"perplexity: WikiText-2 word ppl, first {a.ppl_docs} docs x {a.ppl_doc_tokens} tokens")
    head = f"{'row':<12} {'quantize s':>10} {'vs before':>9} {'stage s':>8} {'word ppl':>9} {'ppl vs before':>13}"
    print(head + "\n" + "-" * len(head))
    for name, r in results.items():
        before = results.get(f"{r['method']}-before")
        speed = ppl_delta = "—"
        if before and before["quantize_s"] and r["quantize_s"]:
            speed = f"{before['quantize_s'] / r['quantize_s']:.2f}x"
        if before and before["ppl"] and r["ppl"]:
            ppl_delta = f"{100 * (r['ppl'] / before['ppl'] - 1):+.2f}%"
        status = "" if r["rc"] == 0 else f"  FAILED rc={r['rc']}: see {r['log']}"
        print(f"{name:<12} {fmt(r['quantize_s']):>10} {speed:>9} {fmt(r['stage_s']):>8} {fmt(r['ppl'], 3):>9} "
              f"{ppl_delta:>13}{status}")
    print("\nvs before: the method's before row's quantize time / this row's (higher is faster); ppl vs before: "
          "relative change of perplexity (target: AWQ within 1%).")


if __name__ == "__main__":
    main()
