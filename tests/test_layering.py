"""Imports only point down: every module of dpo_ray sits on a floor, may import its own floor and the floors
below, never above, and no set of modules imports itself round in a circle. No exceptions list.

Floors, ground up (docs/CONTRACTS.md, "Layers"):
  0 math        errors, logprobs, losses, prefix, flex, forward (the model forward policy and reference
                share), vision (what a processor is), vision.images, plotting, progress (the console display),
                optim and schedule (optimizers and LR schedules by TrainingArguments name), owned (what a run
                may delete; the run lock), redact (the one redaction of secrets), dicts (nested dicts by
                dotted keys)
  1 data        data.*, ledger (the bookkeeping actors: Ray and the standard library only), ray_private (every
                private name of Ray dpo_ray uses, each with its fallback)
  2 config      config, paths, trl_keys (what each TRL key means here)
  3 models      models, adapters, vision.tiny, sharing (prefix sharing's per-model decision and kernel timing)
  4 reference   reference.*
  5 train       train.*  (runs in the Ray Train workers)
  6 driver      cluster, trainer
  7 preflight   preflight.*  (`dpo-ray inspect-data`), sweep (`dpo-ray sweep`: Ray Tune over DPOTrainer runs),
                iterate.* (`dpo-ray iterate`: rollout and scorer pools around DPOTrainer rounds)
  8 entry       cli, demo, __main__, vision.__main__, the package itself
Imports inside functions count as much as those at the top; imports under ``if TYPE_CHECKING:`` do not (they
never run: annotations only).
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "dpo_ray"

FLOORS = [
    (0, ("errors", "logprobs", "losses", "prefix", "flex", "forward", "vision", "vision.images", "plotting",
         "progress", "timeline", "optim", "schedule", "owned", "redact", "extensions", "dicts", "allocator")),
    (1, ("data", "ledger", "ray_private")),
    (2, ("config", "paths", "trl_keys")),
    (3, ("models", "adapters", "vision.tiny", "sharing")),
    (4, ("reference",)),
    (5, ("train",)),
    (6, ("cluster", "trainer")),
    (7, ("preflight", "sweep", "iterate")),
    (8, ("cli", "demo", "__main__", "vision.__main__", "")),
]


def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = modules()


def floor(name: str) -> int:
    """The floor of the most specific prefix that names ``name`` (vision.tiny before vision)."""
    best = None
    for level, prefixes in FLOORS:
        for prefix in prefixes:
            if name == prefix or (prefix and name.startswith(prefix + ".")) or (prefix == "" and name == ""):
                if best is None or len(prefix) > best[1]:
                    best = (level, len(prefix))
    assert best is not None, f"dpo_ray.{name} has no floor: add it to FLOORS (and docs/CONTRACTS.md)"
    return best[0]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(name: str, path: Path) -> set[str]:
    """The dpo_ray modules ``name`` imports (``from pkg import sub`` counts as the submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    type_only = {id(n) for stmt in ast.walk(tree) if isinstance(stmt, ast.If) and _is_type_checking(stmt.test)
                 for body in stmt.body for n in ast.walk(body)}
    for node in ast.walk(tree):
        if id(node) in type_only:  # `if TYPE_CHECKING:` imports never run: annotations only
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.split(".") if package else []
                base = base[: len(base) - node.level + 1]
                mod = ".".join(["dpo_ray", *base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}".removeprefix("dpo_ray.") in MODULES else mod
                       for a in node.names]
        else:
            continue
        for t in targets:
            if t == "dpo_ray" or t.startswith("dpo_ray."):
                found.add(t.removeprefix("dpo_ray").removeprefix("."))
    found.discard(name)
    return found


GRAPH = {name: imports(name, path) for name, path in MODULES.items()}


def test_every_import_points_down():
    up = [f"dpo_ray.{a} (floor {floor(a)}) imports dpo_ray.{b} (floor {floor(b)})"
          for a, deps in sorted(GRAPH.items()) for b in sorted(deps) if floor(b) > floor(a)]
    assert not up, "imports that point up:\n" + "\n".join(up)


def test_no_import_circles():
    seen: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for dep in sorted(GRAPH.get(node, ())):
            if seen.get(dep) == 1:
                cycles.append(" -> ".join([*path[path.index(dep):], dep]))
            elif dep not in seen:
                visit(dep, [*path, dep])
        seen[node] = 2

    for start in sorted(GRAPH):
        if start not in seen:
            visit(start, [start])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_the_walker_sees_what_it_should():
    """The rules are only as good as the graph: spot-check it against imports known to exist."""
    assert "losses" in GRAPH["config.rules"] and "data.checks" in GRAPH["config.schema"]
    # TYPE_CHECKING
    assert "config.rules" in GRAPH["config.schema"] and "config.schema" not in GRAPH["config.rules"]
    assert "train.setup" in GRAPH["train.loop"] and "reference.build" in GRAPH["train.setup"]
    assert "prefix" in GRAPH["forward"]  # `from dpo_ray import prefix`
    assert floor("vision.tiny") == 3 and floor("vision") == 0 and floor("") == 8


def test_the_bookkeeping_actors_module_stays_small():
    """dpo_ray.ledger's actors run in their own Ray processes on every run: importing it (and the package)
    pulls in no torch, transformers or pydantic (each was a ~190 MiB process importing torch)."""
    import subprocess
    import sys

    code = ("import sys, dpo_ray.ledger; heavy = [m for m in ('torch', 'transformers', 'pydantic', "
            "'deepspeed') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
