"""A merged ``Piece`` -> the report: check verdicts, length percentiles, padding, FLOPs; JSON, console, PNG.

The JSON layout is documented in docs/inspect.md (``REPORT_VERSION`` changes when it does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dpo_ray.data.analyze import UNREADABLE, Hits, Piece
from dpo_ray.data.batching import SHUFFLE_POOL_BATCHES
from dpo_ray.data.checks import INSPECT_CHECKS
from dpo_ray.data.rows import BAD_ROW_KINDS, PROMPT_FILLS
from dpo_ray.data.step_plan import plan_steps, steps_reached

REPORT_VERSION = 2


# ------------------------------------------------------------------------------------------- lengths
def percentiles(x: np.ndarray) -> dict[str, float]:
    if len(x) == 0:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0.0}
    p50, p90, p99 = np.percentile(x, [50, 90, 99], method="lower")
    return {"p50": int(p50), "p90": int(p90), "p99": int(p99), "max": int(x.max()),
            "mean": round(float(x.mean()), 2)}


def length_arrays(piece: Piece) -> dict[str, np.ndarray]:
    """Untruncated token counts per tokenized row: prompt, chosen/rejected completion, longer sequence."""
    ln = piece.lengths
    seq = np.maximum(ln["prompt"] + ln["chosen"], ln["prompt"] + ln["rejected"])
    return {"prompt": ln["prompt"], "chosen": ln["chosen"], "rejected": ln["rejected"], "sequence": seq}


# ------------------------------------------------------------------------------------------- padding
def padding_fraction(chosen: np.ndarray, rejected: np.ndarray, batch_size: int,
                     pad_to_multiple_of: int | None, bucketing: bool, bucket_multiplier: int,
                     seed: int) -> float:
    """Pad tokens / all tokens of the batches ``BatchIterator`` (dpo_ray.data.batching) builds from rows in
    this order: pools of rows, each permuted by the (seed, epoch 0) generator, sorted by length and the
    batches shuffled when bucketing; [chosen; rejected] padded to the batch's longest, partial batch dropped.
    One stream (one worker): the fraction hardly depends on how rows are split between workers."""
    rng = np.random.default_rng([seed, 0])
    pool = (bucket_multiplier if bucketing else SHUFFLE_POOL_BATCHES) * batch_size
    longest = np.maximum(chosen, rejected)
    pad = total = 0
    for lo in range(0, len(chosen), pool):
        n = min(pool, len(chosen) - lo)
        order = lo + rng.permutation(n)
        if bucketing:
            order = order[np.argsort(longest[order], kind="stable")]
        batches = [order[i:i + batch_size] for i in range(0, n - n % batch_size, batch_size)]
        if bucketing:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        for idx in batches:
            t = int(longest[idx].max())
            if pad_to_multiple_of:
                t = -(-t // pad_to_multiple_of) * pad_to_multiple_of
            cells = 2 * len(idx) * t
            total += cells
            pad += cells - int(chosen[idx].sum() + rejected[idx].sum())
    return pad / total if total else 0.0


def padding_report(piece: Piece, cfg) -> dict[str, Any]:
    ln = piece.lengths
    order = np.argsort(ln["row_id"], kind="stable")  # the pipeline preserves row order
    kept = order[ln["kept"][order] == 1]
    c, r = ln["chosen_seq"][kept].astype(np.int64), ln["rejected_seq"][kept].astype(np.int64)
    seed = cfg.data_order_seed
    b = cfg.per_device_train_batch_size
    args = (b, cfg.pad_to_multiple_of)
    out = {"batch_size": b, "pad_to_multiple_of": cfg.pad_to_multiple_of,
           "length_bucketing": cfg.length_bucketing,
           "without_bucketing": round(
               padding_fraction(c, r, *args, False, cfg.bucket_size_multiplier, seed), 4),
           "with_bucketing": round(padding_fraction(c, r, *args, True, cfg.bucket_size_multiplier, seed), 4)}
    bucketing = cfg.length_bucketing
    # as the batches decide per pool: bucketed where that saves >= AUTO_MIN_SAVING of the tokens
    if bucketing == "auto":
        from dpo_ray.data.batching import AUTO_MIN_SAVING

        saving = (1 - (1 - out["without_bucketing"]) / (1 - out["with_bucketing"])
                  if out["with_bucketing"] < 1 else 0)
        bucketing = saving >= AUTO_MIN_SAVING
    out["configured"] = out["with_bucketing" if bucketing else "without_bucketing"]
    return out


# ------------------------------------------------------------------------------------------- compute
def compute_report(piece: Piece, cfg, params: dict[str, Any], padding: float) -> dict[str, Any]:
    """Tokens per epoch and FLOPs: 2·N·tokens for the reference forward, 6·N·tokens for the policy."""
    ln = piece.lengths
    kept = ln["kept"] == 1
    tokens = int(ln["chosen_seq"][kept].sum() + ln["rejected_seq"][kept].sum())
    padded = int(round(tokens / (1 - padding))) if padding < 1 else tokens
    n, n_ref = params.get("policy"), params.get("reference")
    needs_ref = bool(cfg.needs_reference)
    out: dict[str, Any] = {"tokens_per_epoch": tokens, "tokens_per_epoch_padded": padded,
                           "epochs": cfg.num_train_epochs, "parameters": n, "reference_parameters": n_ref,
                           "parameter_source": params.get("source"), "needs_reference": needs_ref,
                           "reference_source": cfg.reference.source}
    if n is None:
        out.update(policy_flops_per_epoch=None, reference_flops_per_epoch=None, total_flops=None)
        return out
    ref = 2 * (n_ref or n) * padded if needs_ref else 0
    pol = 6 * n * padded
    # a precomputed reference runs once, not every epoch
    ref_total = ref if cfg.reference.source == "precomputed" else ref * cfg.num_train_epochs
    out.update(policy_flops_per_epoch=float(pol), reference_flops_per_epoch=float(ref),
               total_flops=float(pol * cfg.num_train_epochs + ref_total))
    return out


def parameter_count(path: str | None, tokenizer, trust_remote_code: bool = False) -> tuple[int | None, str]:
    """(N, where it came from): the model config instantiated on the meta device, no weights loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if path is None:
        from dpo_ray.models import tiny_llama_config

        config, source = tiny_llama_config(tokenizer), "the bundled tiny Llama config"
    elif (Path(path) / "config.json").exists():
        config, source = (AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code),
                          f"{path}/config.json")
    else:
        return None, f"{path} has no config.json; FLOPs not estimated"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters()), source


