"""The docs as tests: every shell command shown in the README, docs/*.md and the headers of examples/* runs
here as written, from a working directory that is not the repository root.

Where commands come from:
- Markdown: fenced blocks whose info string starts with ``bash``/``sh``/``shell``; backslash-continued lines
  join, comment lines are dropped.
- examples/*: header lines written ``$ command`` (in a YAML comment or the module docstring).

A command that cannot run here (Kubernetes, GPUs, the hub) says so where it is shown: ``not run by the
tests: REASON`` in its trailing comment, or in the fence's info string for a whole block. Those are
skipped by name (`pytest -rs` lists them). Everything else runs:
- ``dpo-ray ...`` / ``python -m dpo_ray ...`` through ``dpo_ray.cli.main`` in this process (joining this
  module's Ray), ``python -m dpo_ray.vision``, ``python examples/*.py`` and ``make demo`` as subprocesses;
- training commands get ``--max_steps 2`` unless they set their own (the only change to the text);
- each doc file has one working directory, fresh for this run, holding what its commands name: the
  repository's ``examples/``, ``dpo_ray/``, ``deploy/`` (links, so "from the repository root" commands
  work), a saved model ``my-sft-model/`` and ``prefs.jsonl``. Relative model, data and output paths are
  therefore taken against a directory the Ray workers do not run in: the paths bug this guards against.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLES = sorted(p for p in (ROOT / "examples").iterdir() if p.suffix in (".yaml", ".py"))
NOT_RUN = "not run by the tests:"
SHELLS = ("bash", "sh", "shell")
TRAINING = {"train", "sft", "demo"}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@dataclass(frozen=True)
class DocCommand:
    source: str  # path relative to the repository
    line: int
    text: str
    skip: str | None  # the doc's reason, when it says the tests do not run it

    @property
    def id(self) -> str:
        return f"{self.source}:{self.line}"

    @property
    def key(self) -> str:
        """The command without its comments: what runs (and what makes two shown commands the same)."""
        return shlex.join(shlex.split(self.text, comments=True))


def _unclosed(text: str) -> bool:
    try:
        shlex.split(text, comments=True)
    except ValueError:  # "No closing quotation": a quoted argument goes on to the next line
        return True
    return False


def _logical_lines(lines: list[tuple[int, str]]):
    """Join backslash continuations and quoted arguments that span lines; yield (first line number, text)."""
    buf, start = "", None
    for no, raw in lines:
        text = raw.rstrip()
        if start is None:
            start = no
        if text.endswith("\\"):
            buf += text[:-1] + " "
            continue
        if _unclosed(buf + text):
            buf += text.strip() + " "
            continue
        yield start, buf + text
        buf, start = "", None
    if buf:
        yield start, buf


def _command(source: str, no: int, text: str, block_skip: str | None) -> DocCommand | None:
    stripped = text.strip()
    if not stripped or stripped.startswith("#"):
        return None
    skip = block_skip
    if NOT_RUN in stripped:
        skip = stripped.split(NOT_RUN, 1)[1].strip().rstrip(")")
    return DocCommand(source, no, stripped, skip)


def markdown_commands(path: Path) -> list[DocCommand]:
    out, lines = [], path.read_text().splitlines()
    source = str(path.relative_to(ROOT))
    i = 0
    while i < len(lines):
        m = re.match(r"\s*```(\S*)\s*(.*)$", lines[i])
        if not m:
            i += 1
            continue
        lang, info = m.group(1), m.group(2)
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith("```"):
            j += 1
        if lang in SHELLS:
            block_skip = info.split(NOT_RUN, 1)[1].strip().rstrip(")") if NOT_RUN in info else None
            for no, text in _logical_lines([(k + 1, lines[k]) for k in range(i + 1, j)]):
                cmd = _command(source, no, text, block_skip)
                if cmd:
                    out.append(cmd)
        i = j + 1
    return out


def example_commands(path: Path) -> list[DocCommand]:
    """``$ command`` lines of a YAML comment header or a module docstring (continuations included)."""
    source = str(path.relative_to(ROOT))
    lines = path.read_text().splitlines()
    out, pending = [], []
    for k, raw in enumerate(lines):
        body = raw.lstrip("#").strip() if path.suffix == ".yaml" else raw.strip()
        if pending or body.startswith("$ "):
            pending.append((k + 1, body[2:] if body.startswith("$ ") else body))
            if not body.endswith("\\"):
                for no, text in _logical_lines(pending):
                    cmd = _command(source, no, text, None)
                    if cmd:
                        out.append(cmd)
                pending = []
    return out


ALL = [c for p in MARKDOWN for c in markdown_commands(p)] + [c for p in EXAMPLES for c in example_commands(p)]


# command (comments dropped) -> id of the test that ran it (a command shown twice runs once)
_ran: dict[str, str] = {}


def test_the_docs_show_commands():
    """The collector finds what it should: if this fails, a doc's command markup changed."""
    texts = [c.key for c in ALL]
    assert any(t.startswith("dpo-ray train --model_name_or_path ./my-sft-model") for t in texts)
    assert "dpo-ray train --config examples/vlm_tiny.yaml" in texts
    assert "python -m dpo_ray.vision tiny_vlm" in texts
    assert any(c.skip and "Kubernetes" in c.skip for c in ALL)
    assert len({c.id for c in ALL}) == len(ALL)


