"""``dpo-ray iterate``: iterative on-policy DPO. Each round samples K responses per prompt from the current
policy (the rollout pool), scores them (the scorer pool), writes them as a prompt-group dataset, trains group
DPO on it (``DPOTrainer``, the round's reference per ``iterate.reference``) and hands the new weights to the
rollout actors. docs/iterative.md explains the loop and its settings.

Everything a round makes lives under ``<output_dir>/round-<r>/``: ``groups.jsonl`` (``prompt``,
``completions``, ``scores``: a dataset ``dpo-ray train`` reads on its own), ``model/`` (the policy after the
round) and ``round.json`` (its metrics). ``<output_dir>/iterate.json`` lists the finished rounds; a job
started again on the same output_dir goes on after the last finished round, and a round whose groups were
written but whose training did not finish trains on those groups again: nothing is sampled twice.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dpo_ray.config import DPOConfig
from dpo_ray.errors import DataError
from dpo_ray.iterate.engine import Prompt, SamplingParams

STATE_FILE = "iterate.json"


class NoPairsError(DataError):
    """A round whose scores form no pair: there is nothing to train on."""


@dataclass
class RoundRecord:
    round: int
    prompts: int
    responses: int
    mean_score: float | None  # None for round 0 (the starting model: nothing sampled)
    best_of_k: float | None  # the mean over prompts of the best of its K scores
    groups: int  # prompt groups with at least one pair (the round's training rows)
    pairs: int  # pairs those groups form under group_pairs / group_margin
    heldout: float | None  # the mean score of greedy answers to the held-out prompts, after the round
    seconds: dict[str, float] = field(default_factory=dict)  # sample, score, train, sync, eval
    model_dir: str = ""
    restarts: int = 0  # rollout actors replaced during the round
    nodes: dict[str, list[str]] = field(default_factory=dict)  # Ray node ids of the rollout and scorer actors
    # the model the round's samples came from (the previous round's, or with overlap the one before)
    sampled_from: str = ""


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def read_rows(name: str, split: str = "train") -> list[dict]:
    """The rows of a prompt file (or a dataset_name that resolves to files), as dicts."""
    from dpo_ray.data.sources import iter_chunk, plan_files, resolve

    resolved = resolve(name, split, None)
    if resolved.files is None:
        return [dict(r) for r in resolved.table]
    chunks, _ = plan_files(resolved.files)
    rows = []
    for c in chunks:
        for raw in iter_chunk(c):
            if isinstance(raw.value, Exception):
                raise DataError(f"{name}: row {raw.line}: {raw.value}")
            rows.append(raw.value)
    return rows


def prompts_of(rows: list[dict], label: str) -> list[Any]:
    """The ``prompt`` of each row (a string or a message list); a row without one is an error naming it."""
    out = []
    for i, row in enumerate(rows):
        p = row.get("prompt") if isinstance(row, dict) else None
        if not p or not isinstance(p, (str, list)):
            raise DataError(f"{label}: row {i + 1} has no 'prompt' (a string or a list of messages); iterate "
                            "samples the responses itself and needs only the prompts")
        out.append(p)
    return out


class PromptEncoder:
    """Prompt -> the token ids a training row would start with (the chat template's generation prompt for
    message lists; the tokenizer's special tokens for strings, as the training rows get them)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def __call__(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list):
            text = self.tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            return self.tok(text, add_special_tokens=False)["input_ids"]
        return self.tok(prompt)["input_ids"]


def completion_value(prompt: Any, text: str) -> Any:
    """A response as the dataset stores it: text for string prompts, an assistant message for message
    lists."""
    return [{"role": "assistant", "content": text.strip()}] if isinstance(prompt, list) else text


def group_rows(prompts: list[Any], responses: list[list[str]], scores: list[list[float]], rule: str,
               margin: float, seed: int) -> tuple[list[dict], int]:
    """The round's prompt-group rows and the pairs they form. A group keeps each distinct response once and no
    empty one (a response that is only EOS is no completion the data layer takes); a group left without a pair
    is left out."""
    from dpo_ray.data.groups import group_pairs

    rows, pairs = [], 0
    for p, rs, ss in zip(prompts, responses, scores):
        seen: dict[str, float] = {}
        for r, s in zip(rs, ss):
            if r.strip():
                seen.setdefault(r, s)
        if len(seen) < 2:
            continue
        comps, vals = list(seen), list(seen.values())
        n = len(group_pairs(vals, rule, margin, seed, len(rows)))
        if n:
            rows.append({"prompt": p, "completions": [completion_value(p, c) for c in comps], "scores": vals})
            pairs += n
    return rows, pairs


def _state(out: Path) -> dict:
    path = out / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {"rounds": []}


# What a round's data and training depend on: a job that goes on after earlier rounds must keep them (rounds,
# the held-out set, the pools' sizes and overlap may change).
_KEPT = ("model_name_or_path", "seed", "loss_type", "beta", "learning_rate", "max_steps", "num_train_epochs",
         "group_pairs", "group_margin", "rpo_alpha")
_KEPT_ITERATE = ("samples", "temperature", "top_p", "max_new_tokens", "scorer", "prompts",
                 "prompts_per_round", "reference")


def job_settings(cfg: DPOConfig, scorer_name: str | None = None) -> dict:
    """The settings earlier rounds were made with, as ``iterate.json`` keeps them."""
    out = {k: getattr(cfg, k) for k in _KEPT}
    out.update({f"iterate.{k}": getattr(cfg.iterate, k) for k in _KEPT_ITERATE})
    if scorer_name is not None:
        out["iterate.scorer"] = f"function {scorer_name}"
    return json.loads(json.dumps(out, default=str))


def settings_problem(before: dict, now: dict) -> str | None:
    """Why a job with ``now`` may not go on after rounds made with ``before`` (None: it may)."""
    changed = [f"{k}: {before[k]!r} -> {now.get(k)!r}" for k in before if before[k] != now.get(k)]
    if not changed:
        return None
    return (f"the finished rounds here were made with other settings ({'; '.join(changed)}), and the next "
            "rounds would train on a mix. Keep the settings to go on, or start over with "
            "overwrite_output_dir: true (or another output_dir)")


def _initial_model(cfg: DPOConfig, out: Path) -> str:
    """The model round 1 starts from: model_name_or_path, or the bundled tiny model (built once and saved)."""
    if cfg.model_name_or_path:
        return cfg.model_name_or_path
    init = out / "initial"
    if not (init / "config.json").exists():
        from dpo_ray.data import load_tokenizer
        from dpo_ray.models import load_causal_lm

        tok = load_tokenizer(cfg)
        load_causal_lm(None, cfg, tok).save_pretrained(init)
        tok.save_pretrained(init)
    return str(init)


def _round_prompts(prompts: list[Any], cfg: DPOConfig, r: int) -> list[int]:
    """Indices of round ``r``'s prompts: all, or the r-th window of ``prompts_per_round`` over a seeded
    shuffle."""
    m = cfg.iterate.prompts_per_round
    if m is None or m >= len(prompts):
        return list(range(len(prompts)))
    order = list(range(len(prompts)))
    random.Random(cfg.seed).shuffle(order)
    start = ((r - 1) * m) % len(order)
    return [order[(start + j) % len(order)] for j in range(m)]


def _round_config(cfg: DPOConfig, groups: Path, model_dir: Path, reference: str | None) -> DPOConfig:
    ref = cfg.reference.model_copy(update={"model_name_or_path": reference})
    return cfg.model_copy(update={
        "dataset_name": str(groups), "eval_dataset_name": None, "dataset_test_split": None,
        "eval_fraction": 0.0, "eval_strategy": "no", "load_best_model_at_end": False,
        "output_dir": str(model_dir), "model_name_or_path": None, "reference": ref,
        "overwrite_output_dir": True})


def plot_rounds(records: list[dict], path: Path) -> Path | None:
    """Mean score, best-of-K and the held-out metric across rounds (round 0: the model before round 1)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    rounds = [r["round"] for r in records]
    for key, label in (("mean_score", "mean score of the samples"), ("best_of_k", "best of K"),
                       ("heldout", "held-out (greedy)")):
        xs = [r["round"] for r in records if r.get(key) is not None]
        ax.plot(xs, [r[key] for r in records if r.get(key) is not None], marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_xticks(rounds)
    ax.set_ylabel("score")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class Iteration:
    """One iterate job: the pools, the rounds, the state file. ``run()`` does every round not yet done."""

    def __init__(self, cfg: DPOConfig, scorer: Callable[[Any, str], float] | None = None,
                 rollout_host: type | None = None, callbacks: list | None = None):
        self.cfg, self.it = cfg, cfg.iterate
        self.out = Path(cfg.output_dir)
        self.scorer_fn, self.rollout_host, self.callbacks = scorer, rollout_host, callbacks
        # rounds whose samples were drawn while the round before trained
        self.overlapped: dict[int, bool] = {}
        # an overlapped sampling's failure, raised once its round is kept
        self.pending_error: Exception | None = None

    def _say(self, text: str) -> None:
        print(f"iterate: {text}", flush=True)

    def _load_data(self) -> None:
        from dpo_ray.data.bundled import TEST_FILE, TRAIN_FILE

        cfg, it = self.cfg, self.it
        name = it.prompts or cfg.dataset_name or str(TRAIN_FILE)
        self.prompts = prompts_of(read_rows(name, cfg.dataset_train_split), name)
        eval_name = it.eval_prompts or (str(TEST_FILE) if name == str(TRAIN_FILE) else None)
        self.eval_prompts = (prompts_of(read_rows(eval_name), eval_name)[:it.eval_limit]
                             if eval_name and it.eval_limit else [])

    def _heldout(self, pool, scorer) -> float | None:
        if not self.eval_prompts:
            return None
        enc = [Prompt(self.encode(p), self.cfg.seed) for p in self.eval_prompts]
        answers = pool.sample(enc, SamplingParams(1, 0.0, 1.0, self.it.max_new_tokens))
        scores = scorer.score(self.eval_prompts, [a[0] for a in answers])
        return sum(scores) / len(scores)

    def run(self) -> dict:
        from dpo_ray.owned import RunLock

        self._claim()
        # a second job into the same folder stops at once, naming this one
        with RunLock(self.out, "output_dir"):
            return self._run()

    def _claim(self) -> None:
        """output_dir becomes this job's: empty, or an earlier iterate job's (marked). With
        overwrite_output_dir an earlier job's rounds are removed (only what it wrote); without it the job goes
        on after its last round."""
        from dpo_ray.config import ConfigError
        from dpo_ray.owned import OWNER_FILE, is_owned, mark_owned, remove_owned, root_problem

        out = self.out
        problem = root_problem(out, "output_dir")
        if problem:
            raise ConfigError([("output_dir", problem)])
        theirs = [p.name for p in out.iterdir()] if out.is_dir() else []
        if theirs and not is_owned(out, "iterate"):
            raise ConfigError([("output_dir",
                                f"{out} holds {', '.join(sorted(theirs)[:5])} but no {OWNER_FILE} "
                                "marker of an iterate job, so it is not one; choose an empty or new "
                                "output_dir")])
        if theirs and self.cfg.overwrite_output_dir:
            for p in sorted(out.iterdir()):
                if p.name.startswith("round-") or p.name in (STATE_FILE, "iterate.png", "initial"):
                    remove_owned(p, out)
        mark_owned(out, "iterate")

    def _run(self) -> dict:
        from dpo_ray.cluster import init_ray
        from dpo_ray.config import ConfigError
        from dpo_ray.data import load_tokenizer
        from dpo_ray.iterate.pools import RolloutHost, RolloutPool, ScorerPool

        cfg, it, out = self.cfg, self.it, self.out
        state = _state(out)
        done = {r["round"] for r in state["rounds"]}
        fn_name = getattr(self.scorer_fn, "__name__", "callable") if self.scorer_fn is not None else None
        settings = job_settings(cfg, fn_name)
        problem = settings_problem(state.get("settings", settings), settings)
        if problem:
            raise ConfigError([("output_dir", f"{out}: {problem}")])
        state["settings"] = settings
        self._load_data()
        initial = _initial_model(cfg, out)
        current = state["rounds"][-1]["model_dir"] if state["rounds"] else initial
        self.encode = PromptEncoder(load_tokenizer(initial))
        init_ray(cfg)
        spec = fn_name or it.scorer
        per_round = (len(self.prompts) if it.prompts_per_round is None
                     else min(it.prompts_per_round, len(self.prompts)))
        self._say(f"{it.rounds} round(s) of {per_round} prompt(s) × {it.samples} samples, scorer {spec}, "
                  f"reference {it.reference}; {len(done)} round(s) already done in {out}")
        pool = RolloutPool(current, it.rollout_actors, it.rollout_cpus, it.rollout_gpus, it.max_restarts,
                           host_class=self.rollout_host or RolloutHost, resources=it.rollout_resources)
        scorer = ScorerPool(spec, it.scorer_actors, it.scorer_cpus, it.scorer_gpus, it.max_restarts,
                            resources=it.scorer_resources, fn=self.scorer_fn)
        try:
            if 0 not in done:
                t0 = time.perf_counter()
                heldout = self._heldout(pool, scorer)
                base = RoundRecord(round=0, prompts=0, responses=0, mean_score=None, best_of_k=None, groups=0,
                                   pairs=0, heldout=heldout,
                                   seconds={"eval": round(time.perf_counter() - t0, 2)},
                                   model_dir=initial, restarts=pool.restarts,
                                   nodes={"rollout": pool.nodes(), "scorer": scorer.nodes()})
                state["rounds"].append(asdict(base))
                _write_json(out / STATE_FILE, state)
                self._say(f"round 0 (the model before training): held-out {heldout}")
            for r in range(1, it.rounds + 1):
                if r in done:
                    continue
                rec = self._round(r, pool, scorer, current, initial)
                current = rec.model_dir
                state["rounds"].append(asdict(rec))
                _write_json(out / STATE_FILE, state)
                plot_rounds(state["rounds"], out / "iterate.png")
                if self.pending_error is not None:
                    raise self.pending_error
        finally:
            pool.shutdown()
            scorer.shutdown()
        summary = {"rounds": state["rounds"], "model_dir": current, "plot": str(out / "iterate.png"),
                   "state": str(out / STATE_FILE)}
        plot_rounds(state["rounds"], out / "iterate.png")
        return summary

    def _sample(self, r: int, pool, scorer, policy: str) -> dict:
        """Round ``r``'s samples, scores and groups, written to ``round-<r>/`` (``groups.jsonl`` last,
        atomically: its presence means the round's data is complete); returns their summary
        (``samples.json``). ``policy`` names the model the rollout actors hold, for the record."""
        cfg, it = self.cfg, self.it
        rd = self.out / f"round-{r}"
        rd.mkdir(exist_ok=True)
        idx = _round_prompts(self.prompts, cfg, r)
        prompts = [self.prompts[i] for i in idx]
        secs: dict[str, float] = {}
        t0 = time.perf_counter()
        seed = cfg.seed * 1_000_003 + r * 10_007
        enc = [Prompt(self.encode(p), seed + i) for p, i in zip(prompts, idx)]
        responses = pool.sample(enc, SamplingParams(it.samples, it.temperature, it.top_p, it.max_new_tokens))
        secs["sample"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        flat_p = [p for p, rs in zip(prompts, responses) for _ in rs]
        flat_r = [x for rs in responses for x in rs]
        flat = scorer.score(flat_p, flat_r)
        k = it.samples
        scores = [flat[j * k:(j + 1) * k] for j in range(len(prompts))]
        secs["score"] = round(time.perf_counter() - t0, 2)
        rows, pairs = group_rows(prompts, responses, scores, cfg.group_pairs, cfg.group_margin,
                                 cfg.data_seed if cfg.data_seed is not None else cfg.seed)
        meta = {"prompts": len(prompts), "responses": len(flat_r), "mean_score": sum(flat) / len(flat),
                "best_of_k": sum(max(s) for s in scores) / len(scores), "groups": len(rows), "pairs": pairs,
                "seconds": secs, "sampled_from": policy}
        if not rows:
            raise NoPairsError(
                f"round {r}: the scorer gave every response of each of the {len(prompts)} prompt(s) the same "
                f"score (mean {meta['mean_score']:.4g}), so there is no pair to train on. Sample more "
                "diverse responses (iterate.temperature, iterate.samples), use a scorer that tells them "
                "apart, or lower group_margin")
        _write_json(rd / "samples.json", meta)
        groups_file = rd / "groups.jsonl"
        tmp = groups_file.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, groups_file)
        self._say(f"round {r}: {len(flat_r)} responses to {len(prompts)} prompts in {secs['sample']:.1f} s, "
                  f"mean score {meta['mean_score']:.3f}, best of {k} {meta['best_of_k']:.3f}; {len(rows)} "
                  f"groups, {pairs} pairs")
        return meta

    def _round(self, r: int, pool, scorer, current: str, initial: str) -> RoundRecord:
        """Round ``r``: its samples (unless written already), training, sync, held-out metric. With
        ``iterate.overlap`` the next round's samples are drawn while this round trains, from the same
        weights."""
        from concurrent.futures import ThreadPoolExecutor

        from dpo_ray.trainer import DPOTrainer

        cfg, it = self.cfg, self.it
        rd = self.out / f"round-{r}"
        groups_file = rd / "groups.jsonl"
        restarts0 = pool.restarts
        t_round = time.perf_counter()
        # written by an earlier job (or overlapped with the last round): not sampled again
        if groups_file.exists():
            meta = json.loads((rd / "samples.json").read_text())
            if not self.overlapped.pop(r, False):
                self._say(f"round {r}: its samples are already written ({groups_file}); training on them")
        else:
            meta = self._sample(r, pool, scorer, current)
        secs = dict(meta["seconds"])
        ahead = None
        nxt = self.out / f"round-{r + 1}" / "groups.jsonl"
        if it.overlap and r < it.rounds and not nxt.exists():
            ahead = ThreadPoolExecutor(1, thread_name_prefix="iterate-sample")
            future = ahead.submit(self._sample, r + 1, pool, scorer, current)
            self._say(f"round {r + 1}: sampling from the round-{r - 1} policy while round {r} trains "
                      "(iterate.overlap: one round off-policy)")
        t0 = time.perf_counter()
        reference = initial if it.reference == "initial" else None  # None: the model the round starts from
        round_cfg = _round_config(cfg, groups_file, rd / "model", reference)
        try:
            trained = DPOTrainer(model=current, args=round_cfg, callbacks=self.callbacks).train()
        finally:
            secs["train"] = round(time.perf_counter() - t0, 2)
            if ahead is not None:
                # the actors finish the next round's share before they take new weights
                ahead.shutdown(wait=True)
        error = None
        if ahead is not None:
            try:
                future.result()
                self.overlapped[r + 1] = True
            except Exception as e:  # noqa: BLE001 - raised after this round is recorded
                error = e
        t0 = time.perf_counter()
        from safetensors.torch import load_file

        weights = rd / "model" / "model.safetensors"
        if not weights.exists():
            raise DataError(f"round {r}: training wrote no {weights} (a LoRA run writes an adapter: set "
                            "merge_adapter: true so each round hands the rollout actors a whole model)")
        pool.sync(load_file(str(weights)), version=r)
        secs["sync"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        heldout = self._heldout(pool, scorer)
        secs["eval"] = round(time.perf_counter() - t0, 2)
        secs["round"] = round(time.perf_counter() - t_round, 2)
        rec = RoundRecord(round=r, prompts=meta["prompts"], responses=meta["responses"],
                          mean_score=meta["mean_score"], best_of_k=meta["best_of_k"], groups=meta["groups"],
                          pairs=meta["pairs"], heldout=heldout, seconds=secs, model_dir=str(rd / "model"),
                          restarts=pool.restarts - restarts0,
                          nodes={"rollout": pool.nodes(), "scorer": scorer.nodes()},
                          sampled_from=meta.get("sampled_from", ""))
        _write_json(rd / "round.json", asdict(rec))
        loss = trained.metrics.get("loss") if getattr(trained, "metrics", None) else None
        self._say(f"round {r} done: held-out {heldout if heldout is None else round(heldout, 4)}, train loss "
                  f"{loss if loss is None else round(loss, 4)}; "
                  "seconds " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items()))
        self.pending_error = error
        return rec


def run_iterate(cfg: DPOConfig, scorer: Callable[[Any, str], float] | None = None,
                rollout_host: type | None = None, callbacks: list | None = None) -> dict:
    """Every round of ``cfg.iterate`` not yet done under ``cfg.output_dir``; returns the summary (``rounds``:
    a record per round, round 0 the model before the first; ``model_dir``: the last policy; ``plot``;
    ``state``).

    ``scorer``: a Python function ``(prompt, response) -> float`` instead of ``iterate.scorer`` (pickled to
    the scorer actors); ``rollout_host``: a ``pools.RolloutHost`` subclass (another engine, or a test's
    fault); ``callbacks``: ``dpo_ray.Callback`` objects every round's training calls (docs/training.md)."""
    return Iteration(cfg, scorer, rollout_host, callbacks).run()