# ------------------------------------------------------------------------------------------- checks
def _rows(h: Hits) -> list[dict[str, Any]]:
    return [{"row_id": i, "where": at, **({"detail": d} if d else {})} for i, at, d in h.rows]


def mixed_formats(piece: Piece, keep: int) -> Hits:
    """Rows of a source file that are not in the file's most common format (standard / conversational ×
    explicit / implicit prompt); lines that are not rows at all are bad rows, not a format."""
    out = Hits()
    by_source: dict[str, dict[str, Hits]] = {}
    for (src, fmt), h in piece.source_formats.items():
        if fmt != UNREADABLE:
            by_source.setdefault(src, {})[fmt] = h
    for _, formats in sorted(by_source.items()):
        if len(formats) < 2:
            continue
        main = max(formats, key=lambda f: formats[f].count)
        mix = ", ".join(f"{f} {h.count}" for f, h in sorted(formats.items(), key=lambda kv: -kv[1].count))
        for fmt, h in formats.items():
            if fmt != main:
                out.merge(Hits(h.count, [(i, at, f"{fmt} in a file of {main} ({mix})")
                                         for i, at, _ in h.rows]), keep)
    return out


def check_hits(piece: Piece, on_bad_row: str, keep: int = 5) -> dict[str, Hits]:
    """Every check's Hits: the per-row ones, the two derived from bad rows (each row's detail names its
    kind, so the example says why the pipeline drops it), and the mixed formats per source file."""
    hits = dict(piece.checks)
    bad = Hits()
    for kind, h in piece.bad.items():
        bad.merge(Hits(h.count, [(i, at, f"[{kind}] {d}") for i, at, d in h.rows]),
                  keep=max(len(h.rows), keep))
    hits["dropped_rows"] = bad
    hits["bad_rows_raise"] = bad if on_bad_row == "raise" else Hits()
    hits["mixed_formats"] = mixed_formats(piece, keep)
    return hits


