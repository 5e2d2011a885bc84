"""Iterative on-policy DPO (dpo_ray/iterate): the pieces in-process, then the rollout and scorer pools and
whole rounds on a local Ray with the tiny model (a random one: the scorer counts the words of a response, in
which its samples differ)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dpo_ray import DPOConfig
from dpo_ray.data import load_tokenizer
from dpo_ray.iterate import HFGenerateEngine, NoPairsError, Prompt, SamplingParams, ScorerError, load_scorer
from dpo_ray.iterate.loop import PromptEncoder, _round_prompts, group_rows
from dpo_ray.iterate.scoring import check_scores
from dpo_ray.models import load_causal_lm

PROMPTS = ["sort: 7 3 9 =", "reverse: 1 2 3 4 =", "sort: 5 5 1 =", "reverse: 9 0 =", "sort: 8 2 6 4 =",
           "reverse: 7 7 1 ="]


def tiny(tmp_path: Path, seed: int = 0) -> Path:
    """The bundled tiny Llama with random weights (seeded), saved with its tokenizer."""
    cfg = DPOConfig(output_dir=str(tmp_path / "unused"), seed=seed)
    tok = load_tokenizer(cfg)
    torch.manual_seed(seed)
    out = tmp_path / f"tiny{seed}"
    load_causal_lm(None, cfg, tok).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def engine(path: Path) -> HFGenerateEngine:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return HFGenerateEngine(AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path))


# ------------------------------------------------------------------------------------------ in-process pieces

def test_group_rows_keep_distinct_responses_and_only_groups_that_pair():
    rows, pairs = group_rows(["a", "b", "c", "d"],
                             [["x", "x", "y", "z"], ["u", "u", "u", "u"], ["p", "q", "r", "s"],
                              ["", " ", "e", "e"]],
                             [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0, 0, 1, 1]],
                             "all", 0.0, 0)
    assert rows == [{"prompt": "a", "completions": ["x", "y", "z"], "scores": [1.0, 0.0, 0.0]}]
    assert pairs == 2  # x > y, x > z; y and z tie
    conv, _ = group_rows([[{"role": "user", "content": "q"}]], [["A ", "B"]], [[1.0, 0.0]], "all", 0.0, 0)
    assert (conv[0]["completions"] == [[{"role": "assistant", "content": "A"}],
                                       [{"role": "assistant", "content": "B"}]])


def test_scores_that_rank_nothing_are_errors_naming_the_response():
    assert check_scores("s", ["p", "p"], ["a", "b"], [1, 0.5]) == [1.0, 0.5]
    for bad in ([float("nan"), 1.0], ["1", 1.0], [True, 1.0], [None, 1.0], [math.inf, 0.0]):
        with pytest.raises(ScorerError,
                           match=r"iterate.scorer='s' returned .* for the response 'a' to the prompt 'p'"):
            check_scores("s", ["p", "p"], ["a", "b"], bad)
    with pytest.raises(ScorerError, match=r"returned 1 value\(s\) for 2 response"):
        check_scores("s", ["p", "p"], ["a", "b"], [1.0])


def test_scorer_specs():
    rule = load_scorer("rule")
    assert rule(["sort: 3 1 2 =", "sort: 3 1 2 ="], [" 1 2 3", " 3 2 1"]) == [1.0, 0.0]
    assert load_scorer("math:hypot")([3, 6], [4, 8]) == [5.0, 10.0]  # module:function, once per response
    with pytest.raises(ScorerError,
                       match=r"cannot import 'nope' from 'math'.*importable where the scorer actors run"):
        load_scorer("math:nope")
    with pytest.raises(ScorerError, match=r"is a str, not a function"):
        load_scorer("os:sep")
    with pytest.raises(ScorerError, match=r"none of: rule, module:function, a reward model directory"):
        load_scorer("best")
    with pytest.raises(ScorerError,
                       match=r"raised TypeError: .* on the response 'x' to the prompt 'sort: 1 ='"):
        load_scorer("math:log")(["sort: 1 ="], ["x"])


def test_a_reward_model_directory_scores_prompt_and_response(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = load_tokenizer(DPOConfig(output_dir=str(tmp_path)))
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=1, num_attention_heads=2, num_labels=1,
                                                    pad_token_id=tok.pad_token_id))
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    scores = load_scorer(str(tmp_path / "rm"))(["sort: 3 1 2 =", "sort: 3 1 2 ="], [" 1 2 3", " 3 2 1"])
    with torch.no_grad():
        want = rm(**tok(["sort: 3 1 2 = 1 2 3"], return_tensors="pt")).logits[0, 0].item()
    assert scores[0] == pytest.approx(want, abs=1e-5) and scores[0] != scores[1]


def test_samples_depend_on_the_prompt_and_its_seed_only_and_weights_can_be_replaced(tmp_path):
    a, b = tiny(tmp_path, 0), tiny(tmp_path, 1)
    eng = engine(a)
    enc = PromptEncoder(eng.tokenizer)
    prompts = [Prompt(enc(p), 100 + i) for i, p in enumerate(PROMPTS)]
    params = SamplingParams(n=4, temperature=1.0, top_p=0.95, max_new_tokens=6)
    every = eng.generate(prompts, params)
    assert [len(r) for r in every] == [4] * len(PROMPTS) and len({x for r in every for x in r}) > len(PROMPTS)
    assert eng.generate(prompts[3:], params) == every[3:]  # another batch, the same responses
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=6)
    with pytest.raises(ValueError, match="greedy"):
        eng.generate(prompts, SamplingParams(n=2, temperature=0.0))
    from safetensors.torch import load_file

    eng.load_weights(load_file(str(b / "model.safetensors")))
    assert eng.generate(prompts, greedy) == engine(b).generate(prompts, greedy)
    with pytest.raises(ValueError, match="do not fit the rollout model"):
        eng.load_weights({"model.embed_tokens.weight": torch.zeros(3, 3)})


def test_round_prompts_walk_a_seeded_shuffle():
    cfg = DPOConfig(output_dir="/tmp/x", iterate={"prompts_per_round": 4})
    prompts = list(range(10))
    windows = [_round_prompts(prompts, cfg, r) for r in (1, 2, 3)]
    assert all(len(w) == 4 for w in windows) and not set(windows[0]) & set(windows[1])
    assert set(windows[0]) | set(windows[1]) | set(windows[2]) == set(range(10))  # every prompt comes round
    assert _round_prompts(prompts, DPOConfig(output_dir="/tmp/x"), 2) == prompts


def test_iterate_refuses_a_folder_it_did_not_make(tmp_path):
    from dpo_ray.config import ConfigError
    from dpo_ray.iterate import run_iterate

    (tmp_path / "theirs.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"holds theirs.txt but no .dpo_ray_owned marker of an iterate job"):
        run_iterate(DPOConfig(output_dir=str(tmp_path), overwrite_output_dir=True))
    assert (tmp_path / "theirs.txt").read_text() == "keep me"


def test_the_iterate_command_reads_its_short_flags(tmp_path):
    from dpo_ray.cli import _parser, iterate_config

    base = tmp_path / "base.yaml"
    base.write_text("max_steps: 5\niterate:\n  temperature: 0.7\n  rounds: 9\n")
    ns = _parser().parse_args(["iterate", "--config", str(base), "--rounds", "2", "--samples", "6",
                               "--scorer", "checks:score", "--iterate.samples", "8", "--output_dir",
                               str(tmp_path / "o")])
    cfg = iterate_config(ns)
    assert (cfg.iterate.rounds, cfg.iterate.samples, cfg.iterate.scorer) == (2, 8, "checks:score")
    assert cfg.iterate.temperature == 0.7 and cfg.max_steps == 5


# ------------------------------------------------------------------------------------------ on Ray

def test_a_lost_rollout_actor_is_replaced_and_its_prompts_sampled_again(ray_local, tmp_path):
    from hooks import dying_rollout_host

    from dpo_ray.iterate.pools import RolloutPool

    model = tiny(tmp_path)
    enc = PromptEncoder(load_tokenizer(str(model)))
    prompts = [Prompt(enc(p), 7 + i) for i, p in enumerate(PROMPTS)]
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=5)
    calm = RolloutPool(str(model), 2, 0.5, 0, max_restarts=1)
    want = calm.sample(prompts, params)
    calm.shutdown()
    pool = RolloutPool(str(model), 2, 0.5, 0, max_restarts=1,
                       host_class=dying_rollout_host(tmp_path / "died"))
    try:
        assert pool.sample(prompts, params) == want and pool.restarts == 1
        assert (tmp_path / "died").exists()
    finally:
        pool.shutdown()
    assert want == engine(model).generate(prompts, params)  # the pool's answers are the engine's


def test_scorer_failures_stop_the_round_before_training(ray_local, tmp_path):
    from hooks import constant_scorer, nan_scorer, raising_scorer

    from dpo_ray.iterate import run_iterate

    base = dict(model_name_or_path=str(tiny(tmp_path)), ray={"num_workers": 1}, report_to=[],
                iterate={"rounds": 1, "samples": 4, "prompts_per_round": 6, "max_new_tokens": 6,
                         "eval_limit": 0})
    cases = [(nan_scorer, ScorerError,
              r"returned nan for the response .* every score must be a finite number"),
             (raising_scorer, ScorerError, r"raised KeyError: 'no verifier for this prompt' on the response"),
             (constant_scorer, NoPairsError,
              r"round 1: the scorer gave every response of each of the 6 prompt\(s\) "
                                             r"the same score \(mean 0.5\), so there is no pair to train on")]
    for i, (fn, error, message) in enumerate(cases):
        out = tmp_path / f"job{i}"
        with pytest.raises(error, match=message):
            run_iterate(DPOConfig(output_dir=str(out), **base), scorer=fn)
        assert not (out / "round-1" / "groups.jsonl").exists() and not (out / "round-1" / "model").exists()


def test_rounds_train_sync_and_resume_without_sampling_twice(ray_local, tmp_path):
    """Two rounds on the tiny model: each round's groups are the samples and their scores, the policy moves,
    the rollout actors answer with the weights of the round just trained; a second call with rounds 3 runs
    round 3 only; a job that stopped after writing a round's groups trains on them without sampling again."""
    from hooks import word_count
    from safetensors.torch import load_file

    from dpo_ray.iterate import run_iterate

    out = tmp_path / "job"
    cfg = DPOConfig(output_dir=str(out), model_name_or_path=str(tiny(tmp_path)), ray={"num_workers": 1},
                    report_to=[], save_strategy="no", learning_rate=5e-3, beta=0.5, max_steps=2,
                    per_device_train_batch_size=4, logging_steps=1, seed=3,
                    iterate={"rounds": 2, "samples": 4, "prompts_per_round": 12, "max_new_tokens": 6,
                             "eval_limit": 8, "rollout_actors": 2})
    summary = run_iterate(cfg, scorer=word_count)
    rounds = summary["rounds"]
    assert ([r["round"] for r in rounds] == [0, 1, 2]
            and summary["model_dir"] == str(out / "round-2" / "model"))
    for r in rounds[1:]:
        rows = [json.loads(x)
                for x in (out / f"round-{r['round']}" / "groups.jsonl").read_text().splitlines()]
        assert len(rows) == r["groups"] > 0 and r["pairs"] >= r["groups"] and r["prompts"] == 12
        assert all(s == word_count(row["prompt"], c) for row in rows
                   for c, s in zip(row["completions"], row["scores"]))
        assert set(r["seconds"]) == {"sample", "score", "train", "sync", "eval", "round"}
        assert 0 <= r["mean_score"] <= r["best_of_k"]
    w1, w2 = (load_file(str(out / f"round-{r}" / "model" / "model.safetensors")) for r in (1, 2))
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)  # round 2 trained on from round 1
    # the held-out metric of round 2 came from the rollout actors after the sync: the round-2 model's answers
    from dpo_ray.data.bundled import eval_prompts

    eng = engine(out / "round-2" / "model")
    enc = PromptEncoder(eng.tokenizer)
    answers = eng.generate([Prompt(enc(p), cfg.seed) for p in eval_prompts()[:8]],
                           SamplingParams(1, 0.0, 1.0, 6))
    assert rounds[2]["heldout"] == pytest.approx(sum(word_count(None, a[0]) for a in answers) / 8)
    assert ((out / "iterate.png").exists()
            and json.loads((out / "iterate.json").read_text())["rounds"] == rounds)

    stamps = {r: (out / f"round-{r}" / "groups.jsonl").stat().st_mtime_ns for r in (1, 2)}
    more = cfg.model_copy(update={"iterate": cfg.iterate.model_copy(update={"rounds": 3})})
    summary = run_iterate(more, scorer=word_count)
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2, 3] and summary["rounds"][:3] == rounds
    assert {r: (out / f"round-{r}" / "groups.jsonl").stat().st_mtime_ns for r in (1, 2)} == stamps

    # a job that stopped in round 3's training: its groups stay, the next call trains on them
    state = json.loads((out / "iterate.json").read_text())
    state["rounds"] = state["rounds"][:3]
    (out / "iterate.json").write_text(json.dumps(state))
    groups = (out / "round-3" / "groups.jsonl").stat().st_mtime_ns
    summary = run_iterate(more, scorer=word_count)
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2, 3]
    assert (out / "round-3" / "groups.jsonl").stat().st_mtime_ns == groups
    assert "sample" in summary["rounds"][3]["seconds"]  # the sampling time of the job that sampled it


