"""Never train on the wrong data. Each silent path from files to tokens either does the right thing
or stops with a message naming the file, row or key and the fix. Files are written the way real tools write
them: pandas / Excel CSV with a byte-order mark, ``datasets`` Parquet and ``save_to_disk``, a model saved
with ``save_pretrained`` and no tokenizer, sibling split files.

Ray: the Ray Data tests share ``ray_local``; two end-to-end CLI runs (``slow``) cost one Ray Train fit each.
"""

from __future__ import annotations

import csv
import json
import tracemalloc
from pathlib import Path

import pytest

from dpo_ray import DPOConfig
from dpo_ray.data import (
    BadRowError,
    DataSourceError,
    ModelFilesError,
    TooFewRowsError,
    build_datasets,
    bundled,
    iter_train_batches,
    load_tokenizer,
    plan,
    sources,
    tokenize_rows,
)
from dpo_ray.data.analyze import Analyzer
from dpo_ray.data.rows import IDENTICAL_TRUNCATED, NULL_VALUE
from dpo_ray.data.stats import check_trained
from dpo_ray.data.step_plan import plan_for_micro_batches, plan_steps, steps_reached
from dpo_ray.data.tokenize import RawRow, RowProcessor, TokenizeOptions
from dpo_ray.preflight.report import evaluate, format_console

pytestmark = pytest.mark.timeout(400)  # a starved Ray fails instead of hanging


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    with open(bundled.TRAIN_FILE) as f:
        return [json.loads(next(f)) for _ in range(120)]


def cfg(**kw) -> DPOConfig:
    return DPOConfig(**{"max_length": 64, "per_device_train_batch_size": 8, **kw})


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_file(path: Path, **kw) -> list[RawRow]:
    """Every raw row of a file, as the pipeline's read tasks see them (planning + reading, no Ray)."""
    chunks, _ = sources.plan_files([str(path)], **kw)
    return [r for c in chunks for r in sources.iter_chunk(c)]


def process(raw: list[RawRow], tok, source: str, **kw):
    return RowProcessor(tok, TokenizeOptions.from_config(cfg(**kw)), source).process(raw)


def names(paths) -> list[str]:
    return sorted(Path(p).name for p in paths)


# ------------------------------------------------------------------------ 1. no silent bundled fallback
@pytest.fixture(scope="module")
def model_without_tokenizer(tmp_path_factory, tok) -> Path:
    """A model saved with save_pretrained and nothing else: config.json + model.safetensors, no tokenizer."""
    from transformers import AutoModelForCausalLM

    from dpo_ray.models import tiny_llama_config

    d = tmp_path_factory.mktemp("model_no_tok")
    AutoModelForCausalLM.from_config(tiny_llama_config(tok, num_hidden_layers=1, hidden_size=32,
                                                       intermediate_size=64)).save_pretrained(d)
    return d


def test_model_saved_without_tokenizer_is_an_error_not_the_bundled_tokenizer(model_without_tokenizer):
    with pytest.raises(ModelFilesError) as e:
        load_tokenizer(DPOConfig(model_name_or_path=str(model_without_tokenizer)))
    msg = str(e.value)
    assert str(model_without_tokenizer) in msg and "tokenizer.save_pretrained" in msg and "bundled" in msg
    assert e.value.exit_code == 3


def test_model_directory_without_config_or_weights_is_named(tmp_path, tok):
    from dpo_ray.models import load_causal_lm

    tok.save_pretrained(tmp_path / "tok_only")
    with pytest.raises(ModelFilesError, match=r"tok_only has no config\.json"):
        load_causal_lm(str(tmp_path / "tok_only"), DPOConfig(), tok)
    (tmp_path / "tok_only" / "config.json").write_text("{}")
    with pytest.raises(ModelFilesError, match="no weights"):
        load_causal_lm(str(tmp_path / "tok_only"), DPOConfig(), tok)


def test_no_dataset_name_with_a_model_of_ones_own_is_an_error(model_without_tokenizer, tok):
    tok.save_pretrained(model_without_tokenizer / "with_tok")
    c = cfg(model_name_or_path=str(model_without_tokenizer / "with_tok"))
    with pytest.raises(DataSourceError, match=r"dataset_name is not set.*toy task.*--dataset_name"):
        plan.plan_sources(c, None, None, load_tokenizer(c))
    # the bundled data with a tokenizer of one's own is refused too (no model_name_or_path at all)
    other = load_tokenizer(str(model_without_tokenizer / "with_tok"))
    with pytest.raises(DataSourceError, match="dataset_name is not set"):
        plan.plan_sources(cfg(), None, None, other)
    train, ev, _ = plan.plan_sources(cfg(), None, None, tok)  # the embedded default: bundled model + data
    assert names(train.files) == ["train.jsonl"] and names(ev.files) == ["test.jsonl"]