def evaluate(piece: Piece, cfg, keep: int,
             extra: dict[str, tuple[int, str]] | None = None) -> dict[str, dict[str, Any]]:
    """{check: {level, max_fraction, count, fraction, status, meaning, rows}}; status ok | warn | error | off.

    ``extra``: checks not counted per row (``no_training_steps``): name -> (rows affected, detail)."""
    hits = check_hits(piece, cfg.on_bad_row, keep)
    by_kind = {k: h.count for k, h in sorted(piece.bad.items(), key=lambda kv: -kv[1].count) if h.count}
    out = {}
    for name, (_, _, meaning) in INSPECT_CHECKS.items():
        h = hits.get(name, Hits())
        count, detail = (extra or {}).get(name, (h.count, ""))
        level, limit = cfg.inspect.level(name), cfg.inspect.threshold(name)
        frac = count / piece.rows if piece.rows else 0.0
        fired = count > 0 and frac > limit
        status = "off" if level == "off" else (level if fired else "ok")
        out[name] = {"level": level, "max_fraction": limit, "count": count, "fraction": round(frac, 6),
                     "status": status, "meaning": meaning, "rows": _rows(h)[:keep]}
        if detail:
            out[name]["detail"] = detail
        if name in ("dropped_rows", "bad_rows_raise") and h.count:
            out[name]["by_kind"] = by_kind
    return out


def bad_row_report(piece: Piece, on_bad_row: str, max_dropped: float = 1.0) -> dict[str, Any]:
    kinds = {k: {"count": piece.bad[k].count if k in piece.bad else 0,
                 "rows": _rows(piece.bad[k]) if k in piece.bad else []} for k in BAD_ROW_KINDS}
    n = sum(v["count"] for v in kinds.values())
    first = min((h.rows[0] for h in piece.bad.values() if h.rows), default=None)
    if n == 0:
        effect = "no bad rows"
    elif on_bad_row == "raise":
        effect = f"on_bad_row: raise, so training stops at the first bad row ({first[1]})"
    else:
        effect = f"on_bad_row: skip, so training drops {n} row(s) and reports them at the end"
        if n >= piece.rows or n / piece.rows > max_dropped:
            effect += (f"; {n / piece.rows:.0%} dropped is above max_dropped_fraction={max_dropped:g} (or is "
                       "every row), so training stops with exit status 3")
    return {"on_bad_row": on_bad_row, "total": n, "effect": effect, "kinds": kinds}


def steps_report(piece: Piece, cfg, rows_counted: int | None) -> dict[str, Any]:
    """The optimizer steps training plans (from the rows counted, as the trainer counts them) and the steps
    the kept rows reach (dpo_ray.data.step_plan), with ``eval_fraction``'s share held out of both."""
    kept = int(piece.lengths["kept"].sum())
    counted = piece.rows if rows_counted is None else rows_counted
    held = cfg.eval_fraction
    counted, kept = counted - round(counted * held), kept - round(kept * held)
    plan = plan_steps(counted, cfg)
    kept_plan = plan_steps(kept, cfg)
    return {"workers": plan.world, "rows_per_step": plan.rows_per_step(cfg), "rows_counted": counted,
            "rows_kept": kept, "planned_steps": plan.total_steps,
            "planned_steps_per_epoch": plan.steps_per_epoch,
            "kept_steps_per_epoch": kept_plan.steps_per_epoch, "epochs": plan.num_epochs,
            "steps_reached": steps_reached(plan, kept, cfg) if plan.total_steps else 0}


