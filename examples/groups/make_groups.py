"""Regenerate examples/groups/{train,test}.jsonl: prompt groups of the bundled sort/reverse task.

    python examples/groups/make_groups.py     # deterministic: the same bytes every run

Each row: a prompt, 4 responses (the right answer and 3 distinct near misses, shuffled) and their scores (the
fraction of the answer's positions each gets right; the right answer scores 1). Ties happen (two misses with
the same score): they never form a pair (docs/data.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from dpo_ray.data.bundled import make_groups

HERE = Path(__file__).resolve().parent


def main() -> None:
    for name, n, seed in (("train", 800, 4321), ("test", 64, 8765)):
        with open(HERE / f"{name}.jsonl", "w") as f:
            for row in make_groups(n, seed, k=4):
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