def test_overlap_samples_the_next_round_while_this_one_trains(ray_local, tmp_path):
    """iterate.overlap on a user's prompt file of chat messages: round 2's samples are drawn during round 1's
    training, from the weights round 1 started from (one round off-policy), and round 2 trains on them without
    sampling again; the prompts go through the chat template, the answers are stored as assistant messages."""
    from hooks import word_count

    from dpo_ray.data.bundled import CONVERSATIONAL_TRAIN_FILE
    from dpo_ray.iterate import run_iterate

    model = tiny(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    rows = [json.loads(x) for x in CONVERSATIONAL_TRAIN_FILE.read_text().splitlines()[:24]]
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    out = tmp_path / "job"
    cfg = DPOConfig(output_dir=str(out), model_name_or_path=str(model), ray={"num_workers": 1}, report_to=[],
                    save_strategy="no", max_steps=1, per_device_train_batch_size=4, seed=5,
                    iterate={"rounds": 2, "samples": 4, "prompts_per_round": 12, "max_new_tokens": 6,
                             "eval_limit": 0, "overlap": True, "prompts": str(prompts)})
    rounds = run_iterate(cfg, scorer=word_count)["rounds"]
    group = json.loads((out / "round-1" / "groups.jsonl").read_text().splitlines()[0])
    assert group["prompt"][0]["role"] == "user" and group["completions"][0][0]["role"] == "assistant"
    # round 2: from round 1's start
    assert [r["sampled_from"] for r in rounds[1:]] == [str(model), str(model)]
    meta = json.loads((out / "round-2" / "samples.json").read_text())
    assert meta["sampled_from"] == str(model) and rounds[2]["groups"] == meta["groups"] > 0
    assert rounds[1]["seconds"]["round"] >= rounds[1]["seconds"]["train"]


def test_a_job_does_not_go_on_after_rounds_made_with_other_settings(tmp_path):
    """iterate.json keeps what the rounds were made with; a job that would train on a mix stops before Ray,
    naming each change (rounds and the held-out set may change)."""
    from dpo_ray.config import ConfigError
    from dpo_ray.iterate import run_iterate
    from dpo_ray.iterate.loop import job_settings
    from dpo_ray.owned import mark_owned

    out = tmp_path / "job"
    before = DPOConfig(output_dir=str(out), iterate={"samples": 4, "temperature": 0.7})
    mark_owned(out, "iterate")
    (out / "iterate.json").write_text(json.dumps({"rounds": [], "settings": job_settings(before)}))
    later = before.model_copy(update={"beta": 0.3, "iterate": before.iterate.model_copy(
        update={"temperature": 1.0, "rounds": 5, "eval_limit": 10})})
    with pytest.raises(ConfigError,
                       match=r"other settings \(beta: 0.1 -> 0.3; iterate.temperature: 0.7 -> 1.0\)"):
        run_iterate(later)