# ------------------------------------------------------------------------------------------ running
@pytest.fixture(scope="module")
def workdirs(tmp_path_factory, ray_local):
    """doc file -> its working directory (created on first use)."""
    from dpo_ray.config import DPOConfig
    from dpo_ray.data import load_tokenizer
    from dpo_ray.data.bundled import TRAIN_FILE
    from dpo_ray.models import load_causal_lm

    made: dict[str, Path] = {}

    def get(source: str) -> Path:
        if source not in made:
            d = tmp_path_factory.mktemp(re.sub(r"\W", "_", source))
            for name in ("examples", "dpo_ray", "deploy"):
                (d / name).symlink_to(ROOT / name)
            cfg = DPOConfig()
            tok = load_tokenizer(cfg)
            load_causal_lm(None, cfg, tok).save_pretrained(d / "my-sft-model")
            tok.save_pretrained(d / "my-sft-model")
            (d / "prefs.jsonl").write_text("".join(TRAIN_FILE.read_text().splitlines(True)[:512]))
            made[source] = d
        return made[source]

    return get


def _shortened(argv: list[str]) -> list[str]:
    if any(a.startswith("--max_steps") for a in argv):
        return argv
    return [*argv, "--max_steps", "2"]


def _env(address: str) -> dict[str, str]:
    env = {**os.environ, "RAY_ADDRESS": address}  # join this module's Ray instead of starting another
    env.setdefault("PYTHONPATH", "")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env["PYTHONPATH"]) if p)
    return env


def _subprocess(argv: list[str], cwd: Path, address: str, timeout: int = 800) -> None:
    proc = subprocess.run(argv, cwd=cwd, env=_env(address), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{shlex.join(argv)} exited {proc.returncode} in {cwd}:\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def _run_cli(argv: list[str], cwd: Path) -> None:
    """The CLI in this process, from ``cwd``; a training command must leave a loadable model in its
    output_dir, which a relative output_dir puts under ``cwd`` (not in a worker's directory)."""
    from dpo_ray.cli import _parser, _resolve, main

    old = os.getcwd()
    os.chdir(cwd)
    try:
        assert main(argv) == 0, f"dpo-ray {shlex.join(argv)} did not exit 0 in {cwd}"
        if argv[0] in ("train", "sft"):
            out = Path(_resolve(_parser().parse_args(argv)).output_dir)
            # PEFT: the adapter
            saved = (out / "config.json").is_file() or (out / "adapter_config.json").is_file()
            assert saved and (out / "report.json").is_file(), f"no model in {out}"
            check = AFTER.get(shlex.join(["dpo-ray", *argv]))
            if check is not None:
                check(out)
    finally:
        os.chdir(old)


def _vlm_trained(out: Path) -> None:
    """examples/vlm_tiny.yaml: a LLaVA with its processor comes back, step 1's loss is log 2 (policy ==
    reference), and the weights moved away from the ones `python -m dpo_ray.vision` wrote."""
    import json
    import math

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert abs(next(r["loss"] for r in rows if "loss" in r) - math.log(2)) < 1e-3
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert AutoProcessor.from_pretrained(out).image_token == "<image>"
    start = AutoModelForImageTextToText.from_pretrained(out.parent / "tiny_vlm")
    assert any(not torch.equal(a, b)
               for a, b in zip(model.state_dict().values(), start.state_dict().values()))


# Extra checks after a documented training command (keyed by the command as run).
AFTER = {"dpo-ray train --config examples/vlm_tiny.yaml --max_steps 2": _vlm_trained}


def run(cmd: DocCommand, cwd: Path, address: str) -> None:
    for part in cmd.text.split(" && "):  # a gate: each part must succeed, in order
        key = shlex.join(shlex.split(part, comments=True))
        if key in _ran:
            continue  # the same command already ran (and passed) as _ran[key]
        argv = shlex.split(part, comments=True)
        if argv[:1] == ["dpo-ray"] or argv[:3] == ["python", "-m", "dpo_ray"]:
            args = argv[1:] if argv[0] == "dpo-ray" else argv[3:]
            _run_cli(_shortened(args) if args[0] in TRAINING else args, cwd)
        elif argv[:3] == ["python", "-m", "dpo_ray.vision"]:
            _subprocess([sys.executable, *argv[1:]], cwd, address)
        elif argv[0] == "python" and argv[1].startswith("examples/"):
            _subprocess([sys.executable, *_shortened(argv[1:])], cwd, address)
            if argv[1] == "examples/train_dpo.py" and len(argv) == 2:  # its default output_dir, relative
                from transformers import AutoModelForCausalLM

                AutoModelForCausalLM.from_pretrained(cwd / "tiny-dpo")
                assert (cwd / "tiny-dpo" / "metrics.jsonl").is_file()
        elif argv == ["make", "demo"]:
            # the README's command, in the repository as it says; outputs go to this run's directory
            _subprocess(["make", "demo", f"DEMO_ARGS=--max_steps 2 --output_dir {cwd / 'demo_output'}"], ROOT,
                        address, timeout=850)
        else:
            pytest.fail(f"{cmd.id}: no way to run {argv[0]!r} here; teach this test to run it, or mark it in "
                        f"the doc with '{NOT_RUN} <reason>'")
        _ran[key] = cmd.id




@pytest.mark.parametrize("cmd", ALL, ids=[c.id for c in ALL])
def test_doc_command_runs_as_written(cmd: DocCommand, workdirs, ray_local):
    if cmd.skip:
        pytest.skip(f"{cmd.text!r}: {cmd.skip}")
    run(cmd, workdirs(cmd.source), ray_local)
