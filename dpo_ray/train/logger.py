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
    """The run's rates, defined once, on one clock (rank 0's ``time.perf_counter``), all counting from the
    first batch's arrival (the end of start-up: the timeline's "first batch"; start-up has its own line):

    - per optimizer step, ``seconds_per_step``: training time so far / optimizer steps so far (the bar's
      s/step, its time left and the estimated duration);
    - per logging window, metrics.jsonl's ``samples_per_second`` (pairs; sequences in SFT) and
      ``tokens_per_second``: the window's pairs and tokens over its wall time, from the previous logged step
      (the first window: from the first batch) to this one. Eval and checkpoint time count in the window they
      fall in, so the windows tile the run: their durations add up to ``train_runtime_s``;
    - whole run, ``pairs_per_s`` / ``tokens_per_s`` over ``train_runtime_s`` (report.json, the summary, the
      bar): every pair and token since the first batch over the time since then.
    A resumed run counts from its own first batch.
    """

    def __init__(self, state: TrainerState):
        self.first: float | None = None  # the first batch's arrival
        self.start_step, self.start_pairs, self.start_tokens = (
            state.global_step, state.pairs_seen, state.tokens_seen)
        self.t, self.pairs, self.tokens = None, state.pairs_seen, state.tokens_seen

    def begin(self) -> None:
        """The first batch arrived: training time starts (idempotent)."""
        if self.first is None:
            self.first = self.t = time.perf_counter()

    def train_s(self) -> float:
        return time.perf_counter() - self.first if self.first is not None else 0.0

    def update(self, state: TrainerState, reduced: dict[str, float]) -> dict[str, float]:
        """Fold one window's summed counts into ``state``; the window's rates, and num_tokens as TRL logs it
        (input tokens seen so far)."""
        self.begin()
        state.pairs_seen += int(reduced.pop("num_pairs", 0))
        state.tokens_seen += int(reduced.get("num_tokens", 0))
        now = time.perf_counter()
        dt = max(now - self.t, 1e-9)
        rates = {"num_tokens": state.tokens_seen,
                 "samples_per_second": (state.pairs_seen - self.pairs) / dt,
                 "tokens_per_second": (state.tokens_seen - self.tokens) / dt}
        self.t, self.pairs, self.tokens = now, state.pairs_seen, state.tokens_seen
        return rates

    def whole_run(self, state: TrainerState, logged: bool) -> dict[str, float]:
        """What rank 0 posts to the driver's display at each optimizer step: training time and steps so far;
        at a logged step also the whole-run rates (the counts are only known after the window's
        all-reduce)."""
        train_s = (self.t if logged else time.perf_counter()) - self.first if self.first is not None else 0.0
        out = {"train_runtime_s": train_s, "steps_done": state.global_step - self.start_step}
        if logged and train_s > 0:
            out.update(counted_s=train_s, pairs=state.pairs_seen - self.start_pairs,
                       tokens=state.tokens_seen - self.start_tokens,
                       pairs_per_s=(state.pairs_seen - self.start_pairs) / train_s,
                       tokens_per_s=(state.tokens_seen - self.start_tokens) / train_s)
        return out


class Logger:
    """Rank 0's sinks: metrics.jsonl, TensorBoard events, and the console table (other ranks: no-ops)."""

    COLUMNS = ("loss", "rewards/accuracies", "rewards/margins", "learning_rate", "grad_norm")

    def __init__(self, cfg: DPOConfig, rank: int, total_steps: int, run_name: str = "run",
                 start_step: int = 0):
        self.active = rank == 0
        self.total = total_steps
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
        cols = [(k, metrics[k]) for k in metrics if k in self.COLUMNS or k.startswith("eval_")]
        cells = " | ".join(f"{k} {v:.4g}" for k, v in cols if isinstance(v, (int, float)))
        # sys.stdout directly: Ray Train patches print() into a logger that would echo every line twice. The
        # metrics only: progress, rates and time left are the driver's one display (dpo_ray.cluster)
        sys.stdout.write(f"step {step}/{self.total} | {cells}\n")
        sys.stdout.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()
