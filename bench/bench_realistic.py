"""The realistic-shape benchmark (docs/BENCHMARKS.md, table 1): dpo_ray with its defaults against TRL 1.x on
a model and data shaped like real use, built offline, same hyper-parameters and cores, alternating runs.

Model: a Llama of 11.1M parameters (hidden 256, 4 layers, 4 heads / 2 KV heads, MLP 688, tied embeddings)
with random weights, and a real 32,000-token SentencePiece vocabulary: Mistral's v1 tokenizer, which the
``mistral-common`` wheel ships (fetched once with ``pip download --no-deps`` from the package index, converted
with ``sentencepiece`` to a ``tokenizer.json``; nothing comes from a model hub).
Data: ``--pairs`` preference pairs of English text (sentences of the Python standard library's docstrings),
lengths drawn like UltraFeedback's: prompt and completion token counts log-normal with medians
``--prompt_median`` / ``--completion_median`` tokens and a long tail (σ 0.8, cut at 900), ``max_length``
1,024.

Configurations (bench_throughput.py runs each in its own process, alternated ``--repeats`` times):

  dpo_ray_2w            the defaults: 2 workers, reference auto, prefix sharing auto, length bucketing auto
  dpo_ray_1w+nobucket   1 worker, the shuffled order TRL is given too: per-step losses on identical batches
  trl                   TRL DPOTrainer, 1 process, 2 torch threads, in-process reference, fp32

    python bench/bench_realistic.py [--pairs 200] [--batch 8] [--repeats 2] [--configs ...] [--name realistic]

``--model DIR``: a pretrained model folder with its own tokenizer instead of the random 11M Llama (issue 30's
table on SmolLM2-135M-Instruct: ``make smollm2`` caches it; its 49k vocabulary then sets the token counts).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
LLAMA_11M = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)
TOKENIZER_WHEEL = "mistral-common==1.13.1"
TOKENIZER_FILE = "mistral_common/data/tokenizer.model.v1"  # Mistral 7B v0.1's SentencePiece model, 32k


def shipped_tokenizer(work: Path) -> Path:
    """Mistral's 32k tokenizer from the mistral-common wheel, as a fast tokenizer folder."""
    out = work / "tokenizer"
    if (out / "tokenizer.json").exists():
        return out
    wheels = work / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels),
                    TOKENIZER_WHEEL],
                   check=True)
    wheel = next(wheels.glob("mistral_common-*.whl"))
    spm = work / "spm"
    spm.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        (spm / "tokenizer.model").write_bytes(z.read(TOKENIZER_FILE))
    # From a folder: LlamaTokenizer(vocab_file=...) in transformers 5 silently builds a 3-token tokenizer.
    (spm / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spm)  # needs sentencepiece (the bench extra) for the conversion
    tok.pad_token = tok.unk_token
    assert len(tok) == 32000, len(tok)
    tok.save_pretrained(out)
    return out


def save_model(work: Path) -> Path:
    out = work / "llama-11m-32k"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(shipped_tokenizer(work))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **LLAMA_11M)
    model = LlamaForCausalLM(cfg)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, vocabulary {len(tok)}")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def sentences() -> list[str]:
    """English sentences: the docstrings of the standard library modules Python has already imported."""
    import argparse as m1
    import collections as m2
    import json as m3
    import pathlib as m4
    import subprocess as m5
    import zipfile as m6

    text = []
    for mod in (m1, m2, m3, m4, m5, m6):
        for obj in [mod, *vars(mod).values()]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str):
                text += [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())) if len(s) > 20]
    return sorted(set(text))


def make_pairs(path: Path, n: int, model_dir: Path, prompt_median: int, completion_median: int,
               seed: int = 0) -> Path:
    if path.exists():
        return path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    sents = sentences()
    lens = np.array([len(tok(s).input_ids) for s in sents])
    rng = np.random.default_rng(seed)

    def text(tokens: int) -> str:
        out, have = [], 0
        while have < tokens:
            i = int(rng.integers(len(sents)))
            out.append(sents[i])
            have += int(lens[i])
        return " ".join(out)

    def draw(median: int) -> int:
        return int(min(900, max(4, rng.lognormal(np.log(median), 0.8))))

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": text(draw(prompt_median)),
                                "chosen": " " + text(draw(completion_median)),
                                "rejected": " " + text(draw(completion_median))}) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompt_median", type=int, default=120)
    ap.add_argument("--completion_median", type=int, default=150)
    ap.add_argument("--configs", default="dpo_ray_2w,dpo_ray_1w+nobucket,trl")
    ap.add_argument("--model", default=None, help="a model folder with its tokenizer (default: the random "
                    "11M Llama with Mistral's 32k vocabulary)")
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the steady rate")
    ap.add_argument("--lr", type=float, default=5e-4, help="learning rate of both trainers (a pretrained "
                    "model wants a DPO-sized one, e.g. 1e-6)")
    ap.add_argument("--trl_extra", default="", help="JSON of TRL DPOConfig keys (bench_throughput.py), e.g. "
                    "micro-batches with accumulation where TRL's batch does not fit in memory")
    ap.add_argument("--workdir", default="/tmp/dpo_ray_bench/realistic")
    ap.add_argument("--name", default="realistic", help="bench/results/<name>.json")
    ap.add_argument("--code", action="append", default=[], metavar="LABEL=DIR",
                    help="configs ending in @LABEL run dpo_ray from DIR (bench_throughput.py --code)")
    args = ap.parse_args()
    work = Path(args.workdir)
    model = Path(args.model) if args.model else save_model(work)
    tag = f"{model.name}_" if args.model else ""  # the token counts follow the model's tokenizer
    data = make_pairs(work / "data"
                      / f"pairs_{tag}{args.pairs}_{args.prompt_median}_{args.completion_median}.jsonl",
                      args.pairs, model, args.prompt_median, args.completion_median)
    cmd = [sys.executable, str(BENCH / "bench_throughput.py"), "--model_dir", str(model), "--data_file",
           str(data), "--pairs", str(args.pairs), "--batch", str(args.batch), "--lr", str(args.lr),
           "--max_length", "1024",
           "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--configs", args.configs,
           "--workdir", str(work / "runs"), "--name", args.name, "--timeout", "1500",
           *(f"--code={c}" for c in args.code), *(["--trl_extra", args.trl_extra] if args.trl_extra else [])]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
