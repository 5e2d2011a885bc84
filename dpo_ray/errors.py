"""Errors every layer raises, with no dependencies of their own (the lowest floor: anything may import
this)."""

from __future__ import annotations


class ConfigError(ValueError):
    """Invalid configuration. ``problems`` is a list of (key, message) pairs, each key as the user writes
    it."""

    exit_code = 2

    def __init__(self, problems: list[tuple[str, str]]):
        from dpo_ray.redact import redact_text  # a message never carries a URL's password or a token

        problems = [(key, redact_text(str(msg))) for key, msg in problems]
        self.problems = problems
        lines = [f"  - {key}: {msg}" for key, msg in problems]
        super().__init__(f"{len(problems)} configuration problem(s):\n" + "\n".join(lines))


class DataError(ValueError):
    """The data, or a file the run reads to make tokens (dataset files, the tokenizer), cannot be used as
    given. The message names the file, row or column and the fix. ``dpo-ray`` exits with ``exit_code``."""

    exit_code = 3


class DataSourceError(DataError):
    """The dataset source cannot be found or read; the message says what to pass instead."""


class BadRowError(DataError):
    """A row the pipeline cannot use. The message names the source file, the row and the fix."""

    def __init__(self, message: str, kind: str = "", row_id: int = -1):
        super().__init__(message)
        self.kind, self.row_id = kind, row_id

    def __reduce__(self):  # survives the trip out of a Ray task with its fields
        return (BadRowError, (self.args[0], self.kind, self.row_id))


class TooFewRowsError(DataError):
    """Too little of the data is usable: every row dropped, more than ``max_dropped_fraction`` dropped, or a
    run that would train (or trained) zero optimizer steps."""


class ModelFilesError(DataError):
    """A model directory lacks files the run needs (tokenizer files, weights); the message names them."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a run before its model was written. ``step``: the last optimizer step logged;
    ``checkpoint`` / ``checkpoint_step``: the newest complete checkpoint (None: nothing to resume from);
    ``report``: the report.json written. ``dpo-ray`` prints one line from it and exits 130."""

    exit_code = 130

    def __init__(self, step: int | None, checkpoint: str | None, checkpoint_step: int | None,
                 report: str | None = None):
        self.step, self.checkpoint, self.checkpoint_step, self.report = (
            step, checkpoint, checkpoint_step, report)
        super().__init__(self.saved())

    def saved(self) -> str:
        """What survives, in words (the step reached and the checkpoint to resume from)."""
        reached = f"interrupted after step {self.step}" if self.step else "interrupted before the first step"
        if self.checkpoint is None:
            return (f"{reached}; no checkpoint was saved yet (save_strategy / save_steps), so a rerun "
                    "starts over")
        return f"{reached}; saved: checkpoint of step {self.checkpoint_step} ({self.checkpoint})"

    def __reduce__(self):
        return (TrainingInterrupted, (self.step, self.checkpoint, self.checkpoint_step, self.report))
