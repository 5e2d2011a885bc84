"""What a user reads, read from real runs: `dpo-ray train` as a subprocess (a pipe), Ctrl-C, the numbers.

Each run is a real command on a local Ray (~1-3 min on a 2-core box): few runs, each checks several things.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DPO_RAY = [sys.executable, "-m", "dpo_ray"]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "RAY_TRAIN_V2_ENABLED": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("RAY_ADDRESS", None)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
sys.path.insert(0, str(ROOT / "bench"))
from bench_console import own_share  # noqa: E402  (the share of lines that are dpo_ray's own, one definition)


def _wait_for(predicate, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before the condition"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.2)


def _logged_steps(path: Path) -> list[int]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return [r["step"] for r in rows if "loss" in r]


def test_ctrl_c_stops_cleanly_says_what_was_saved_and_how_to_resume(tmp_path):
    """Ctrl-C (SIGINT to the command's process group, as a terminal sends it) after step 2 of 200: exit 130,
    one dpo_ray line naming the step, the checkpoint and the exact command that resumes; report.json says
    "interrupted"; no traceback, no Ray abort notice."""
    out = tmp_path / "run"
    args = ["train", "--config", "examples/tiny_demo.yaml", "--max_steps", "200", "--logging_steps", "1",
            "--save_strategy", "steps", "--save_steps", "1", "--output_dir", str(out)]
    proc = subprocess.Popen([*DPO_RAY, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for(lambda: len(_logged_steps(out / "metrics.jsonl")) >= 2, proc, 600)
        os.killpg(proc.pid, signal.SIGINT)
        console, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    lines = console.splitlines()
    assert proc.returncode == 130, console[-3000:]
    assert "Traceback" not in console and "Received SIGINT" not in console, console[-3000:]
    last = lines[-1]
    assert last.startswith("dpo-ray train: interrupted after step "), console[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "interrupted"
    ckpt = Path(report["checkpoint"])
    assert report["checkpoint_step"] >= 1 and (ckpt / "checkpoint_state.json").exists()
    assert f"saved: checkpoint of step {report['checkpoint_step']} ({ckpt})" in last
    assert f"interrupted after step {report['steps']};" in last
    # the exact command: this one's arguments plus the checkpoint to resume from
    command = shlex.split(last.split("; resume: ", 1)[1])
    assert command == ["dpo-ray", *args, "--resume_from_checkpoint", str(ckpt)]
    assert sum("dpo-ray train: interrupted" in line for line in lines) == 1


def test_piped_train_console_is_plain_quiet_and_its_numbers_agree(tmp_path):
    """`dpo-ray train` into a pipe: no colour codes, each final line once, >= 90 % of the lines dpo_ray's own;
    the throughput the progress line, the summary and report.json show is one number, the
    logging windows of metrics.jsonl add up to the training time, and that fits in the wall time measured
    here."""
    out = tmp_path / "run"
    t0 = time.monotonic()
    res = subprocess.run([*DPO_RAY, "train", "--config", "examples/tiny_demo.yaml", "--max_steps", "6",
                          "--logging_steps", "2", "--output_dir", str(out)], cwd=ROOT, env=ENV, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    wall = time.monotonic() - t0
    console = res.stdout
    assert res.returncode == 0, console[-3000:]
    lines = console.splitlines()
    assert not ANSI.search(console), [ln for ln in lines if ANSI.search(ln)][:3]
    assert "\r" not in console
    share, foreign = own_share(lines)
    assert share >= 0.9, foreign
    finals = [ln for ln in lines if ln.startswith("dpo-ray dpo: 6/6 steps")]
    assert len(finals) == 1, finals
    assert sum(ln.startswith("== dpo finished") for ln in lines) == 1
    assert not [ln for ln in lines if "] step " in ln], "a second progress display (rank 0's bar)"

    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "completed"
    rates = report["throughput"]
    pairs_per_step = 16  # 2 workers x 8
    assert rates["pairs"] == report["pairs"] == 6 * pairs_per_step
    assert 0 < rates["train_runtime_s"] < wall
    assert rates["pairs_per_s"] == pytest.approx(rates["pairs"] / rates["train_runtime_s"], rel=1e-3)
    assert rates["tokens_per_s"] == pytest.approx(rates["tokens"] / rates["train_runtime_s"], rel=1e-3)
    # start-up excluded, never more time than the command took
    assert rates["pairs_per_s"] > rates["pairs"] / wall
    # the logging windows tile the training time: window pairs / window rate summed = train_runtime_s
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    windows = [(r["step"] - prev) * pairs_per_step / r["samples_per_second"]
               for prev, r in zip([0, 2, 4], train_rows)]
    assert sum(windows) == pytest.approx(rates["train_runtime_s"], rel=1e-2, abs=5e-3)
    tokens = [r["num_tokens"] - prev
              for prev, r in zip([0] + [r["num_tokens"] for r in train_rows], train_rows)]
    for w, n, r in zip(windows, tokens, train_rows):
        assert r["tokens_per_second"] == pytest.approx(n / w, rel=1e-6)
    # one number everywhere: the progress line's final value is the summary's and report.json's
    shown = f"pairs_per_s {rates['pairs_per_s']:.4g} | tokens_per_s {rates['tokens_per_s']:.4g}"
    assert shown in finals[0], (shown, finals[0])
    summary = next(ln for ln in lines if ln.strip().startswith("throughput:"))
    assert shown in summary, (shown, summary)
    per_step = float(re.search(r"s/step ([\d.e+-]+)", finals[0]).group(1))
    assert per_step == pytest.approx(rates["train_runtime_s"] / 6, rel=1e-2)


def test_the_readme_python_snippet_runs_as_shown(tmp_path):
    """The README's Python block, as written, in a directory holding a small `./my-sft-model`; the run header
    names the model and tokenizer actually used."""
    from dpo_ray.config import DPOConfig
    from dpo_ray.data import load_tokenizer
    from dpo_ray.models import load_causal_lm

    readme = (ROOT / "README.md").read_text()
    block = (readme.split("From Python, in TRL's spelling:", 1)[1].split("```python\n", 1)[1]
             .split("```", 1)[0])
    cfg = DPOConfig()
    tok = load_tokenizer(cfg)
    model_dir = tmp_path / "my-sft-model"
    load_causal_lm(None, cfg, tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    res = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=ENV, text=True, timeout=900,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert res.returncode == 0, res.stdout[-3000:]
    lines = res.stdout.splitlines()
    printed = [ln for ln in lines if re.fullmatch(r"[01](\.\d+)?(e-\d+)?", ln.strip())]
    assert printed and 0.0 <= float(printed[-1]) <= 1.0, lines[-10:]  # the snippet's print
    assert f"dpo-ray dpo: model {model_dir}" in lines, lines[:10]
    assert [ln for ln in lines if ln.startswith(("dpo-ray data: tokenizer ./my-sft-model (66 tokens)",
                                                 f"dpo-ray data: tokenizer {model_dir} (66 tokens)"))], \
        lines[:10]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["steps"] == 4


def _run_in_terminal(argv: list[str], timeout_s: float) -> tuple[int, str]:
    """``argv`` with a pseudo-terminal as stdout and stderr (what a person at a terminal sees, raw)."""
    import pty
    import select

    master, slave = pty.openpty()
    env = {**ENV, "TERM": "xterm", "COLUMNS": "160", "LINES": "40"}
    env.pop("RAY_COLOR_PREFIX", None)
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def test_terminal_shows_one_live_display_from_start_up_and_no_glued_worker_lines(tmp_path):
    """In a terminal: the first line says Ray is starting, a live status line names each start-up stage until
    the step bar replaces it, no worker line lands on the bar, rank 0 draws no second progress display, and
    the bar shows one rate (s/step, ours), not tqdm's own steps/s besides it."""
    rc, screen = _run_in_terminal([*DPO_RAY, "train", "--config", "examples/tiny_demo.yaml", "--max_steps",
                                   "6", "--logging_steps", "2", "--output_dir", str(tmp_path / "run")], 900)
    assert rc == 0, screen[-3000:]
    plain = ANSI.sub("", screen)
    assert 0 <= plain.find("dpo-ray dpo: starting a local Ray") < plain.find("reference: "), plain[:800]
    starting = plain.find("dpo-ray dpo: starting: ")
    bar = plain.find("steps [")
    assert 0 <= starting < bar, (starting, bar)
    assert "starting: loading the policy" in plain or "starting: the first batch" in plain
    glued = re.findall(r"[^\r\n]\(RayTrainWorker pid=", plain)
    assert not glued, glued
    assert "] step " not in plain  # rank 0's own bar
    assert "steps/s" not in plain and "s/step" in plain


def test_the_training_ingest_options_raise_no_deprecation_warning():
    """Ray's ``DataConfig.default_ingest_options()`` copies ``exclude_resources`` through its deprecated
    setter, a RayDeprecationWarning that reached every run's console; the options dpo_ray hands Ray Train are
    built without it, for both datasets (a dataset without options would take Ray's default path, warning
    included)."""
    import warnings

    from dpo_ray.data.pipeline import ingest_config

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = ingest_config()
    assert not [w for w in caught if "exclude_resources" in str(w.message)], [str(w.message) for w in caught]
    train, eval_ = (config._get_user_execution_options(name) for name in ("train", "eval"))
    assert train is not None and eval_ is not None
    assert eval_.preserve_order  # every worker reads the eval rows in one order (batching.EvalShare)


def test_the_placement_group_cleaners_traceback_becomes_one_line():
    """With a second Ray on the machine, Ray Train's PlacementGroupCleaner thread dies with a ~30-line
    traceback (ConnectionError: multiple Ray instances) that Ray forwards to the run's console; tests/data
    holds one as Ray wrote it to the actor's .err log (paths shortened). Split across two forwarded batches,
    it becomes one line naming the error; the cleaner's other lines and other actors' tracebacks pass
    untouched."""
    from dpo_ray.cluster import _CleanerTraceback

    lines = (ROOT / "tests" / "data" / "placement_group_cleaner.err").read_text().splitlines()
    assert len(lines) > 20
    cleaner = _CleanerTraceback()
    base = {"actor_name": "PlacementGroupCleaner", "pid": 1712}
    shown = cleaner({**base, "lines": ["registered a placement group", *lines[:9]]})
    shown += cleaner({**base, "lines": lines[9:]})
    assert shown[0] == "registered a placement group" and len(shown) == 2, shown
    assert shown[1].startswith("Ray Train's placement-group cleaner stopped "
                               "(ConnectionError: Found multiple active Ray instances")
    other = {"actor_name": "RayTrainWorker", "pid": 7, "lines": lines}
    assert cleaner(other) == lines