def test_in_memory_model_without_processing_class_is_an_error_not_the_bundled_tokenizer(tmp_path, tok, rows):
    # DPOTrainer(model=<nn.Module>) with no processing_class used the bundled tokenizer and toy data
    from transformers import AutoModelForCausalLM

    from dpo_ray import DPOTrainer
    from dpo_ray.models import tiny_llama_config

    model = AutoModelForCausalLM.from_config(tiny_llama_config(tok, num_hidden_layers=1, hidden_size=32,
                                                               intermediate_size=64))
    with pytest.raises(ModelFilesError,
                       match=r"DPOTrainer\(model=<LlamaForCausalLM>\) got a model object and no "
                                              r"processing_class: pass its tokenizer as processing_class="):
        DPOTrainer(model=model, args=DPOConfig(output_dir=str(tmp_path / "out")), train_dataset=rows).train()
    # no data given either: no toy data instead
    with pytest.raises(ModelFilesError, match="no processing_class"):
        DPOTrainer(model=model, args=DPOConfig(output_dir=str(tmp_path / "out")))
    # accepted
    DPOTrainer(model=model, args=DPOConfig(output_dir=str(tmp_path / "out")), processing_class=tok)


def test_run_prints_the_tokenizer_and_the_files(ray_local, tok):
    prep = build_datasets(cfg(), tok)
    text = prep.summary()
    assert "the bundled tokenizer (66 tokens" in text
    assert str(bundled.TRAIN_FILE) in text and str(bundled.TEST_FILE) in text
    assert "not used: eval_strategy is 'no'" in text


# ------------------------------------------------------------------------ 2. split discovery
def test_directory_split_files_are_never_in_both_splits(tmp_path, rows):
    d = tmp_path / "d"
    write_jsonl(d / "prefs.jsonl", rows[:80])
    write_jsonl(d / "prefs_test.jsonl", rows[80:])
    train, ev, _ = plan.plan_sources(cfg(dataset_name=str(d)), None, None)
    assert names(train.files) == ["prefs.jsonl"] and names(ev.files) == ["prefs_test.jsonl"]
    assert train.num_rows == 80


TEST = "(named for split 'test')"


@pytest.mark.parametrize("layout,train_files,eval_files,left_out", [
    (["train.jsonl", "test.jsonl"], ["train.jsonl"], ["test.jsonl"], [f"test.jsonl {TEST}"]),
    (["a_train.jsonl", "b_train.jsonl", "a_test.jsonl", "notes.jsonl"], ["a_train.jsonl", "b_train.jsonl"],
     ["a_test.jsonl"], [f"a_test.jsonl {TEST}", "notes.jsonl (named for no split)"]),
    (["train/0.jsonl", "test/0.jsonl"], ["train/0.jsonl"], ["test/0.jsonl"], [f"test/0.jsonl {TEST}"]),
    (["data.jsonl", "validation.jsonl"], ["data.jsonl"], [],
     ["validation.jsonl (named for split 'validation')"]),
    (["train-00000-of-00002.jsonl", "train-00001-of-00002.jsonl", "test-00000-of-00001.jsonl"],
     ["train-00000-of-00002.jsonl", "train-00001-of-00002.jsonl"], ["test-00000-of-00001.jsonl"],
     [f"test-00000-of-00001.jsonl {TEST}"]),
])
def test_directory_layouts(tmp_path, rows, layout, train_files, eval_files, left_out):
    d = tmp_path / "d"
    for name in layout:
        write_jsonl(d / name, rows[:10])
    train, ev, _ = plan.plan_sources(cfg(dataset_name=str(d)), None, None)
    rel = lambda paths: sorted(str(Path(p).relative_to(d)) for p in paths)  # noqa: E731
    assert rel(train.files) == train_files
    assert rel(ev.files if ev is not None else []) == eval_files
    assert [x.replace(f"{d}/", "") for x in train.ignored] == left_out


def test_a_file_pairs_only_with_the_sibling_its_name_names(tmp_path, rows):
    write_jsonl(tmp_path / "my_prefs.jsonl", rows[:40])
    write_jsonl(tmp_path / "test.jsonl", [{"unrelated": 1}])  # not the eval split of my_prefs.jsonl
    train, ev, _ = plan.plan_sources(cfg(dataset_name=str(tmp_path / "my_prefs.jsonl")), None, None)
    assert names(train.files) == ["my_prefs.jsonl"] and ev is None
    write_jsonl(tmp_path / "my_prefs_test.jsonl", rows[40:50])  # this one is
    _, ev, _ = plan.plan_sources(cfg(dataset_name=str(tmp_path / "my_prefs.jsonl")), None, None)
    assert names(ev.files) == ["my_prefs_test.jsonl"]
    write_jsonl(tmp_path / "foo_train.jsonl", rows[:40])
    _, ev, _ = plan.plan_sources(cfg(dataset_name=str(tmp_path / "foo_train.jsonl")), None, None)
    assert ev is None  # foo_test.jsonl does not exist, and test.jsonl is not its sibling


