"""The Ray Data pipeline on a local Ray: every source, eval splits, bad rows through tasks, batching."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from dpo_ray import DPOConfig
from dpo_ray.data import (
    BadRowError,
    build_datasets,
    bundled,
    iter_train_batches,
    load_tokenizer,
    tokenize_rows,
)

pytestmark = pytest.mark.timeout(300)  # a starved Ray fails instead of hanging


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def rows():
    return [json.loads(x) for x in open(bundled.TRAIN_FILE)][:200]


def cfg(**kw) -> DPOConfig:
    return DPOConfig(**{"max_length": 64, "per_device_train_batch_size": 8, **kw})


def collect(ds) -> dict[int, list[int]]:
    return {int(r["row_id"]): [int(x) for x in r["chosen_input_ids"]] for r in ds.take_all()}


def expected(rows, tok) -> dict[int, list[int]]:
    cols = tokenize_rows(rows, tok, cfg())
    return {int(i): [int(x) for x in ids] for i, ids in zip(cols["row_id"], cols["chosen_input_ids"])}


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------- sources
def _source(kind: str, rows, tmp: Path):
    """(dataset_name, train_dataset) for each source kind, all holding ``rows`` in order."""
    import datasets
    import ray

    if kind == "jsonl":
        return str(write_jsonl(tmp / "train.jsonl", rows)), None
    if kind == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(tmp / "train.parquet"))
        return str(tmp / "train.parquet"), None
    if kind == "csv":
        datasets.Dataset.from_list(rows).to_csv(str(tmp / "train.csv"), index=False)
        return str(tmp / "train.csv"), None
    if kind == "glob":
        write_jsonl(tmp / "part-0.jsonl", rows[:120])
        write_jsonl(tmp / "part-1.jsonl", rows[120:])
        return str(tmp / "part-*.jsonl"), None
    if kind == "directory":
        write_jsonl(tmp / "d" / "a.jsonl", rows[:120])
        write_jsonl(tmp / "d" / "b.jsonl", rows[120:])
        return str(tmp / "d"), None
    if kind == "save_to_disk":
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp / "saved"))
        return str(tmp / "saved"), None
    if kind == "datasets.Dataset":
        return None, datasets.Dataset.from_list(rows)
    if kind == "ray.data.Dataset":
        return None, ray.data.from_items(rows, override_num_blocks=3)
    if kind == "list":
        return None, rows
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "csv", "glob", "directory", "save_to_disk",
                                  "datasets.Dataset", "ray.data.Dataset", "list"])
def test_every_source_gives_the_same_tokens(ray_local, tmp_path, tok, rows, kind):
    name, data = _source(kind, rows, tmp_path)
    prep = build_datasets(cfg(dataset_name=name, dataset_test_split=None), tok, data)
    assert prep.num_train_rows_estimate == len(rows)
    assert collect(prep.train) == expected(rows, tok)


def test_conversational_bundled_file(ray_local, tok):
    prep = build_datasets(cfg(dataset_name=str(bundled.CONVERSATIONAL_TRAIN_FILE), max_train_samples=100),
                          tok)
    got = prep.train.take_all()
    assert len(got) == 100 and prep.eval is not None  # test.jsonl beside it is the eval split
    ids = [int(x) for x in got[0]["chosen_input_ids"]]
    assert tok.convert_ids_to_tokens(ids[got[0]["chosen_prompt_len"] - 2:])[:2] == ["assistant", ":"]


def test_bundled_default_has_train_and_eval(ray_local, tok):
    prep = build_datasets(cfg(), tok)
    assert (prep.num_train_rows_estimate, prep.num_eval_rows_estimate) == (3000, 300)
    assert prep.eval.count() == 300


def test_save_to_disk_test_split_is_eval(ray_local, tmp_path, tok, rows):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:150]),
                          "test": datasets.Dataset.from_list(rows[150:])}).save_to_disk(str(tmp_path / "s"))
    prep = build_datasets(cfg(dataset_name=str(tmp_path / "s")), tok)
    assert prep.eval.count() == 50 and prep.train.count() == 150


def test_eval_fraction_is_deterministic_and_disjoint(ray_local, tmp_path, tok, rows):
    name = str(write_jsonl(tmp_path / "all.jsonl", rows))
    a = build_datasets(cfg(dataset_name=name, eval_fraction=0.2, data_seed=3), tok)
    b = build_datasets(cfg(dataset_name=name, eval_fraction=0.2, data_seed=3), tok)
    tr, ev = set(collect(a.train)), set(collect(a.eval))
    assert tr.isdisjoint(ev) and tr | ev == set(range(len(rows)))
    assert 20 <= len(ev) <= 60
    assert set(collect(b.eval)) == ev


def test_sft_mode_from_messages(ray_local, tmp_path, tok):
    msgs = [{"messages": [{"role": "user", "content": f"sort: {i} 1"},
                          {"role": "assistant", "content": f"1 {i}"}]} for i in range(2, 10)]
    prep = build_datasets(cfg(dataset_test_split=None), tok, msgs, mode="sft")
    got = prep.train.take_all()
    assert len(got) == 8 and "rejected_input_ids" not in got[0]


# ------------------------------------------------------------------------------------------- bad rows
def _file_with_bad_rows(tmp: Path, rows) -> Path:
    """40 good rows (past the driver's preflight), then one bad row of every kind, then good rows."""
    good = [json.dumps(r) for r in rows[:40]]
    bad = [
        json.dumps({"prompt": "sort: 2 1 =", "chosen": " 1 2"}),  # missing_column
        json.dumps({"prompt": "sort: 2 1 =", "chosen": 5, "rejected": " 2 1"}),  # wrong_type
        json.dumps({"prompt": "sort: 2 1 =", "chosen": "", "rejected": " 2 1"}),  # empty_completion
        json.dumps({"prompt": "sort: 2 1 =", "chosen": " 1 2", "rejected": " 1 2"}),  # identical
        json.dumps({"prompt": [{"role": "robot", "content": "x"}],
                    "chosen": [{"role": "assistant", "content": "1"}],
                    "rejected": [{"role": "assistant", "content": "2"}]}),  # invalid_message
        '{"prompt": "sort: 2 1 =", "chosen": " 1 2", "rejected": "\xff"}',  # undecodable (latin-1 byte)
        '{"prompt": "sort: 2 1 =", "chosen": " 1 2"',  # malformed_json
        json.dumps({"prompt": "sort: " + "1 " * 80 + "=", "chosen": " 1", "rejected": " 2"}),  # prompt fills
    ]
    good_after = [json.dumps(r) for r in rows[40:60]]
    path = tmp / "bad.jsonl"
    path.write_bytes(("\n".join(good + bad + good_after) + "\n").encode("latin-1", "surrogateescape"))
    return path


def test_bad_rows_skipped_are_counted_by_kind(ray_local, tmp_path, tok, rows):
    path = _file_with_bad_rows(tmp_path, rows)
    prep = build_datasets(cfg(dataset_name=str(path), on_bad_row="skip"), tok)
    assert prep.train.count() == 60
    rep = prep.stats.report()
    assert rep["train"]["rows_seen"] == 68 and rep["train"]["rows_kept"] == 60
    assert rep["train"]["dropped"] == {k: 1 for k in ["missing_column", "wrong_type", "empty_completion",
                                                      "identical_chosen_rejected", "invalid_message",
                                                      "undecodable_text", "malformed_json",
                                                      "prompt_fills_max_length"]}
    assert rep["rows_dropped"] == 8 and "bad.jsonl line 41" in rep["train"]["examples"][0]
    prep.train.count()  # a second pass (another epoch) does not count twice
    assert prep.stats.report()["rows_dropped"] == 8


def test_bad_row_raised_inside_a_ray_task_reaches_the_caller(ray_local, tmp_path, tok, rows):
    path = _file_with_bad_rows(tmp_path, rows)
    prep = build_datasets(cfg(dataset_name=str(path)), tok)
    with pytest.raises(BadRowError) as e:
        list(iter_train_batches(prep.train, cfg(), tok.pad_token_id, batch_size=8, epoch=0, seed=0))
    assert "bad.jsonl line 41" in str(e.value) and "missing column 'rejected'" in str(e.value)
    assert "on_bad_row: skip" in str(e.value)


def test_preflight_raises_before_training_starts(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "a"}] * 3)
    with pytest.raises(BadRowError, match=r"train.jsonl line 1 .*missing column 'chosen'"):
        build_datasets(cfg(dataset_name=str(path)), tok)