def build_report(piece: Piece, cfg, *, dataset: str, tokenizer_name: str, params: dict[str, Any],
                 keep: int, rows_counted: int | None = None,
                 inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    lengths = length_arrays(piece)
    kept = int(piece.lengths["kept"].sum())
    padding = padding_report(piece, cfg)
    steps = steps_report(piece, cfg, rows_counted)
    extra = {}
    if steps["kept_steps_per_epoch"] == 0 and piece.rows:
        extra["no_training_steps"] = (piece.rows,
                                      f"{steps['rows_kept']} rows kept for training; one optimizer "
                                      f"step takes {steps['rows_per_step']}")
    checks = evaluate(piece, cfg, keep, extra)
    statuses = {c["status"] for c in checks.values()}
    status = "error" if "error" in statuses else "warn" if "warn" in statuses else "ok"
    fills = piece.bad[PROMPT_FILLS].count if PROMPT_FILLS in piece.bad else 0
    return {
        "version": REPORT_VERSION,
        "dataset": dataset,
        "tokenizer": tokenizer_name,
        "status": status,
        "exit_status": 1 if status == "error" else 0,
        "rows": {"seen": piece.rows, "kept": kept, "dropped": piece.rows - kept,
                 "truncated": piece.checks["truncated_rows"].count,
                 "by_format": dict(sorted(piece.formats.items())),
                 "by_source": {s: {"rows": c["rows"], "kept": c["kept"], "bad_rows": c["bad_rows"]}
                               for s, c in sorted(piece.sources.items())}},
        "inputs": inputs or {},
        "bad_rows": bad_row_report(piece, cfg.on_bad_row, cfg.max_dropped_fraction),
        "steps": steps,
        "lengths": {k: percentiles(v) for k, v in lengths.items()},
        "truncation": {"max_length": cfg.max_length, "truncation_mode": cfg.truncation_mode,
                       "rows_truncated": piece.checks["truncated_rows"].count, "rows_dropped": fills,
                       "completion_tokens_cut": piece.tokens_cut},
        "checks": checks,
        "padding": padding,
        "compute": compute_report(piece, cfg, params, padding["configured"]),
        "files": {},
    }


# ------------------------------------------------------------------------------------------- output
def write_histograms(piece: Piece, cfg, out_dir: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    for name, x in length_arrays(piece).items():
        fig, ax = plt.subplots(figsize=(6, 3.4))
        ax.hist(x, bins=cfg.inspect.histogram_bins, color="#4c72b0")
        if cfg.max_length and name in ("prompt", "sequence"):
            ax.axvline(cfg.max_length, color="#c44e52", ls="--", label=f"max_length {cfg.max_length}")
            ax.legend()
        what = "completion" if name in ("chosen", "rejected") else ""
        ax.set_title(f"{name} {what} tokens (untruncated), {len(x)} rows".replace("  ", " "))
        ax.set_xlabel("tokens")
        ax.set_ylabel("rows")
        fig.tight_layout()
        path = out_dir / f"{name}_length.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files[f"{name}_histogram"] = str(path)
    return files


def write_report(report: dict[str, Any], piece: Piece, cfg, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    report["files"] = write_histograms(piece, cfg, out_dir)
    path = out_dir / "report.json"
    report["files"]["report"] = str(path)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def _flops(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _shortener(sources: list[str]):
    """Row locations with file names instead of full paths (when the names are unique), for the console."""
    names = {s: Path(s).name for s in sources if s}
    if len(set(names.values())) != len(names):
        return lambda text: text
    def short(text: str) -> str:
        for full, name in names.items():
            text = text.replace(full, name)
        return text
    return short


def format_console(report: dict[str, Any]) -> str:
    """The human-readable report (the JSON holds the same numbers, with full paths)."""
    r, lines = report["rows"], []
    short = _shortener(list(r["by_source"]))
    add = lambda line: lines.append(short(line))  # noqa: E731
    lines.append(f"== dpo-ray inspect-data: {report['dataset']} (tokenizer {report['tokenizer']})")
    inputs = report.get("inputs") or {}
    if inputs:
        lines.append(f"tokenizer: {inputs['tokenizer']}")
        lines.append(f"train: {inputs['train']}")
        lines.append(f"eval:  {inputs['eval']}")
        lines += [f"  not used: {x}" for x in inputs.get("not_used", [])]
        lines += [f"  warning: {x}" for x in inputs.get("notes", [])]
    add(f"rows: {r['seen']} seen, {r['kept']} kept, {r['dropped']} dropped, {r['truncated']} truncated")
    add("  by format: " + ", ".join(f"{k} {v}" for k, v in r["by_format"].items()))
    for src, c in r["by_source"].items():
        add(f"  {src}: {c['rows']} rows, {c['kept']} kept, {c['bad_rows']} bad")
    bad = report["bad_rows"]
    add(f"bad rows: {bad['total']} ({bad['effect']})")
    for kind, v in bad["kinds"].items():
        if v["count"]:
            add(f"  {kind}: {v['count']}, e.g. " + "; ".join(x["where"] for x in v["rows"]))
            add(f"    {v['rows'][0].get('detail', '')}")
    add("token lengths (untruncated)   p50    p90    p99    max")
    for k, p in report["lengths"].items():
        add(f"  {k:<27} {p['p50']:>5}  {p['p90']:>5}  {p['p99']:>5}  {p['max']:>5}")
    t = report["truncation"]
    add(f"max_length {t['max_length']} ({t['truncation_mode']}): {t['rows_truncated']} rows truncated, "
        f"{t['rows_dropped']} dropped (prompt fills max_length), {t['completion_tokens_cut']} tokens cut")
    st = report["steps"]
    add(f"steps: {st['rows_counted']} training rows counted, {st['rows_kept']} kept; one optimizer step "
        f"takes {st['rows_per_step']} rows: {st['planned_steps']} steps planned "
        f"({st['planned_steps_per_epoch']}/epoch), the kept rows reach {st['steps_reached']} "
        f"({st['kept_steps_per_epoch']}/epoch)")
    pad = report["padding"]
    add(f"padding (batch {pad['batch_size']}): {pad['without_bucketing']:.1%} without length bucketing, "
        f"{pad['with_bucketing']:.1%} with; configured: {pad['configured']:.1%}")
    c = report["compute"]
    add(f"compute: {c['tokens_per_epoch']} tokens/epoch ({c['tokens_per_epoch_padded']} with padding), "
        f"N = {c['parameters'] if c['parameters'] is not None else 'unknown'} ({c['parameter_source']})")
    add(f"  FLOPs/epoch: policy {_flops(c['policy_flops_per_epoch'])} (6·N·tokens), reference "
        f"{_flops(c['reference_flops_per_epoch'])} "
        f"(2·N·tokens{'' if c['needs_reference'] else ', no reference'}); run total "
        f"{_flops(c['total_flops'])} over {c['epochs']:g} epoch(s)")
    add("checks:")
    for name, v in report["checks"].items():
        mark = {"ok": "ok   ", "warn": "WARN ", "error": "ERROR", "off": "off  "}[v["status"]]
        add(f"  [{mark}] {name}: {v['count']} rows ({v['fraction']:.2%}; {v['level']} above "
            f"{v['max_fraction']:.0%})")
        if v["status"] in ("warn", "error"):
            add(f"          {v['meaning']}" + ("; e.g. " + "; ".join(x["where"] for x in v["rows"][:3])
                                               if v["rows"] else ""))
            detail = v.get("detail") or next((x["detail"] for x in v["rows"] if x.get("detail")), "")
            if v.get("by_kind"):  # the kinds, not one row's reason (another check may say that one)
                detail = "by kind: " + ", ".join(f"{k} {n}" for k, n in v["by_kind"].items())
            if detail:
                add(f"          {detail}")
    add(f"status: {report['status']} (exit {report['exit_status']})"
        + (f"; report in {Path(report['files']['report']).parent}" if report["files"].get("report") else ""))
    return "\n".join(lines)
