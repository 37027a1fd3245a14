"""Memory of a stage, measured inside the stage's own process (quantize, evaluate), phase by phase.

- CPU: peak RSS of the stage process and its children. A sampler thread reads RSS every `sample_interval_s` (the
  timeline); peaks also take the kernel's exact high-water mark of the process (VmHWM, reset at each phase start
  on Linux, and ru_maxrss), which a sampler cannot miss.
- CUDA: per phase `max_memory_allocated` / `max_memory_reserved` (peak stats reset at each phase start) and the
  device-level used memory (NVML when available, else cudaMemGetInfo), sampled like RSS; with `memory_snapshot` the
  allocator history (`torch.cuda.memory._record_memory_history`) dumped as a pickle for pytorch.org/memory_viz.

Writes `profile_<stage>.json`, and with `timeline` a CSV and a PNG of memory over time with the phases marked.
Importing this module imports no torch; CUDA figures are read only when torch is already imported and CUDA is in use.
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import psutil

GB = 1e9


def _cuda() -> Any:
    """torch.cuda when this process has initialised CUDA, else None (never imports torch; torch may be half-imported
    when the sampler thread looks)."""
    cuda = getattr(sys.modules.get("torch"), "cuda", None)
    try:
        return cuda if cuda is not None and cuda.is_initialized() else None
    except Exception:
        return None


def _hwm() -> Optional[int]:
    """This process's RSS high-water mark (VmHWM, exact; Linux), in bytes."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return None


def _reset_hwm() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so each phase gets its own exact peak."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def rss_tree(proc: psutil.Process) -> int:
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += child.memory_info().rss
    return total