def test_eval_file_that_is_also_training_data_is_refused(tmp_path, rows):
    path = write_jsonl(tmp_path / "all.jsonl", rows)
    with pytest.raises(DataSourceError, match="both training and eval data"):
        plan.plan_sources(cfg(dataset_name=str(path), eval_dataset_name=str(path)), None, None)


def test_glob_over_split_files_keeps_the_test_file_out_of_training(tmp_path, rows):
    write_jsonl(tmp_path / "prefs.jsonl", rows[:10])
    write_jsonl(tmp_path / "prefs_test.jsonl", rows[10:20])
    train, ev, _ = plan.plan_sources(cfg(dataset_name=str(tmp_path / "*.jsonl")), None, None)
    assert names(train.files) == ["prefs.jsonl"] and names(ev.files) == ["prefs_test.jsonl"]
    assert ([x.replace(f"{tmp_path}/", "") for x in train.ignored]
            == ["prefs_test.jsonl (named for split 'test')"])


def test_glob_over_train_and_test_folders_never_trains_on_the_test_rows(ray_local, tmp_path, tok, rows):
    # `data/**/*.jsonl` over data/train/ and data/test/ folders; the split is in a folder's name
    data = tmp_path / "data"
    write_jsonl(data / "train" / "part-0.jsonl", rows[:40])
    write_jsonl(data / "train" / "part-1.jsonl", rows[40:80])
    write_jsonl(data / "test" / "part-0.jsonl", rows[80:100])
    write_jsonl(data / "validation" / "part-0.jsonl", rows[100:110])  # another split: in neither
    prep = build_datasets(cfg(dataset_name=str(data / "**" / "*.jsonl"), eval_strategy="epoch"), tok)
    assert (prep.inputs["train_files"] == [str(data / "train" / "part-0.jsonl"),
                                           str(data / "train" / "part-1.jsonl")])
    assert prep.inputs["eval_files"] == [str(data / "test" / "part-0.jsonl")]
    assert prep.num_train_rows_estimate == 80 and prep.num_eval_rows_estimate == 20
    assert f"{data}/validation/part-0.jsonl (named for split 'validation')" in prep.inputs["not_used"]

    def tokens(ds) -> list[list[int]]:  # the rows as trained, in order
        return [list(r["chosen_input_ids"]) + list(r["rejected_input_ids"]) for r in ds.take_all()]

    assert tokens(prep.train) == tokens(build_datasets(cfg(), tok, train_dataset=rows[:80]).train)
    assert tokens(prep.eval) == tokens(build_datasets(cfg(), tok, train_dataset=rows[80:100]).train)
    # a glob that names the folder itself is the user's choice:
    # data/test/*.jsonl as eval_dataset_name is the eval
    prep = build_datasets(cfg(dataset_name=str(data / "train" / "*.jsonl"),
                              eval_dataset_name=str(data / "test" / "*.jsonl"), eval_strategy="epoch"), tok)
    assert prep.num_train_rows_estimate == 80 and prep.num_eval_rows_estimate == 20
    with pytest.raises(DataSourceError,
                       match=r"no file the glob matches is named for split 'dev' or for no split"):
        plan.plan_sources(cfg(dataset_name=str(data / "*" / "part-0.jsonl"), dataset_train_split="dev"),
                          None, None)


def _csv_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_csv_row_with_an_unquoted_comma_names_file_line_and_the_fix(tmp_path, tok):
    # A CSV written by hand (or by a join), a comma in a text not quoted: the columns would shift
    path = _csv_lines(tmp_path / "prefs.csv", ["prompt,chosen,rejected", '"sort: 2 1 =", 1 2, 2 1',
                                               "sort: 3, 1 =, 1 3, 3 1", '"sort: 5 4 =", 4 5, 5 4'])
    with pytest.raises(DataSourceError) as e:
        build_datasets(cfg(dataset_name=str(path)), tok)
    msg = str(e.value)
    assert msg.startswith(f"{path} line 3: 4 cells, but the header has 3 (prompt, chosen, rejected)")
    assert "must be quoted" in msg and "\n" not in msg
    # one too few
    _csv_lines(path, ["prompt,chosen,rejected", '"sort: 2 1 =", 1 2, 2 1', '"sort: 5 4 =", 4 5'])
    with pytest.raises(DataSourceError, match=r"prefs\.csv line 3: 2 cells, but the header has 3"):
        build_datasets(cfg(dataset_name=str(path)), tok)
    with open(path, "w", newline="", encoding="utf-8") as f:  # the fix: a CSV writer quotes the comma
        csv.writer(f).writerows([["prompt", "chosen", "rejected"], ["sort: 3, 1 =", " 1 3", " 3 1"]])
    assert read_file(path)[0].value == {"prompt": "sort: 3, 1 =", "chosen": " 1 3", "rejected": " 3 1"}


