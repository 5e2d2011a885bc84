"""`dpo-ray inspect-data`: a preflight report on preference data, before any training resources are taken.

``run_inspect(cfg, report_dir=..., max_rows=...)`` runs the training data pipeline's row steps on Ray Data
(CPU only, streaming), prints the report, writes ``report.json`` and length histograms, and returns the
exit status (0 clean, 1 when a check at error level fires). ``quick_checks(rows, tokenizer, cfg)`` runs the
same checks in-process on a few rows, for ``dpo-ray train`` to warn about. docs/inspect.md has the details.
"""

from dpo_ray.data.checks import quick_checks
from dpo_ray.preflight.run import inspect_data, run_inspect

__all__ = ["inspect_data", "quick_checks", "run_inspect"]
