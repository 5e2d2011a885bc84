"""Write docs/config.md from DPOConfig's fields (names, types, defaults, descriptions).

Run: python scripts/gen_config_doc.py  (tests/test_cli.py checks the file is current)
"""

from __future__ import annotations

import sys
from pathlib import Path

from dpo_ray.config import DPOConfig, _Section
from dpo_ray.trl_keys import TRL_KEYS


def _fmt_type(ann) -> str:
    text = str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return text.replace("|", "\\|")


def render() -> str:
    lines = ["# Configuration reference", "",
             "Generated from `dpo_ray/config/` by `python scripts/gen_config_doc.py`. Every key works in a",
             "YAML file (`--config FILE`) and as a flag (`--key value`; sections as `--ray.num_workers 2`).",
             "Lists take several values (`--loss_type sigmoid sft`); dicts take JSON (`'{\"CPU\": 0.5}'`).",
             "",
             ("Paths: a relative path means relative to the working directory of the command (or Python "
              "process)"),
             "that reads the config, the same for flags, YAML files and the Python API (not the YAML file's",
             "folder; TRL's scripts do the same). The driver makes every path absolute once, before anything",
             ("starts (`dpo_ray/paths.py`), so Ray workers and reference actors, which run in other "
              "directories,"),
             "get absolute paths; `dpo-ray validate` and `dpo_config.yaml` show them. Remote URIs (`s3://`,",
             ("`gs://`, ...) pass through. `model_name_or_path` (and the reference's) must be a directory "
              "holding"),
             ("`config.json`: this is checked before Ray starts (`validate --no_path_check` skips it for a "
              "config"),
             ("meant for another machine). On a cluster of several nodes the driver also checks, on every "
              "node,"),
             "that the model and data paths exist and that `output_dir` is the same shared directory.", "",
             ("Keys set to `auto` stay `auto` in the resolved config; below it `dpo-ray validate` prints "
              "what the run"),
             ("will use: the reference source (local Ray: one node; a cluster it joins: by its size), the "
              "reference"),
             ("actors' and workers' resources, and how prefix sharing and length bucketing decide from the "
              "data."), "",
             "Every rule between keys is checked when the config is built (`dpo_ray/config/rules.py`), so",
             "`validate` reports it. A few rules need what only the data or a Python object shows, and are",
             "checked when that is known, each raising the same `ConfigError` naming the key:",
             "",
             "| rule | checked in | when |",
             "|---|---|---|",
             ("| `ld_alpha` needs pair rows, not prompt groups | `data/plan.py` | the data's format is "
              "read |"),
             "| prompt groups take text rows only (no images) | `data/tokenize.py` | the first group row |",
             ("| `truncation_mode: keep_end` is refused for a vision processor | `data/tokenize.py` | a "
              "processor given in Python |"),
             ("| `reference.source: precomputed` carries no images | `reference/precompute.py` | a processor "
              "given in Python (a model directory: at config time) |"),
             ("| `sync_ref_model` with a PEFT policy takes no separate `ref_model=` | `trainer.py` | "
              "`DPOTrainer(ref_model=...)` |"),
             ("| a sweep's shared reference store takes pair rows | `reference/store.py` | the sweep reads "
              "the data |"),
             "",
             "Checks of the outside world (model directories, `output_dir` ownership, a run to resume, every",
             ("node seeing the paths) run before Ray starts or right after it joins (`paths.py`, "
              "`trainer.py`,"),
             "`cluster.py`).", ""]
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
            lines.append(f"| `{name}.{sub}` | {_fmt_type(f.annotation)} | `{default!r}` | "
                         f"{f.description or ''} |")
    lines += _trl_table()
    return "\n".join(lines).replace("|  |", "| |") + "\n"


_TREATMENT = {"same": "same key", "maps": "translated", "ignored": "accepted, no effect",
              "default_only": "only TRL's default"}


def _trl_table() -> list[str]:
    """Every TRL 1.x key (DPOConfig with TrainingArguments, and the ModelConfig / ScriptArguments of TRL's
    scripts) and what dpo_ray does with it, from dpo_ray/trl_keys.py."""
    lines = ["", "## TRL 1.x keys", "",
             ("Every key of TRL 1.x's `DPOConfig` (with `TrainingArguments`) and of the `ModelConfig` / "
              "`ScriptArguments`"),
             ("of TRL's scripts, and what dpo_ray does with it (table: `dpo_ray/trl_keys.py`). *same key*: "
              "the dpo_ray"),
             ("key above; *translated*: turned into the dpo_ray key named; *accepted, no effect*: what it "
              "tunes does not"),
             ("exist here; *only TRL's default*: accepted at that value (what dpo_ray always does), any "
              "other value is"),
             "refused with the reason given. A YAML dumped from TRL's `DPOConfig.to_dict()` loads as it is.",
             "", "| TRL key | from | dpo_ray | notes |", "|---|---|---|---|"]
    for key, entry in TRL_KEYS.items():
        what = _TREATMENT[entry.treatment]
        if entry.treatment == "default_only":
            what += f" (`{entry.default!r}`)"
        lines.append(f"| `{key}` | {entry.source} | {what} | {entry.note.replace('|', '/')} |")
    return lines


if __name__ == "__main__":
    target = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    target.write_text(render())
    print(f"wrote {target}", file=sys.stderr)