def test_csv_with_a_column_named_twice_is_refused(tmp_path, tok):
    path = _csv_lines(tmp_path / "prefs.csv",
                      ["prompt,chosen,rejected,chosen", '"sort: 2 1 =", 1 2, 2 1, 2 1 1'])
    with pytest.raises(DataSourceError, match=r"prefs\.csv line 1: the header names column 'chosen' twice "
                                              r"\(columns 2 and 4\)"):
        build_datasets(cfg(dataset_name=str(path)), tok)


def test_eval_rows_are_not_prechecked_when_eval_is_off(ray_local, tmp_path, tok, rows):
    write_jsonl(tmp_path / "train.jsonl", rows[:40])
    write_jsonl(tmp_path / "test.jsonl", [{"question": "q", "answer": "a"}])  # bad: no chosen/rejected
    prep = build_datasets(cfg(dataset_name=str(tmp_path / "train.jsonl")), tok)  # eval_strategy: no
    assert "not used: eval_strategy is 'no'" in prep.summary()
    with pytest.raises(BadRowError, match=r"test\.jsonl line 1"):
        build_datasets(cfg(dataset_name=str(tmp_path / "train.jsonl"), eval_strategy="epoch"), tok)


# ------------------------------------------------------------------------ 3. byte-order marks, column names
def test_pandas_csv_with_bom_keeps_the_prompt_column(tmp_path, tok, rows):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "excel.csv"
    pd.DataFrame(rows[:20]).to_csv(path, index=False, encoding="utf-8-sig")  # Excel's "CSV UTF-8"
    assert path.read_bytes()[:3] == b"\xef\xbb\xbf"
    raw = read_file(path)
    assert (list(raw[0].value) == ["prompt", "chosen", "rejected"]
            and raw[0].value["prompt"] == rows[0]["prompt"])
    table, stats = process(raw, tok, str(path))
    want = tokenize_rows(rows[:20], tok, cfg())
    assert (stats.kept == 20
            and table.column("chosen_prompt_len").to_pylist() == list(want["chosen_prompt_len"]))


def test_excel_bytes_csv_and_bom_jsonl(tmp_path, rows):
    text = "prompt,chosen,rejected\r\n" + "".join(f'"{r["prompt"]}","{r["chosen"]}","{r["rejected"]}"\r\n'
                                                  for r in rows[:5])
    (tmp_path / "excel.csv").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert read_file(tmp_path / "excel.csv")[0].value == rows[0]
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf"
                                         + "".join(json.dumps(r) + "\n" for r in rows[:5]).encode())
    raw = read_file(tmp_path / "bom.jsonl")
    assert [r.value for r in raw] == rows[:5]


@pytest.mark.parametrize("header,known", [("Prompt", "prompt"), ("prompt\u200b", "prompt"),
                                          (" chosen", "chosen"), ("REJECTED", "rejected"),
                                          ("\ufeffprompt", "prompt")])
def test_a_known_column_spelled_another_way_names_both_spellings(tmp_path, header, known):
    cols = [header if c == known else c for c in ("prompt", "chosen", "rejected")]
    path = tmp_path / "t.csv"
    # a BOM, then the header: the file's BOM is not a column's; a second one (BOM'd files joined) is
    with open(path, "w", newline="", encoding="utf-8-sig") as f:
        csv.writer(f).writerows([cols, ["sort: 2 1 =", " 1 2", " 2 1"]])
    with pytest.raises(DataSourceError) as e:
        sources.plan_files([str(path)])
    assert f"t.csv: column {ascii(header)} looks like {known!r}" in str(e.value)


def test_parquet_and_jsonl_misnamed_columns(tmp_path, tok):
    import datasets

    datasets.Dataset.from_list([{"prompt": "sort: 2 1 =", "Chosen": " 1 2", "rejected": " 2 1"}]).to_parquet(
        str(tmp_path / "t.parquet"))
    with pytest.raises(DataSourceError, match=r"t\.parquet: column 'Chosen' looks like 'chosen'"):
        sources.plan_files([str(tmp_path / "t.parquet")])
    write_jsonl(tmp_path / "t.jsonl", [{"\ufeffprompt": "sort: 2 1 =", "chosen": " 1 2", "rejected": " 2 1"}])
    with pytest.raises(BadRowError,
                       match=r"\[misnamed_column\] at .*t\.jsonl line 1.*'\\ufeffprompt' looks like"):
        process(read_file(tmp_path / "t.jsonl"), tok, str(tmp_path / "t.jsonl"))