# ------------------------------------------------------------------------------------------- batching
def _skewed_rows(n: int = 256) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        k = 2 if i % 2 else 30  # half short, half long
        items = " ".join(str(x) for x in rng.integers(0, 10, size=k))
        out.append({"prompt": f"sort: {items} =", "chosen": " 1", "rejected": " 2"})
    return out


def test_bucketing_lowers_the_padding_fraction(ray_local, tok):
    prep = build_datasets(cfg(dataset_test_split=None), tok, _skewed_rows())
    plain = iter_train_batches(prep.train, cfg(length_bucketing=False), tok.pad_token_id, batch_size=8,
                               epoch=0, seed=0)
    n_plain = sum(1 for _ in plain)
    c = cfg(length_bucketing=True, bucket_size_multiplier=8)
    bucketed = iter_train_batches(prep.train, c, tok.pad_token_id, batch_size=8, epoch=0, seed=0)
    n_bucketed = sum(1 for _ in bucketed)
    assert n_plain == n_bucketed == 32
    assert bucketed.padding_fraction < 0.5 * plain.padding_fraction, (bucketed.padding_fraction,
                                                                      plain.padding_fraction)
    # auto: these skewed rows are bucketed
    auto = iter_train_batches(prep.train, cfg(length_bucketing="auto", bucket_size_multiplier=8),
                              tok.pad_token_id, batch_size=8, epoch=0, seed=0)
    assert sum(1 for _ in auto) == 32 and auto.pools_bucketed == auto.pools > 0
    assert auto.padding_fraction == bucketed.padding_fraction


