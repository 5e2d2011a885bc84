"""Regenerate dpo_ray/assets/: the bundled preference data and the tokenizer trained on it.

    python scripts/make_bundled_data.py            # deterministic: the same bytes every run

Writes data/{train,test}.jsonl (standard: prompt/chosen/rejected strings), the same pairs as chat
messages under data/conversational/, and tokenizer/ (a WordLevel tokenizer built from this text, with
<bos>/<eos>/<pad>/<unk> and a small chat template), loadable offline with AutoTokenizer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dpo_ray.data.bundled import (
    CONVERSATIONAL_TEST_FILE,
    CONVERSATIONAL_TRAIN_FILE,
    TEST_FILE,
    TOKENIZER_DIR,
    TRAIN_FILE,
    make_pairs,
    to_conversational,
)

N_TRAIN, N_TEST = 3000, 300
TRAIN_SEED, TEST_SEED = 1234, 5678
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]

# A simple template: "user: ...\n" per message, "assistant: ...<eos>" for answers; add_generation_prompt
# ends the prompt with "assistant:". Per-row `tools` render as one "tools: name ..." line.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}tools:{% for t in tools %} "
    "{{ t['function']['name'] if t['function'] is defined else t['name'] }}{% endfor %}{{ '\\n' }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}assistant: {{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# Words the template and general use need beyond the task text.
EXTRA_TEXT = ("user assistant system tool tools : = , . ? ! ( ) [ ] { } - + * / # ' \" "
              + " ".join("abcdefghijklmnopqrstuvwxyz") + " " + " ".join("0123456789"))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")


def make_data() -> tuple[list[dict], list[dict]]:
    train = list(make_pairs(N_TRAIN, TRAIN_SEED))
    seen = {r["prompt"] for r in train}
    test = []
    for r in make_pairs(10 * N_TEST, TEST_SEED):  # held out: no test prompt appears in train
        if r["prompt"] not in seen:
            seen.add(r["prompt"])
            test.append(r)
        if len(test) == N_TEST:
            break
    return train, test


def build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    # Whitespace splits words from punctuation; single digits keep "9"+"3" apart when texts are joined.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=1000, special_tokens=SPECIAL))
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=512,
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def main() -> None:
    train, test = make_data()
    write_jsonl(TRAIN_FILE, train)
    write_jsonl(TEST_FILE, test)
    write_jsonl(CONVERSATIONAL_TRAIN_FILE, [to_conversational(r) for r in train])
    write_jsonl(CONVERSATIONAL_TEST_FILE, [to_conversational(r) for r in test])
    texts = [t for r in train for t in (r["prompt"], r["chosen"], r["rejected"])] + [EXTRA_TEXT]
    if TOKENIZER_DIR.exists():
        shutil.rmtree(TOKENIZER_DIR)
    build_tokenizer(texts).save_pretrained(TOKENIZER_DIR)
    print(f"wrote {len(train)} train / {len(test)} test pairs and a tokenizer to {TOKENIZER_DIR.parent}")


if __name__ == "__main__":
    main()