# ------------------------------------------------------------------------ 4. nothing (or less) to train on
def test_every_row_dropped_stops_before_any_worker(ray_local, tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl",
                       [{"prompt": "sort: 1 =", "chosen": " 1", "rejected": " 1"}] * 10)
    with pytest.raises(TooFewRowsError,
                       match=r"all 10 train rows read were dropped \(identical_chosen_rejected"):
        build_datasets(cfg(dataset_name=str(path), on_bad_row="skip"), tok)


def test_mostly_dropped_stops_the_stream_at_max_dropped_fraction(ray_local, tmp_path, tok, rows):
    bad = [{"prompt": "sort: 1 =", "chosen": " 1"}] * 60  # missing rejected
    path = write_jsonl(tmp_path / "train.jsonl", rows[:40] + bad)  # the driver's first 32 rows are clean
    prep = build_datasets(cfg(dataset_name=str(path), on_bad_row="skip"), tok)
    with pytest.raises(TooFewRowsError, match=r"60 of 100 train rows read were dropped \(60%, above "
                                              r"max_dropped_fraction=0.5; missing_column 60\)"):
        list(iter_train_batches(prep.train, cfg(), tok.pad_token_id, batch_size=8, epoch=0, seed=0))
    prep = build_datasets(cfg(dataset_name=str(path), on_bad_row="skip", max_dropped_fraction=1.0), tok)
    assert prep.train.count() == 40


def test_step_plan_and_the_steps_kept_rows_reach():
    c = cfg(per_device_train_batch_size=8, ray={"num_workers": 2}, num_train_epochs=3)
    plan = plan_steps(100, c)  # 100 // 16 = 6 micro-batches per worker per epoch
    assert (plan.micro_per_epoch, plan.steps_per_epoch, plan.total_steps, plan.num_epochs) == (6, 6, 18, 3)
    assert steps_reached(plan, 50, c) == 9  # 3 steps per epoch from 50 kept rows
    assert steps_reached(plan, 10, c) == 0
    capped = plan_steps(100, c.model_copy(update={"max_steps": 10}))
    assert (capped.total_steps, capped.num_epochs, steps_reached(capped, 50, c)) == (10, 2, 6)
    # the worker loop re-plans by the same rule when its first epoch gives fewer micro-batches (rows dropped)
    again = plan_for_micro_batches(3, c, 2)
    assert (again.steps_per_epoch, again.total_steps, again.num_epochs) == (3, 9, 3)
    assert plan_for_micro_batches(3, c.model_copy(update={"max_steps": 10}), 2).num_epochs == 4


def test_after_the_run_zero_steps_is_an_error_and_a_short_run_is_said():
    report = {"train": {"rows_seen": 40, "rows_kept": 20, "rows_dropped": 20,
                        "dropped": {"malformed_json": 20}}}
    with pytest.raises(TooFewRowsError,
                       match=r"trained 0 optimizer steps: 20 of the 40 training rows read were "
                                              r"kept .*untouched input weights"):
        check_trained(0, 1, report, 40, 1.0)
    note = check_trained(3, 5, report, 40, 1.0)
    assert "trained 3 optimizer steps, not the 5 first planned" in note and "learning-rate schedule" in note
    assert check_trained(5, 5, report, 40, 1.0) is None
    with pytest.raises(TooFewRowsError, match="above max_dropped_fraction=0.25"):
        check_trained(3, 5, report, 40, 0.25)


# ------------------------------------------------------------------------ 5. row errors, not tracebacks
def test_malformed_chat_template_kwargs_is_a_bad_row(tok):
    chat = {"prompt": [{"role": "user", "content": "sort: 2 1 ="}],
            "chosen": [{"role": "assistant", "content": "1 2"}],
            "rejected": [{"role": "assistant", "content": "2 1"}]}
    broken = {**chat, "chat_template_kwargs": '{"enable_thinking": fals'}
    with pytest.raises(BadRowError,
                       match=r"\[wrong_type\] at in-memory rows, row 1: column 'chat_template_kwargs' "
                                          r"is a string but not a JSON object"):
        tokenize_rows([chat, broken], tok, cfg())
    assert list(tokenize_rows([chat, broken, chat], tok, cfg(on_bad_row="skip"))["row_id"]) == [0, 2]


def test_csv_cells_over_128_kib_are_read_and_csv_errors_name_the_line(tmp_path, monkeypatch, rows):
    path = tmp_path / "big.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "chosen", "rejected", "notes"])
        w.writerow([rows[0]["prompt"], rows[0]["chosen"], rows[0]["rejected"], "x" * 200_000])
        w.writerow([rows[1]["prompt"], rows[1]["chosen"], rows[1]["rejected"], "short"])
    assert len(read_file(path)) == 2
    set_limit = csv.field_size_limit
    monkeypatch.setattr(sources.csv, "field_size_limit", lambda *_: None)  # the stdlib default limit, 128 KiB
    set_limit(131072)
    try:
        with pytest.raises(DataSourceError,
                           match=r"big\.csv line 2: not readable as CSV \(field larger than field limit"):
            read_file(path)
    finally:
        set_limit(2**31 - 1)