def _order(ds, seed: int, epoch: int, **kw) -> list[int]:
    c = cfg(**kw)
    return [i for b in iter_train_batches(ds, c, 0, batch_size=8, epoch=epoch, seed=seed)
            for i in b["row_id"].tolist()]


def test_same_seed_same_order(ray_local, tok, rows):
    prep = build_datasets(cfg(dataset_test_split=None), tok, rows)
    a, b = _order(prep.train, 1, 0), _order(prep.train, 1, 0)
    assert a == b and len(a) == 200 and sorted(a) == list(range(200))
    assert _order(prep.train, 1, 1) != a  # a new epoch reshuffles
    assert _order(prep.train, 1, 0, length_bucketing=True) == _order(prep.train, 1, 0, length_bucketing=True)


def test_streaming_split_gives_every_worker_the_same_number_of_batches(ray_local, tok, rows):
    prep = build_datasets(cfg(dataset_test_split=None), tok, rows[:197])  # 197 rows: uneven on purpose
    shards = prep.train.streaming_split(2, equal=True)
    counts, ids = [0, 0], [[], []]

    def consume(i: int) -> None:
        for b in iter_train_batches(shards[i], cfg(), tok.pad_token_id, batch_size=8, epoch=0, seed=0):
            counts[i] += 1
            ids[i] += b["row_id"].tolist()

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert counts[0] == counts[1] == 197 // 2 // 8
    assert not set(ids[0]) & set(ids[1])
