"""Errors every layer raises, with no dependencies of their own (the lowest floor: anything may import this)."""

from __future__ import annotations


class ConfigError(ValueError):
    """Invalid configuration. ``problems`` is a list of (key, message) pairs, each key as the user writes it."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        lines = [f"  - {key}: {msg}" for key, msg in problems]
        super().__init__(f"{len(problems)} configuration problem(s):\n" + "\n".join(lines))
