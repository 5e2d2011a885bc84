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
