"""Rank 0's record of the run: metrics.jsonl, TensorBoard events and the console line; and the throughput
of each logging window."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from dpo_ray.config import DPOConfig
from dpo_ray.train.checkpoint import TrainerState

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line that does not parse (a write torn by a crash or a full disk) is
    skipped with a note, never an error."""
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"dpo-ray: {path} line {n} is torn (an interrupted write); skipped", file=sys.stderr)
    return rows


def cut_metrics(path: Path, step: int) -> None:
    """Keep the rows up to optimizer step ``step`` (a checkpoint's; 0: none), whole lines only."""
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if step > 0 and r.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)


class Throughput:
    """Pairs and tokens per second since the last logging step; counts ``state``'s running totals."""

    def __init__(self, state: TrainerState):
        self.t, self.pairs, self.tokens = time.perf_counter(), state.pairs_seen, state.tokens_seen

    def update(self, state: TrainerState, reduced: dict[str, float]) -> dict[str, float]:
        """Fold one window's summed counts into ``state``; the window's rates, and num_tokens as TRL logs it
        (input tokens seen so far)."""
        state.pairs_seen += int(reduced.pop("num_pairs", 0))
        state.tokens_seen += int(reduced.get("num_tokens", 0))
        now = time.perf_counter()
        dt = max(now - self.t, 1e-9)
        rates = {"num_tokens": state.tokens_seen,
                 "samples_per_second": (state.pairs_seen - self.pairs) / dt,
                 "tokens_per_second": (state.tokens_seen - self.tokens) / dt}
        self.t, self.pairs, self.tokens = now, state.pairs_seen, state.tokens_seen
        return rates


class Logger:
    """Rank 0's sinks: metrics.jsonl, TensorBoard events, and the console table (other ranks: no-ops)."""

    COLUMNS = ("loss", "rewards/accuracies", "rewards/margins", "learning_rate", "grad_norm")

    def __init__(self, cfg: DPOConfig, rank: int, total_steps: int, run_name: str = "run", start_step: int = 0):
        self.active = rank == 0
        self.total = total_steps
        self.t0 = time.perf_counter()
        self.out = Path(cfg.output_dir)
        self.tb = None
        if self.active:
            self.out.mkdir(parents=True, exist_ok=True)
            if "tensorboard" in cfg.report_to:
                from tensorboardX import SummaryWriter

                # one folder per run; a resume at step s hides that folder's events past s (rolled back)
                self.tb = SummaryWriter(str(self.out / "runs" / run_name),
                                        purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        row = {"step": step, **metrics}
        with open(self.out / METRICS_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        elapsed = time.perf_counter() - self.t0
        pct = 100.0 * step / max(self.total, 1)
        eta = elapsed / max(step, 1) * (self.total - step)
        cols = [(k, metrics[k]) for k in metrics if k in self.COLUMNS or k.startswith("eval_")]
        cells = " | ".join(f"{k} {v:.4g}" for k, v in cols if isinstance(v, (int, float)))
        # sys.stdout directly: Ray Train patches print() into a logger that would echo every line twice
        sys.stdout.write(f"[{'#' * int(pct // 5):<20}] step {step}/{self.total} ({pct:.0f}%, eta {eta:.0f}s) "
                         f"| {cells}\n")
        sys.stdout.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()