# ------------------------------------------------------------------------ 6. planning memory
def test_planning_a_large_jsonl_keeps_driver_memory_flat(tmp_path, rows):
    path = tmp_path / "big.jsonl"
    block = "".join(json.dumps(r) + "\n" for r in rows).encode()
    with open(path, "wb") as f:
        for _ in range(24 * 2**20 // len(block)):
            f.write(block)
    size = path.stat().st_size
    tracemalloc.start()
    chunks, n = sources.plan_files([str(path)])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == size // len(block) * len(rows) and sum(c.end - c.start for c in chunks) == size
    assert peak < 4 * 2**20, f"planning a {size >> 20} MiB file peaked at {peak >> 20} MiB"


def test_previewing_a_parquet_file_of_one_large_row_group_reads_a_bounded_batch(tmp_path):
    # A file written as one row group was read whole (every row as a dict) to preview 32 rows
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 100_000
    path = tmp_path / "one_group.parquet"
    pq.write_table(pa.table({"prompt": [f"sort: {i} 3 1 =" * 4 for i in range(n)], "chosen": [" 1 3"] * n,
                             "rejected": [" 3 1"] * n}), path, row_group_size=n)
    [chunk], total = sources.plan_files([str(path)])
    assert total == n and pq.ParquetFile(path).metadata.num_row_groups == 1
    tracemalloc.start()
    preview = [r for _, r in zip(range(33), sources.iter_chunk(chunk))]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert ([r.line for r in preview] == list(range(1, 34))
            and preview[5].value["prompt"] == "sort: 5 3 1 =" * 4)
    assert peak < 4 * 2**20, f"previewing 33 rows of a {n}-row group peaked at {peak >> 20} MiB"
    rows = list(sources.iter_chunk(chunk))  # the read task still yields every row once, in order
    assert (len(rows) == n and rows[-1].row_id == n - 1
            and rows[-1].value["prompt"] == f"sort: {n - 1} 3 1 =" * 4)


def test_a_json_array_over_the_limit_asks_for_json_lines(tmp_path, monkeypatch, rows):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    assert sources.plan_files([str(path)])[1] == len(rows)
    monkeypatch.setattr(sources, "JSON_ARRAY_MAX_BYTES", 1024)
    with pytest.raises(DataSourceError, match=r"one JSON array .*Write it as JSON Lines"):
        sources.plan_files([str(path)])


# ------------------------------------------------------------------------ 7. identical after truncation
def test_pairs_identical_after_truncation_are_bad_rows_in_training_and_inspect(tok, rows):
    same_start = {"prompt": "sort: 2 1 =", "chosen": " 1" * 70 + " 2", "rejected": " 1" * 70 + " 3"}
    with pytest.raises(BadRowError, match=r"\[identical_after_truncation\].*max_length=64.*raise max_length"):
        tokenize_rows([rows[0], same_start], tok, cfg())
    assert list(tokenize_rows([rows[0], same_start], tok, cfg(max_length=None))["row_id"]) == [0, 1]
    c = cfg(on_bad_row="skip")
    piece = Analyzer(tok, c).analyze([RawRow(i, i + 1, r) for i, r in enumerate(rows[:20] + [same_start])],
                                     "x.jsonl")
    assert piece.bad[IDENTICAL_TRUNCATED].count == 1 and int(piece.lengths["kept"].sum()) == 20


# ------------------------------------------------------------------------ 8. nulls are not "absent"
def test_null_prompt_in_jsonl_csv_and_parquet_is_a_bad_row_naming_row_and_column(tmp_path, tok, rows):
    import datasets

    data = rows[:5] + [{**rows[5], "prompt": None}] + rows[6:10]
    write_jsonl(tmp_path / "t.jsonl", data)
    datasets.Dataset.from_list(data).to_csv(str(tmp_path / "t.csv"), index=False)  # the null: an empty cell
    datasets.Dataset.from_list(data).to_parquet(str(tmp_path / "t.parquet"))
    for name, where in [("t.jsonl", "line 6"), ("t.csv", "line 7"), ("t.parquet", "row 6")]:
        path = tmp_path / name
        with pytest.raises(BadRowError,
                           match=rf"\[null_value\] at .*{name} {where} \(row_id 5\): column 'prompt' "
                                              r"is null") as e:
            process(read_file(path), tok, str(path))
        assert e.value.kind == NULL_VALUE
        _, stats = process(read_file(path), tok, str(path), on_bad_row="skip")
        assert (stats.kept, dict(stats.dropped)) == (9, {NULL_VALUE: 1})


def test_null_in_a_save_to_disk_dataset(ray_local, tmp_path, tok, rows):
    import datasets

    data = rows[:3] + [{**rows[3], "prompt": None}] + rows[4:10]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(data)}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(BadRowError,
                       match=r"\[null_value\] at .*saved \[train\], row 3: column 'prompt' is null"):
        build_datasets(cfg(dataset_name=str(tmp_path / "saved")), tok)


