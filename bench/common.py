"""Shared pieces of the dpo_ray vs TRL benchmarks: the saved tiny model, data subsets, child runs with
process-tree memory sampling, medians and tables. No Ray, no TRL imported at module level."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
REPO = BENCH.parent

CHILD_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_TRAIN_V2_ENABLED": "1",
    "DS_ACCELERATOR": "cpu",
    "TQDM_DISABLE": "1",
    "RAY_DEDUP_LOGS": "0",
    # DeepSpeed JIT-builds its CPU shm op into the torch extensions dir. ~/.cache/torch_extensions is
    # shared by every checkout on the machine and rebuilt (≈25 s of both cores, 3 GB of cc1plus) whenever
    # another venv used it last, so the benchmarks keep their own, built once by warm_deepspeed_ops().
    "TORCH_EXTENSIONS_DIR": str(Path(sys.prefix) / "torch_extensions_bench"),
}


def warm_deepspeed_ops() -> float:
    """Build (or load from CHILD_ENV's cache) DeepSpeed's CPU shm comm op once, outside any timed run."""
    t0 = time.perf_counter()
    env = {**os.environ, **CHILD_ENV}
    code = "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def machine() -> dict[str, Any]:
    import psutil

    return {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}


def versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "transformers", "ray", "deepspeed", "trl", "datasets"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing package is reported, not fatal
            out[name] = "missing"
    return out


# ------------------------------------------------------------------------------------- assets

def save_tiny_model(out_dir: Path, seed: int = 42) -> Path:
    """The tiny Llama dpo_ray builds by default (``load_causal_lm(None, ...)``), saved with its tokenizer,
    so dpo_ray and TRL load bit-identical weights from one directory."""
    if (out_dir / "config.json").exists():
        return out_dir
    from dpo_ray.config import DPOConfig
    from dpo_ray.data import load_tokenizer
    from dpo_ray.models import load_causal_lm

    cfg = DPOConfig(seed=seed)
    tok = load_tokenizer(cfg)
    model = load_causal_lm(None, cfg, tok)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def bundled_subset(out_file: Path, n: int) -> Path:
    """The first ``n`` rows of the bundled train.jsonl (fails if there are fewer)."""
    from dpo_ray.data.bundled import TRAIN_FILE

    lines = [ln for ln in Path(TRAIN_FILE).read_text().splitlines() if ln.strip()]
    if len(lines) < n:
        raise SystemExit(f"the bundled train set has {len(lines)} rows, fewer than --pairs {n}")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text("\n".join(lines[:n]) + "\n")
    return out_file


def generated_pairs(out_file: Path, n: int, seed: int = 0) -> Path:
    """``n`` generated bundled-task pairs (``dpo_ray.data.bundled.make_pairs``) as JSON Lines."""
    if out_file.exists() and sum(1 for _ in open(out_file)) == n:
        return out_file
    from dpo_ray.data.bundled import make_pairs

    out_file.parent.mkdir(parents=True, exist_ok=True)
    with open(out_file, "w") as f:
        for row in make_pairs(n, seed):
            f.write(json.dumps(row) + "\n")
    return out_file


# ------------------------------------------------------------------------------------- memory

class TreeMemory:
    """Samples the memory of a process and all its descendants (Ray's GCS, raylet, workers, actors) every
    ``interval`` s: peak of the summed RSS and of the summed PSS (shared pages split between the processes
    that map them, so N Ray workers importing torch are not counted N times in full)."""

    def __init__(self, pid: int, interval: float = 0.5, stop_above_mib: float | None = None):
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        # one process's PSS: kill the tree
        self.stop_above = stop_above_mib * 2**20 if stop_above_mib else None
        self.stopped_above: float | None = None  # MiB the largest process had reached when it was stopped
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_procs = 0
        self.peak_single = 0  # the largest single process's PSS
        self.peak_breakdown: dict[str, list[int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        rss = pss = 0
        # process title (argv[0]; a path's file name) -> each one's PSS, bytes
        by_name: dict[str, list[int]] = {}
        for p in procs:
            try:
                info = p.memory_full_info()
                title = (p.cmdline() or [p.name()])[0]
            except psutil.Error:
                continue
            p_pss = getattr(info, "pss", info.rss)
            rss += info.rss
            pss += p_pss
            by_name.setdefault(os.path.basename(title) if title.startswith("/") else title[:60],
                               []).append(p_pss)
        if pss > self.peak_pss:
            self.peak_breakdown = by_name
        largest = max((max(v) for v in by_name.values()), default=0)
        self.peak_single = max(self.peak_single, largest)
        if self.stop_above and largest > self.stop_above and self.stopped_above is None:
            import signal

            self.stopped_above = largest / 2**20
            try:
                os.killpg(self.root.pid, signal.SIGKILL)  # the child's own session: its Ray processes too
            except ProcessLookupError:
                pass
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, len(procs))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def report(self) -> dict[str, float]:
        by = sorted(self.peak_breakdown.items(), key=lambda kv: -sum(kv[1]))
        return {"peak_rss_mib": self.peak_rss / 2**20, "peak_pss_mib": self.peak_pss / 2**20,
                "peak_processes": self.peak_procs, "peak_single_mib": self.peak_single / 2**20,
                **({"stopped_above_mib": round(self.stopped_above)} if self.stopped_above else {}),
                "peak_pss_by_process": {k: {"n": len(v), "mib": round(sum(v) / 2**20)} for k, v in by}}


def run_child(args: list[str], out_json: Path, timeout: float, env: dict[str, str] | None = None,
              log: Path | None = None, stop_above_mib: float | None = None, cwd: Path | None = None
              ) -> dict[str, Any]:
    """Run ``python <args>`` (which writes ``out_json``) in its own session, sampling its process tree's
    memory; returns the child's JSON plus memory peaks and wall time. A failure returns {"error": ...}.
    ``stop_above_mib``: kill the tree once one of its processes passes that PSS (a memory budget measured
    without risking the machine); the result then says ``stopped_above_mib``. ``cwd``: the child's working
    directory (default the repository): Ray workers import from the driver's working directory first, so a
    child running another checkout's dpo_ray must start there."""
    out_json.unlink(missing_ok=True)
    full_env = {**os.environ, **CHILD_ENV, **(env or {})}
    # this repo's bench helpers importable; a PYTHONPATH given
    # in ``env`` (another checkout's dpo_ray) comes first
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [(env or {}).get("PYTHONPATH"), str(REPO),
                                                           os.environ.get("PYTHONPATH")]))
    log_f = open(log, "w") if log else subprocess.DEVNULL
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], env=full_env, stdout=log_f, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=cwd or REPO)
    with TreeMemory(proc.pid, stop_above_mib=stop_above_mib) as mem:
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            import signal

            os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: its Ray processes too
            proc.wait()
            rc = "timeout"
    wall = time.perf_counter() - t0
    if log:
        log_f.close()
    if rc != 0 or not out_json.exists():
        tail = log.read_text()[-3000:] if log and log.exists() else ""
        return {"error": f"exit {rc}", "log_tail": tail, "process_wall_s": wall, **mem.report()}
    result = json.loads(out_json.read_text())
    result.update(mem.report())
    result["process_wall_s"] = wall
    return result


# ------------------------------------------------------------------------------------- stats

def median(values: list[float]) -> float:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else float("nan")


def steady_rate(step_times: list[float], pairs_per_step: int, warmup: int) -> float:
    """Pairs/s over the steps after ``warmup`` from per-step durations (seconds)."""
    tail = step_times[warmup:]
    return pairs_per_step * len(tail) / sum(tail) if tail and sum(tail) > 0 else float("nan")


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (printed to the console and pasted into docs/BENCHMARKS.md)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
