"""The sensitivity analysis's wall time beside one uniform GPTQ cell's quantize stage, side by side in one run, on
SmolLM2 with the default calibration (64 x 512 WikiText-2 tokens) and the default candidate list.

    python bench/sensitivity_speed.py                  # ~10 min on 2 cores
    python bench/sensitivity_speed.py --seeds 0,1      # also the ranking's stability across calibration seeds

Rows: `qllm sensitivity --force` (model conversion into the bench's fresh cache and load, capture, every candidate on
every layer, the end-to-end check; its phases as the table records them) and
`python -m qllm.run method=gptq bits=4 force=true` (its quantize/wall_s: calibration + oneshot, and the stage's
wall time). Target: the sensitivity run under 10 minutes.
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from quantize_speed import finished_run, metric  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0")
    p.add_argument("--store", type=Path, default=None)
    a = p.parse_args()
    root = a.store or Path(tempfile.mkdtemp(prefix="qllm-bench-sensitivity-"))
    env = {**os.environ, "QLLM_CACHE_DIR": str(root / "cache")}
    store = [f"tracking.uri=sqlite:///{root}/mlflow.db", f"tracking.artifact_root={root}/artifacts"]
    print(f"[bench] under {root}; {os.cpu_count()} cores", flush=True)

    t = time.perf_counter()
    with open(root / "sensitivity.log", "w") as log:
        rc_s = subprocess.run([sys.executable, "-m", "qllm", "sensitivity", "--force", "--seeds", a.seeds,
                               "--out", str(root / "sensitivity"), *store], cwd=REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT).returncode
    sens_s = time.perf_counter() - t
    table = json.loads((root / "sensitivity" / "sensitivity.json").read_text()) if rc_s == 0 else {}
    print(f"[bench] sensitivity: rc={rc_s} {sens_s:.1f} s", flush=True)

    t = time.perf_counter()
    with open(root / "gptq.log", "w") as log:
        rc_g = subprocess.run([sys.executable, "-m", "qllm.run", "method=gptq", "bits=4", "force=true",
                               "task=wikitext_offline", "task.limit=2", "profile.speed=false", *store,
                               f"hydra.run.dir={root}/outputs"], cwd=REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT).returncode
    cell_s = time.perf_counter() - t
    run = finished_run(root) if rc_g == 0 else None
    quant_s = metric(run, "quantize/wall_s")
    print(f"[bench] gptq cell: rc={rc_g} {cell_s:.1f} s", flush=True)

    print(f"\nSmolLM2-135M, calibration 64x512, {os.cpu_count()} cores")
    print(f"{'row':<34} {'wall s':>8}")
    print("-" * 43)
    seeds = len(a.seeds.split(","))
    print(f"{'sensitivity (' + str(seeds) + ' seed' + ('s' if seeds > 1 else '') + ', whole command)':<34} "
          f"{sens_s:>8.1f}")
    for k, v in (table.get("wall_s") or {}).items():
        print(f"{'  of which ' + k + ' (first seed)':<34} {v:>8.1f}")
    if table.get("e2e"):
        print(f"{'  of which end-to-end check':<34} {table['e2e']['wall_s']:>8.1f}")
    print(f"{'gptq W4 g64: quantize/wall_s':<34} {quant_s if quant_s is not None else float('nan'):>8.1f}")
    print(f"{'gptq W4 g64: whole cell':<34} {cell_s:>8.1f}")
    if quant_s:
        print(f"\nsensitivity / one GPTQ quantization: {sens_s / quant_s:.2f}x (target: sensitivity < 600 s; "
              f"{'met' if sens_s < 600 else 'MISSED'})")
    for k, v in (table.get("seed_spearman") or {}).items():
        print(f"ranking stability {k}: Spearman rho {v:.3f}")


if __name__ == "__main__":
    main()