def _device_used(cuda: Any) -> Optional[int]:
    """Device-level used memory (all processes on the GPU), NVML first."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(cuda.current_device())
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:  # no NVML (library or driver): the CUDA runtime's view
        free, total = cuda.mem_get_info()
        return int(total - free)


class StageProfiler:
    """`with StageProfiler("evaluate", out_dir, ...) as prof: with prof.phase("load"): ...`"""

    def __init__(self, stage: str, out_dir: Path, enabled: bool = True, timeline: bool = True,
                 sample_interval_s: float = 0.2, memory_snapshot: bool = False):
        self.stage, self.out_dir, self.enabled = stage, Path(out_dir), enabled
        self.timeline, self.interval, self.snapshot = timeline, sample_interval_s, memory_snapshot
        self.samples: list[tuple[float, int, Optional[int], Optional[int]]] = []  # t, rss, cuda allocated, device used
        self.phases: dict[str, dict] = {}
        self._marks: list[tuple[str, float, float]] = []
        self._stop = threading.Event()
        self._proc = psutil.Process()
        self._t0 = time.perf_counter()
        self._hwm_max = 0
        self._recording = False

    # ---- sampling ----

    def _sample(self) -> None:
        cuda = _cuda()
        alloc = used = None
        if cuda is not None:
            alloc, used = int(cuda.memory_allocated()), _device_used(cuda)
        with contextlib.suppress(psutil.Error):
            self.samples.append((time.perf_counter() - self._t0, rss_tree(self._proc), alloc, used))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._sample()
            except Exception as e:  # a profiler must never take the stage down
                print(f"[qllm] memory sampler: {e!r}", file=sys.stderr, flush=True)

    def __enter__(self) -> "StageProfiler":
        if self.enabled:
            self._sample()
            self._thread = threading.Thread(target=self._run, name="qllm-mem-sampler", daemon=True)
            self._thread.start()
        return self

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """A named part of the stage (load, quantize, evaluate, benchmark): its wall time and memory peaks.
        Disabled, it still keeps the cheap exact figures (VmHWM, CUDA peak counters): no sampler, no files."""
        cuda = _cuda()
        if cuda is not None:
            cuda.reset_peak_memory_stats()
        self._hwm_max = max(self._hwm_max, _hwm() or 0)
        _reset_hwm()
        torch = sys.modules.get("torch")
        if self.enabled and self.snapshot and not self._recording and torch is not None and torch.cuda.is_available():
            torch.cuda.memory._record_memory_history(max_entries=200_000)  # from the first phase on, load included
            self._recording = True
        start = time.perf_counter() - self._t0
        if self.enabled:
            self._sample()
        try:
            yield
        finally:
            if self.enabled:
                self._sample()
            end = time.perf_counter() - self._t0
            self._marks.append((name, start, end))
            inside = [s for s in self.samples if start <= s[0] <= end]
            hwm = _hwm() or 0
            self._hwm_max = max(self._hwm_max, hwm)
            # the exact high-water mark of this process, or the sampled process + children, whichever is higher
            info: dict[str, Any] = {"wall_s": round(end - start, 3),
                                    "peak_rss_gb": max(hwm, max((s[1] for s in inside), default=0)) / GB}
            cuda = _cuda()
            if cuda is not None:
                info["cuda_max_allocated_gb"] = cuda.max_memory_allocated() / GB
                info["cuda_max_reserved_gb"] = cuda.max_memory_reserved() / GB
                used = [s[3] for s in inside if s[3] is not None]
                if used:
                    info["device_used_gb"] = max(used) / GB
            self.phases[name] = info

    def __exit__(self, *exc: Any) -> None:
        if not self.enabled:
            return
        self._stop.set()
        self._thread.join()
        self._sample()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # ru_maxrss: the kernel's high-water mark, in KiB on Linux (bytes on macOS)
        scale = 1 if sys.platform == "darwin" else 1024
        hwm = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * scale
        hwm = max(hwm, self._hwm_max, _hwm() or 0)  # phases reset VmHWM; their peaks are kept in _hwm_max
        summary: dict[str, Any] = {
            "stage": self.stage,
            "wall_s": round(time.perf_counter() - self._t0, 3),
            "peak_rss_gb": max(hwm, max(s[1] for s in self.samples)) / GB,
            "sample_interval_s": self.interval,
            "phases": self.phases,
        }
        cuda = _cuda()
        if cuda is not None:
            summary["device"] = cuda.get_device_name()
            for key in ("cuda_max_allocated_gb", "cuda_max_reserved_gb", "device_used_gb"):
                values = [p[key] for p in self.phases.values() if key in p]
                if values:
                    summary[key] = max(values)
            if self._recording:
                path = self.out_dir / f"memory_snapshot_{self.stage}.pickle"
                cuda.memory._dump_snapshot(str(path))
                cuda.memory._record_memory_history(enabled=None)
                summary["snapshot"] = path.name
        if self.timeline:
            summary["timeline"] = self._write_timeline()
        (self.out_dir / f"profile_{self.stage}.json").write_text(json.dumps(summary, indent=2))

    # ---- timeline ----

    def _write_timeline(self) -> list[str]:
        csv = self.out_dir / f"memory_{self.stage}.csv"
        with open(csv, "w") as f:
            f.write("t_s,rss_gb,cuda_allocated_gb,device_used_gb,phase\n")
            for t, rss, alloc, used in self.samples:
                phase = next((n for n, a, b in self._marks if a <= t <= b), "")
                f.write(f"{t:.3f},{rss / GB:.4f},{'' if alloc is None else f'{alloc / GB:.4f}'},"
                        f"{'' if used is None else f'{used / GB:.4f}'},{phase}\n")
        png = self.out_dir / f"memory_{self.stage}.png"
        plot_timeline(self.samples, self._marks, f"{self.stage} stage: memory over time", png)
        return [csv.name, png.name]


def plot_timeline(samples: list, marks: list[tuple[str, float, float]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s[0] for s in samples]
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=110)
    ax.plot(t, [s[1] / GB for s in samples], color="#0072B2", label="RSS, process + children (GB)")
    if any(s[2] is not None for s in samples):
        ax.plot(t, [(s[2] or 0) / GB for s in samples], color="#D55E00", label="CUDA allocated (GB)")
        ax.plot(t, [(s[3] or 0) / GB for s in samples], color="#009E73", ls="--", label="GPU used, device (GB)")
    for i, (name, a, b) in enumerate(marks):
        ax.axvspan(a, b, color="#999999", alpha=0.08 + 0.07 * (i % 2), lw=0)
        ax.text((a + b) / 2, 1.0, name, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("time since stage start (s)")
    ax.set_ylabel("memory (GB)")
    ax.set_title(title, fontsize=10, pad=14)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def for_stage(cell: Any, stage: str, out_dir: Optional[Path], *, rank: int) -> StageProfiler:
    """The profiler a stage runs under, as the cell's `profile` settings ask (disabled without an out dir).
    With several ranks each profiles itself: the main rank in `out_dir`, rank r in `out_dir/rank<r>` (its peaks
    only, no timeline), so the orchestrator can log every rank's peak and the maximum (`rank_profiles`). The stage
    passes its `rank` (qllm.stages.process.rank(): this package imports nothing from qllm.stages)."""
    p = cell.profile
    if out_dir and rank:
        out_dir = Path(out_dir) / f"rank{rank}"
    return StageProfiler(stage, out_dir or Path("."), enabled=bool(out_dir) and p["enabled"],
                         timeline=p["memory_timeline"] and not rank, sample_interval_s=p["sample_interval_s"],
                         memory_snapshot=p["memory_snapshot"] and not rank)


def rank_profiles(profile_dir: Path, stage: str) -> list[dict]:
    """The profiles of a stage's other ranks (rank 1, 2, ...), as `for_stage` wrote them."""
    found = sorted(profile_dir.glob(f"rank*/profile_{stage}.json"), key=lambda f: int(f.parent.name[4:]))
    return [json.loads(f.read_text()) | {"rank": int(f.parent.name[4:])} for f in found]
