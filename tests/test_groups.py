"""Prompt groups (one prompt, K responses with scores or a ranking): rows, pairs, the one-forward-per-group
layout, and the loss. Pure torch and the real tokenizer / tiny Llama, no Ray (tests/test_groups_ray.py
trains).

The reference for every number is the per-pair standard layout: the same group rows expanded into pair rows
(``expand_to_pairs``), tokenized and collated as pairs, [chosen; rejected] rows, no sharing.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import bundled_tiny as tiny

from dpo_ray import prefix
from dpo_ray.config import DPOConfig
from dpo_ray.data import collate_pairs, load_processing_class, tokenize_rows
from dpo_ray.data.bundled import make_groups
from dpo_ray.data.collate import collate_groups
from dpo_ray.data.groups import expand_to_pairs, group_pairs, normalize_group
from dpo_ray.data.rows import BadRow
from dpo_ray.errors import BadRowError
from dpo_ray.forward import pair_layout, reference_logps, sequence_forward
from dpo_ray.reference.base import NoReference, PrecomputedReference
from dpo_ray.sharing import PrefixSharing
from dpo_ray.train.steps import dpo_step

CFG = DPOConfig()
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def tok():
    return load_processing_class(None)


def groups(n: int = 6, k: int = 4, seed: int = 0) -> list[dict]:
    return list(make_groups(n, seed, k))


def both_layouts(tok, rows, cfg=CFG):
    """(group batch, the expanded pairs' batch) for the same rows and pair rule."""
    cols = tokenize_rows(rows, tok, cfg)
    assert "group_input_ids" in cols  # detected from the first row
    pairs = expand_to_pairs(rows, cfg.group_pairs, cfg.group_margin, cfg.data_order_seed)
    return collate_groups(cols, tok.pad_token_id), collate_pairs(
        tokenize_rows(pairs, tok, cfg), tok.pad_token_id)


# ------------------------------------------------------------------------------------ rows and pairs

def test_pair_rules_ties_and_margin():
    s = [0.5, 1.0, 0.0, 0.5]
    assert group_pairs(s, "all") == [(0, 2), (1, 0), (1, 2), (1, 3), (3, 2)]  # the tied 0 and 3 never pair
    assert group_pairs(s, "all", margin=0.5) == [(1, 2)]  # the gap must exceed the margin
    assert group_pairs(s, "best_vs_rest") == [(1, 0), (1, 2), (1, 3)]
    assert group_pairs(s, "best_vs_worst") == [(1, 2)]
    # ties: the first listed is the best / worst
    assert group_pairs([2, 2, 1, 1], "best_vs_worst") == [(0, 2)]
    assert group_pairs([2, 2, 1], "best_vs_rest") == [(0, 2)]
    assert group_pairs([1, 1, 1], "all") == []
    draws = {group_pairs([3, 2, 1, 0], "best_vs_random", seed=0, row_id=r)[0] for r in range(40)}
    assert draws == {(0, 1), (0, 2), (0, 3)}  # uniform over the beaten ones, by row
    assert group_pairs([3, 2, 1, 0], "best_vs_random", seed=5, row_id=9) == \
        group_pairs([3, 2, 1, 0], "best_vs_random", seed=5, row_id=9)  # seeded: the same every time


def test_ranking_is_scores_reversed():
    g = normalize_group({"prompt": "p", "completions": ["a", "b", "c"], "ranking": [2, 1, 3]})
    assert group_pairs(g.scores, "all") == [(0, 2), (1, 0), (1, 2)]


@pytest.mark.parametrize("row, kind, words", [
    ({"prompt": "p", "completions": ["a"], "scores": [1]}, "wrong_type", "at least 2"),
    ({"prompt": "p", "completions": ["a", "b"], "scores": [1]}, "wrong_type", "one value per response"),
    ({"prompt": "p", "completions": ["a", "b"], "scores": [1, float("nan")]}, "wrong_type", "scores[1]"),
    ({"prompt": "p", "completions": ["a", "b"], "scores": [1, "x"]}, "wrong_type", "scores[1]"),
    ({"prompt": "p", "completions": ["a", "b"]}, "missing_column", "neither"),
    ({"prompt": "p", "completions": ["a", "b"], "scores": [1, 0], "ranking": [1, 2]}, "wrong_type", "both"),
    ({"completions": ["a", "b"], "scores": [1, 0]}, "missing_column", "'prompt'"),
    ({"prompt": "p", "completions": ["a", " "], "scores": [1, 0]}, "empty_completion", "completions[1]"),
    ({"prompt": "p", "completions": "ab", "scores": [1, 0]}, "wrong_type", "list of responses"),
    ({"prompt": "p", "completions": ["a", "b"], "scores": [1, 0], "chosen": "a"}, "misnamed_column",
     "one format"),
])
def test_bad_group_rows_name_the_problem(row, kind, words):
    with pytest.raises(BadRow) as e:
        normalize_group(row)
    assert e.value.kind == kind and words in e.value.problem


def test_bad_rows_in_the_pipeline(tok):
    tied = {"prompt": "sort: 1 2 =", "completions": [" 1 2", " 2 1"], "scores": [1, 1]}
    dup = {"prompt": "sort: 1 2 =", "completions": [" 1 2", " 1 2"], "scores": [1, 0]}
    good = groups(2)
    with pytest.raises(BadRowError, match=r"no_pairs.*row 1"):
        tokenize_rows([good[0], tied], tok, CFG)
    cols = tokenize_rows([good[0], tied, dup, good[1]], tok, DPOConfig(on_bad_row="skip"))
    assert list(cols["row_id"]) == [0, 3]
    # a pair row among groups, and a group among pairs, are bad rows that say so
    with pytest.raises(BadRowError, match="missing column 'completions'"):
        tokenize_rows([good[0], {"prompt": "a", "chosen": "b", "rejected": "c"}], tok, CFG)
    with pytest.raises(BadRowError, match="prompt group"):
        tokenize_rows([{"prompt": "a", "chosen": "b", "rejected": "c"}, good[0]], tok, CFG)


def test_tokenized_group_columns(tok):
    rows = groups(3)
    cols = tokenize_rows(rows, tok, CFG)
    pairs = tokenize_rows(expand_to_pairs(rows), tok, CFG)
    # each response tokenized exactly as the pair formats tokenize it
    seqs = []
    for flat, lens in zip(cols["group_input_ids"], cols["group_lens"]):
        seqs += np.split(np.asarray(flat), np.cumsum(lens)[:-1])
    want = {tuple(x) for x in pairs["chosen_input_ids"]} | {tuple(x) for x in pairs["rejected_input_ids"]}
    assert {tuple(s) for s in seqs} >= want
    assert sum(len(c) for c in cols["pair_chosen"]) == len(pairs["row_id"])


def test_conversational_groups_match_conversational_pairs(tok):
    rows = [{"prompt": [{"role": "user", "content": "sort 3 1 2"}],
             "completions": [[{"role": "assistant", "content": c}] for c in ("1 2 3", "3 2 1", "1 3 2")],
             "ranking": [1, 3, 2]}]
    g, p = both_layouts(tok, rows)
    model = tiny(tok).eval()
    torch.testing.assert_close(pair_layout(sequence_forward(model, g, share_prefix=True).stats, g).logps,
                               sequence_forward(model, p).stats.logps, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ the packed forward

def test_collated_group_batch(tok):
    rows = groups(3, k=3)
    g = collate_groups(tokenize_rows(rows, tok, CFG), tok.pad_token_id)
    assert g["input_ids"].shape[0] == 9 and g["group_index"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert g["row_id"].tolist() == [0, 1, 2]
    for c, r in zip(g["pair_chosen"].tolist(), g["pair_rejected"].tolist()):
        assert c // 3 == r // 3  # a pair never crosses groups


@pytest.mark.parametrize("impl, lean, ks",
                         [("sdpa", True, (2, 4, 8)), ("sdpa", False, (4,)), ("eager", True, (4,))])
def test_group_logps_equal_the_per_pair_standard_layout(tok, impl, lean, ks):
    """One packed row per group, each response scored once and gathered for its pairs, equals the pair
    batch of the expanded pairs run the standard way (every statistic the losses and metrics read)."""
    model = tiny(tok, impl).eval()
    for k in ks:
        g, p = both_layouts(tok, groups(4, k=k, seed=k))
        packed = pair_layout(sequence_forward(model, g, share_prefix=True, want_wpo=True, lean=lean).stats, g)
        plain = sequence_forward(model, p, want_wpo=True, lean=lean).stats
        for name in ("logps", "num_tokens", "nll_mean", "entropy", "mean_logit", "num_correct", "wpo_logw"):
            torch.testing.assert_close(getattr(packed, name), getattr(plain, name), atol=2e-5, rtol=1e-5,
                                       msg=name)


def test_pack_groups_layout(tok):
    rows = [{"prompt": "sort: 3 1 2 =", "completions": [" 1 2 3", " 3 2 1 1", " 1"], "scores": [1, 0, 0.5]}]
    g = collate_groups(tokenize_rows(rows, tok, CFG), tok.pad_token_id)
    packed = prefix.pack_groups(g["input_ids"], g["attention_mask"], g["completion_mask"], g["group_index"])
    lens = g["attention_mask"].sum(-1)
    plen = int(g["completion_mask"][0].argmax())  # the shared prompt
    assert packed.tokens == int(lens.sum()) - 2 * plen  # the prompt once instead of three times
    # response 2's tokens restart their positions after the prompt and see only the prompt and themselves
    start = plen + int(lens[0] - plen) + int(lens[1] - plen)
    assert packed.position_ids[0, start].item() == plen
    assert packed.keep[0, 0, start, :plen].all() and not packed.keep[0, 0, start, plen:start].any()
    assert packed.score_index.numel() == int(g["completion_mask"][:, 1:].sum())


def test_group_gradients_equal_the_per_pair_standard_layout(tok):
    """d(Σ pair log-probs)/dθ: a response in several pairs gets the sum of its pairs' gradients."""
    g, p = both_layouts(tok, groups(3))
    model = tiny(tok)
    grads = []
    for batch, share in ((g, True), (g, False), (p, False)):
        model.zero_grad()
        stats = pair_layout(sequence_forward(model, batch, share_prefix=share).stats, batch)
        (stats.logps.sum() - 0.5 * stats.logps[: stats.logps.shape[0] // 2].sum()).backward()
        grads.append([q.grad.clone() for q in model.parameters()])
    for a, b, c in zip(*grads):
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(b, c, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("overrides", [
    {}, {"rpo_alpha": 1.0}, {"loss_type": ["ipo"]},
    {"loss_type": ["sigmoid", "bco_pair"], "loss_weights": [1, 0.5]},
    {"use_weighting": True}, {"loss_type": ["aot"]}, {"group_pairs": "best_vs_rest"},
    {"group_pairs": "best_vs_random"}, {"group_pairs": "best_vs_worst", "group_margin": 0.2},
])
def test_loss_metrics_and_gradients_equal_the_expanded_pairs(tok, overrides):
    cfg = DPOConfig(**overrides)
    g, p = both_layouts(tok, groups(3), cfg)
    model, ref = tiny(tok), tiny(tok).eval().requires_grad_(False)
    with torch.no_grad():  # a reference that differs from the policy
        for q in ref.parameters():
            q.add_(0.01 * torch.randn_like(q))
    outs = []
    for batch in (g, p):
        model.zero_grad()
        ref_c, ref_r = reference_logps(ref, batch, sharing=PrefixSharing("on"))
        loss, metrics = dpo_step(model, cfg, batch, ref_c, ref_r, share_prefix=True)
        loss.backward()
        outs.append((loss.detach(), metrics, [q.grad.clone() for q in model.parameters()]))
    (lg, mg, gg), (lp, mp, gp) = outs
    torch.testing.assert_close(lg, lp, atol=1e-5, rtol=1e-5)
    for k in mp:
        if k != "num_tokens":  # input tokens: the group batch has fewer (the point of it)
            torch.testing.assert_close(mg[k], mp[k], atol=1e-5, rtol=1e-5, msg=k)
    assert mg["num_pairs"] == mp["num_pairs"] == len(p["row_id"])
    for a, b in zip(gg, gp):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_reference_sources_gather_per_response_logps(tok):
    g, p = both_layouts(tok, groups(4))
    ref = tiny(tok).eval()
    rg, rp = reference_logps(ref, g, sharing=PrefixSharing("auto")), reference_logps(ref, p)
    for a, b in zip(rg, rp):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    n = len(p["row_id"])
    assert [x.shape for x in NoReference().result(None, g)] == [(n,), (n,)]
    # precomputed: one column per response; the pairs are gathered from it
    g["ref_logps"] = sequence_forward(ref, g).stats.logps.detach()
    for a, b in zip(PrecomputedReference().result(None, g), rp):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_ld_alpha_is_refused_for_groups(tok):
    g, _ = both_layouts(tok, groups(2))
    with pytest.raises(ValueError, match="ld_alpha"):
        sequence_forward(tiny(tok), g, ld_alpha=0.5)


def test_tokens_computed_fall_with_k(tok):
    """The packed rows hold each prompt once: with K responses, about K prompts fewer per group than the
    expanded pairs' 2 sequences per pair (all pairs: K(K-1)/2 pairs)."""
    ratios = []
    for k in (2, 4, 8):
        g, p = both_layouts(tok, groups(8, k=k, seed=1))
        packed = prefix.pack_groups(g["input_ids"], g["attention_mask"], g["completion_mask"],
                                    g["group_index"])
        ratios.append(int(p["attention_mask"].sum()) / packed.tokens)
    assert ratios[0] > 1 and ratios[1] > ratios[0] and ratios[2] > ratios[1]
    assert not any(math.isnan(r) for r in ratios)


def test_the_bundled_group_example_learns(tok):
    """examples/groups_demo.yaml's recipe, in-process: the tiny Llama from random weights, 12 steps of 8
    groups; eval pair accuracy (rewards/accuracies over the test groups' pairs) and eval loss move the right
    way."""
    import json

    from dpo_ray.config import load_config

    cfg = load_config(EXAMPLES / "groups_demo.yaml")
    assert cfg.group_pairs == "all" and cfg.dataset_name == "examples/groups/train.jsonl"
    cfg = DPOConfig(learning_rate=cfg.learning_rate, beta=cfg.beta, rpo_alpha=cfg.rpo_alpha,
                    max_length=cfg.max_length)
    read = [[json.loads(line) for _, line in zip(range(n), open(EXAMPLES / "groups" / f"{name}.jsonl"))]
            for name, n in (("train", 128), ("test", 32))]
    train, test = (tokenize_rows(rows, tok, cfg) for rows in read)
    ev = collate_groups(test, tok.pad_token_id)
    torch.manual_seed(0)
    model, ref = tiny(tok), tiny(tok).eval()
    ref_ev = reference_logps(ref, ev)

    def evaluate():
        with torch.no_grad():
            loss, m = dpo_step(model.eval(), cfg, ev, *ref_ev, share_prefix=True)
        model.train()
        return float(loss), float(m["rewards/accuracies"])

    loss0, acc0 = evaluate()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    for step in range(12):
        b = collate_groups({k: v[step * 8:(step + 1) * 8] for k, v in train.items()}, tok.pad_token_id)
        loss, _ = dpo_step(model, cfg, b, *reference_logps(ref, b), share_prefix=True)
        loss.backward()
        opt.step()
        opt.zero_grad()
    loss1, acc1 = evaluate()
    assert loss1 < loss0 and acc1 > acc0 + 0.3, (loss0, acc0, loss1, acc1)


def test_inspect_data_reads_groups(tok):
    """`dpo-ray inspect-data`'s analyzer: the example's groups are clean; a tied group is a no_pairs bad row;
    groups mixed with pairs in one file are the mixed_formats error."""
    import json

    from dpo_ray.data.analyze import Analyzer
    from dpo_ray.data.tokenize import RawRow
    from dpo_ray.preflight.report import bad_row_report, evaluate

    cfg = DPOConfig(max_length=64, per_device_train_batch_size=8)
    rows = [json.loads(line) for _, line in zip(range(100), open(EXAMPLES / "groups" / "train.jsonl"))]
    piece = Analyzer(tok, cfg).analyze([RawRow(i, i + 1, r) for i, r in enumerate(rows)], "train.jsonl")
    assert {k: v["count"] for k, v in evaluate(piece, cfg, keep=5).items() if v["count"]} == {}
    tied = {"prompt": "sort: 1 2 =", "completions": [" 1 2", " 2 1"], "scores": [1, 1]}
    pair = {"prompt": "sort: 1 2 =", "chosen": " 1 2", "rejected": " 2 1"}
    piece = Analyzer(tok, cfg).analyze([RawRow(i, i + 1, r) for i, r in enumerate(rows[:20] + [tied, pair])],
                                       "x.jsonl")
    assert bad_row_report(piece, "skip")["kinds"]["no_pairs"]["count"] == 1
    assert evaluate(piece, cfg, keep=5)["mixed_formats"]["count"] == 1


def test_local_reference_client_on_a_group_batch(tok):
    from dpo_ray.reference.base import LocalReference

    g, p = both_layouts(tok, groups(3))
    ref = tiny(tok).eval()
    client = LocalReference(ref, torch.device("cpu"), sharing=PrefixSharing("on", "reference"))
    for a, b in zip(client.result(client.submit(g), g), reference_logps(ref, p)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_left_truncated_groups_match_the_pairs(tok):
    """keep_end cuts each response's sequence from the left by its own amount: the group's rows may share no
    prefix at all, and the packed row still gives the pairs' statistics."""
    cfg = DPOConfig(max_length=12, truncation_mode="keep_end")
    g, p = both_layouts(tok, groups(4, k=4, seed=2), cfg)
    model = tiny(tok).eval()
    torch.testing.assert_close(pair_layout(sequence_forward(model, g, share_prefix=True).stats, g).logps,
                               sequence_forward(model, p).stats.logps, atol=1e-5, rtol=1e-5)


def test_pack_groups_edge_cases(tok):
    """Hand-made groups: a response whose prompt's last token differs (a BPE merge across the boundary), a
    response that starts with another's first completion tokens, a group with no prompt, groups of 2 and 5."""
    g = torch.Generator().manual_seed(5)

    def r(n):
        return torch.randint(4, len(tok), (n,), generator=g).tolist()

    p0, p1, same = r(5), r(4), r(2)
    groups_ = [[(p0 + r(3), 5), (p0[:4] + r(1) + r(4), 5), (p0 + same + r(2), 5), (p0 + same + r(1), 5)],
               [(r(4), 0), (r(6), 0)],
               [(p1 + r(k), 4) for k in (1, 2, 3, 4, 5)]]
    cols = {"group_input_ids": [], "group_lens": [], "group_prompt_len": [], "pair_chosen": [],
            "pair_rejected": []}
    for grp in groups_:
        cols["group_input_ids"].append([t for s, _ in grp for t in s])
        cols["group_lens"].append([len(s) for s, _ in grp])
        cols["group_prompt_len"].append([p for _, p in grp])
        cols["pair_chosen"].append([0] * (len(grp) - 1))
        cols["pair_rejected"].append(list(range(1, len(grp))))
    cols["row_id"] = [0, 1, 2]
    batch = collate_groups(cols, tok.pad_token_id)
    model = tiny(tok).eval()
    plain, packed = (sequence_forward(model, batch, share_prefix=s).stats for s in (False, True))
    for name in ("logps", "num_tokens", "entropy", "mean_logit"):
        torch.testing.assert_close(getattr(packed, name), getattr(plain, name), atol=1e-5, rtol=1e-5,
                                   msg=name)
    pk = prefix.pack_groups(batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                            batch["group_index"])
    lens = batch["attention_mask"].sum(-1)
    # shared: 4 (response 1's prompt differs in its last token), 0 (no prompt), 4 (the whole prompt)
    assert pk.tokens == int(lens.sum()) - 3 * 4 - 0 - 4 * 4


@pytest.mark.parametrize("rule", ["best_vs_worst", "best_vs_rest", "best_vs_random"])
def test_only_the_responses_the_pairs_use_are_computed(tok, rule):
    """best_vs_worst trains 1 pair of K responses: its rows carry (and the policy and reference compute) those
    2 responses only, fewer tokens than `all`; the loss and metrics equal the expanded pairs' all the same
    (the test above); every kept response is in a pair."""
    rows = groups(4)
    every = tokenize_rows(rows, tok, CFG)
    some = tokenize_rows(rows, tok, DPOConfig(group_pairs=rule))
    for lens, c, r in zip(some["group_lens"], some["pair_chosen"], some["pair_rejected"]):
        assert sorted(set(c) | set(r)) == list(range(len(lens)))
    tokens = [sum(int(n) for lens in cols["group_lens"] for n in lens) for cols in (every, some)]
    if rule != "best_vs_rest":
        assert tokens[1] < tokens[0], tokens
    g, p = both_layouts(tok, rows, DPOConfig(group_pairs=rule))
    assert int(g["attention_mask"].sum()) == tokens[1]
    assert len(g["pair_chosen"]) == len(p["row_id"])