# ------------------------------------------------------------------------ 11. inspect-data edges
def run_checks(data: list[dict], tok, **kw):
    c = cfg(**kw)
    piece = Analyzer(tok, c).analyze([RawRow(i, i + 1, r) for i, r in enumerate(data)], "crafted.jsonl")
    return evaluate(piece, c, keep=5)


def test_empty_prompt_is_a_finding(tok, rows):
    checks = run_checks(rows[:19] + [{**rows[19], "prompt": ""}], tok)
    assert checks["empty_prompt"]["count"] == 1 and checks["empty_prompt"]["status"] == "warn"
    assert checks["empty_prompt"]["rows"][0]["detail"] == "'prompt' is empty"


def test_a_file_mixing_standard_and_conversational_rows_is_a_finding(tok, rows):
    with open(bundled.CONVERSATIONAL_TRAIN_FILE) as f:
        chat = [json.loads(next(f)) for _ in range(3)]
    checks = run_checks(rows[:17] + chat, tok)
    mixed = checks["mixed_formats"]
    assert mixed["count"] == 3 and mixed["status"] == "error"
    assert ("conversational_explicit_prompt in a file of standard_explicit_prompt"
            in mixed["rows"][0]["detail"])


def test_dropped_rows_example_names_its_own_kind(tok, rows):
    data = rows[:18] + [{"prompt": "sort: 1 =", "chosen": " 1", "rejected": " 1"},
                        {"prompt": "x", "chosen": " 1"}]
    checks = run_checks(data, tok)
    dropped = checks["dropped_rows"]
    assert dropped["by_kind"] == {"identical_chosen_rejected": 1, "missing_column": 1}
    assert ([r["detail"].split("]")[0] for r in dropped["rows"]]
            == ["[identical_chosen_rejected", "[missing_column"])
    report = {"dataset": "x", "tokenizer": "t", "rows": {"seen": 20, "kept": 18, "dropped": 2, "truncated": 0,
                                                         "by_format": {}, "by_source": {}},
              "bad_rows": {"total": 2, "effect": "e", "kinds": {}}, "lengths": {},
              "steps": {"rows_counted": 20, "rows_kept": 18, "rows_per_step": 8, "planned_steps": 6,
                        "planned_steps_per_epoch": 2, "steps_reached": 6, "kept_steps_per_epoch": 2},
              "truncation": {"max_length": 64, "truncation_mode": "keep_start", "rows_truncated": 0,
                             "rows_dropped": 0, "completion_tokens_cut": 0},
              "padding": {"batch_size": 8, "without_bucketing": 0, "with_bucketing": 0, "configured": 0},
              "compute": {"tokens_per_epoch": 0, "tokens_per_epoch_padded": 0, "parameters": None,
                          "parameter_source": "", "policy_flops_per_epoch": None,
                          "reference_flops_per_epoch": None, "needs_reference": True, "total_flops": None,
                          "epochs": 1},
              "checks": checks, "status": "error", "exit_status": 1, "files": {}}
    text = format_console(report)
    line = text.splitlines()[
        text.splitlines().index(next(x for x in text.splitlines() if "] dropped_rows" in x)) + 2]
    assert line.strip() == "by kind: identical_chosen_rejected 1, missing_column 1"


def test_inspect_data_reports_inputs_steps_and_truncation_identity(ray_local, tmp_path, tok, rows):
    from dpo_ray.preflight import run_inspect

    same_start = {"prompt": "sort: 2 1 =", "chosen": " 1" * 70 + " 2", "rejected": " 1" * 70 + " 3"}
    write_jsonl(tmp_path / "d" / "prefs.jsonl", rows[:30] + [same_start] + [{**rows[0], "prompt": None}])
    write_jsonl(tmp_path / "d" / "prefs_test.jsonl", rows[30:40])
    write_jsonl(tmp_path / "d" / "prefs_validation.jsonl", rows[40:50])
    c = cfg(dataset_name=str(tmp_path / "d"), on_bad_row="skip", output_dir=str(tmp_path / "out"),
            ray={"num_workers": 2})
    assert run_inspect(c, report_dir=tmp_path / "r") == 1  # dropped_rows: 2 of 32 > 5%
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    inputs = report["inputs"]
    assert "bundled tokenizer" in inputs["tokenizer"]
    assert (names(inputs["train_files"]) == ["prefs.jsonl"]
            and names(inputs["eval_files"]) == ["prefs_test.jsonl"])
    assert any("prefs_validation.jsonl (named for split 'validation')" in x for x in inputs["not_used"])
    assert report["rows"]["seen"] == 32  # the test and validation files are not training rows
    assert report["bad_rows"]["kinds"]["identical_after_truncation"]["count"] == 1
    assert report["bad_rows"]["kinds"]["null_value"]["count"] == 1
    assert report["steps"] == {"workers": 2, "rows_per_step": 16, "rows_counted": 32, "rows_kept": 30,
                               "planned_steps": 6, "planned_steps_per_epoch": 2, "kept_steps_per_epoch": 1,
                               "epochs": 3, "steps_reached": 3}


