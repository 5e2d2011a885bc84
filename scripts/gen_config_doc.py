"""Write docs/config.md from DPOConfig's fields (names, types, defaults, descriptions).

Run: python scripts/gen_config_doc.py  (tests/test_cli.py checks the file is current)
"""

from __future__ import annotations

import sys
from pathlib import Path

from dpo_ray.config import DPOConfig, _Section


def _fmt_type(ann) -> str:
    text = str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return text.replace("|", "\\|")


def render() -> str:
    lines = ["# Configuration reference", "",
             "Generated from `dpo_ray/config.py` by `python scripts/gen_config_doc.py`. Every key works in a",
             "YAML file (`--config FILE`) and as a flag (`--key value`; sections as `--ray.num_workers 2`).",
             "Lists take several values (`--loss_type sigmoid sft`); dicts take JSON (`'{\"CPU\": 0.5}'`).", ""]
    sections = []
    lines += ["## Top level (TRL / TrainingArguments names)", "", "| key | type | default | meaning |",
              "|---|---|---|---|"]
    for name, f in DPOConfig.model_fields.items():
        if isinstance(f.default_factory, type) and issubclass(f.default_factory, _Section):
            sections.append((name, f.default_factory))
            continue
        default = f.default_factory() if f.default_factory else f.default
        lines.append(f"| `{name}` | {_fmt_type(f.annotation)} | `{default!r}` | {f.description or ''} |")
    for name, cls in sections:
        lines += ["", f"## `{name}` section", "", (cls.__doc__ or "").strip(), "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        for sub, f in cls.model_fields.items():
            default = f.default_factory() if f.default_factory else f.default
            lines.append(f"| `{name}.{sub}` | {_fmt_type(f.annotation)} | `{default!r}` | {f.description or ''} |")
    return "\n".join(lines).replace("|  |", "| |") + "\n"


if __name__ == "__main__":
    target = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    target.write_text(render())
    print(f"wrote {target}", file=sys.stderr)