# ------------------------------------------------------------------------ 9. the CLI: message, exit 3
def _cli(tmp_path: Path, data: Path, capsys, **extra) -> tuple[int, str]:
    from dpo_ray.cli import main

    config = {"dataset_name": str(data), "output_dir": str(tmp_path / "out"), "max_length": 64,
              "per_device_train_batch_size": 4, "save_strategy": "no", "report_to": [], "logging_steps": 1,
              "ray": {"num_workers": 1}, "reference": {"source": "local"}, **extra}
    (tmp_path / "run.yaml").write_text(json.dumps(config))  # JSON is YAML
    code = main(["train", "--config", str(tmp_path / "run.yaml")])
    return code, capsys.readouterr().err


def test_cli_bad_row_in_the_first_rows_prints_the_message_alone(ray_local, tmp_path, rows, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", rows[:3] + [{"prompt": "sort: 1 =", "chosen": " 1"}]
                       + rows[3:40])
    code, err = _cli(tmp_path, data, capsys)
    assert code == 3
    tail = [x for x in err.splitlines() if x.strip()][-2:]
    assert (tail[0].startswith("dpo-ray train: bad row [missing_column] at ")
            and "train.jsonl line 4" in tail[0])
    assert tail[1] == f"(traceback in {tmp_path / 'out' / 'error.log'}; --debug prints it)"
    assert "Traceback" not in err and "Traceback" in (tmp_path / "out" / "error.log").read_text()


@pytest.mark.slow
def test_cli_bad_row_met_by_a_training_worker_exits_3(ray_local, tmp_path, rows, capsys):
    """Past the driver's first 32 rows the bad row is met inside a Ray Train worker: still one message."""
    data = write_jsonl(tmp_path / "train.jsonl", rows[:40] + ["{not json"] + rows[40:80])
    code, err = _cli(tmp_path, data, capsys, max_steps=2)
    assert code == 3
    last = [x for x in err.splitlines() if x.strip()][-2]
    assert last.startswith("dpo-ray train: bad row [malformed_json] at ") and "train.jsonl line 41" in last


@pytest.mark.slow
def test_cli_run_that_trains_zero_steps_exits_3(ray_local, tmp_path, rows, capsys):
    """40 rows counted plan one step of 32; half are unreadable, so the 20 kept give no batch at all."""
    data = write_jsonl(tmp_path / "train.jsonl", [x for r in rows[:20] for x in (r, "{not json")])
    code, err = _cli(tmp_path, data, capsys, on_bad_row="skip", max_dropped_fraction=1.0,
                     per_device_train_batch_size=32)
    assert code == 3
    last = [x for x in err.splitlines() if x.strip()][-2]
    assert last.startswith(
        "dpo-ray train: the run trained 0 optimizer steps: 20 of the 40 training rows read")


@pytest.mark.parametrize("n_rows, world, batch", [(1, 2, 4), (5, 2, 2), (13, 3, 4), (16, 2, 4)])
def test_eval_shares_score_every_row_exactly_once(ray_local, tok, rows, n_rows, world, batch):
    # Every worker reads the whole eval stream and scores its share; a partial last batch counts
    from dpo_ray.data import iter_eval_batches

    prep = build_datasets(cfg(), tok, train_dataset=rows[:n_rows])
    seen, fillers = [], []
    for rank in range(world):
        share = iter_eval_batches(prep.train, cfg(), tok.pad_token_id, batch_size=batch, rank=rank,
                                  world=world)
        batches = list(share)
        assert all(len(b["row_id"]) <= batch for b in batches)
        seen += [int(i) for b in batches for i in b["row_id"]]
        fillers.append(share.filler["row_id"].tolist())
    assert sorted(seen) == list(range(n_rows))  # each row once
    assert fillers == [[0]] * world  # the weight-0 batch of a worker whose share ran out


def test_the_plan_line_names_the_rows_an_epoch_leaves_untrained():
    # Each worker's last partial batch is not trained (as dataloader_drop_last); the plan says how many
    from dpo_ray.trainer import _untrained

    c = cfg(per_device_train_batch_size=4, ray={"num_workers": 2})
    plan = plan_steps(70, c)
    note = _untrained(70, plan.micro_per_epoch * plan.world * c.per_device_train_batch_size)
    assert note == "; 6 of ~70 rows per epoch not trained (the last partial batch of each worker's share, " \
                   "as dataloader_drop_last)"
    assert _untrained(64, 64) == ""
