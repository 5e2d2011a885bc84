"""The GPU path, proven in one short run (``make gpu-check``): on one CUDA GPU in at most ~8 minutes,

1. ``tests``: the GPU-marked tests (tests/test_gpu.py: bf16 forward/backward, the NCCL backend, ZeRO-2 and
   ZeRO-3 on the GPU, the reference actor on the GPU beside the policy with a fractional ``num_gpus``;
   tests/test_peft_moe.py: QLoRA, skipped with the reason where bitsandbytes is missing), run by pytest;
2. ``throughput``: dpo_ray against TRL 1.x on the same GPU, model, data and hyper-parameters, bf16: a
   Qwen2-0.5B-shaped model with random weights built from a config (its full 151,936-token vocabulary),
   skewed lengths up to ``--max_tokens`` per sequence (prompt about as long as the completion, most pairs
   short, a few long). Per configuration: steady pairs/s and tokens/s, MFU against the GPU's bf16 peak
   (``PEAK_BF16_TFLOPS`` by device name, or ``--peak_tflops``), peak GPU memory (the device's used memory
   sampled through NVML over the whole run: every process of the configuration, CUDA contexts included;
   and the training process's allocator peak), max |Δloss| against TRL at matched steps (same batches,
   same order). Configurations: ``trl``; ``dpo_ray`` (the defaults: reference actor pool, prefix sharing
   auto), ``dpo_ray+local`` (reference as a frozen copy on the worker) and ``dpo_ray+local+noshare``
   (standard [chosen; rejected] layout).

Prints a table per stage and writes JSON (``--out``, default bench/results/gpu_check.json). Exit status 1
if a test failed or a configuration did not run.

Without CUDA, or with ``--dry``, the same stages run on the CPU: the tests under ``DPO_RAY_GPU_DRY=1``
(fp32, gloo), the throughput stage on a tiny Qwen2-shaped model for a few steps. Every code path of this
script runs; the numbers mean nothing about a GPU and are labelled dry.

    python bench/gpu_check.py              # on a GPU machine (make gpu-check)
    python bench/gpu_check.py --dry        # anywhere: the CPU rehearsal
    python bench/gpu_check.py --dry --stages tests --tests_k bf16   # a part of it

MFU: model FLOPs per pair = 8 · N · tokens (policy forward + backward 6N, reference forward 2N per token),
N = parameters less the input embedding (with tied embeddings the LM head's matrix counts once), the
standard layout's tokens (chosen + rejected, no padding) for every configuration, so prefix sharing's
saved work shows as higher MFU rather than being discounted. Attention-score FLOPs are not counted
(about 7% more at 1,024 tokens for this shape): the MFU stated is a slight underestimate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

T0 = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH, REPO, RESULTS, machine, run_child, steady_rate, table, versions  # noqa: E402
from ds_ops import default_extensions_dir, ensure_ops  # noqa: E402

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity), by a substring of torch.cuda.get_device_name()
PEAK_BF16_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0,
    "H100": 756.0, "GH200": 989.0, "B200": 2250.0, "B100": 1750.0, "A100": 312.0, "A800": 312.0,
    "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0,
    "RTX 6000 Ada": 364.0, "V100": 125.0, "T4": 65.0,
}
QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1_000_000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=True, vocab_size=151936)
# the dry run's stand-in: the same architecture, tiny
QWEN2_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048, rope_theta=1_000_000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)
CONFIGS = ("trl", "dpo_ray", "dpo_ray+local", "dpo_ray+local+noshare")
QLORA_TEST = "tests/test_peft_moe.py::test_qlora_on_gpu"


def peak_tflops(device_name: str) -> float | None:
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # the most specific name first
        if key.lower() in device_name.lower():
            return PEAK_BF16_TFLOPS[key]
    return None


# ------------------------------------------------------------------------------------- stage 1: tests

def stage_tests(args, dry: bool, env: dict[str, str], work: Path) -> dict:
    xml = work / "gpu_tests.xml"
    xml.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider",
           f"--junitxml={xml}", "tests/test_gpu.py", QLORA_TEST]
    if args.tests_k:
        cmd += ["-k", args.tests_k]
    run_env = {**os.environ, **env, **({"DPO_RAY_GPU_DRY": "1"} if dry else {})}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=run_env, capture_output=True, text=True,
                       timeout=max(60.0, args.budget_s - (time.perf_counter() - T0)))
    wall = time.perf_counter() - t0
    rows = []
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome, why = "passed", ""
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                    why = (el.get("message") or "").splitlines()[0][:160] if el.get("message") else ""
            rows.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)),
                         "reason": why})
    ok = r.returncode in (0, 5) and all(x["outcome"] in ("passed", "skipped") for x in rows)
    print(table(["test", "outcome", "s", "reason"], [[x["test"], x["outcome"], x["seconds"], x["reason"]]
                                                     for x in rows]))
    if not ok:
        print(r.stdout[-4000:], r.stderr[-2000:], sep="\n", file=sys.stderr)
    return {"ok": ok, "returncode": r.returncode, "wall_s": wall, "tests": rows}


# ------------------------------------------------------------------------------------- stage 2: throughput

def save_model(out: Path, shape: dict) -> Path:
    """A Qwen2 model with random weights from ``shape`` (seed 0) and the bundled tokenizer, saved once."""
    from bench_gpu import save_qwen_like

    return save_qwen_like(out, shape)


def flop_params(model_dir: Path) -> int:
    """N for the MFU: parameters less the input embedding (tied: the LM head's matrix counts once)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    return total if cfg.tie_word_embeddings else total - emb


def skewed_pairs(out: Path, n: int, min_tokens: int, max_tokens: int, seed: int = 0) -> Path:
    """Bundled-task pairs whose lengths are skewed like real preference data (bench_gpu.long_pairs, skew 3):
    the median pair about an eighth of the way from ``min_tokens`` up, a few reaching ``max_tokens``."""
    from bench_gpu import long_pairs

    return long_pairs(out, n, min_tokens, max_tokens, seed=seed, skew=3)


class GpuMemory:
    """Peak used memory of GPU 0 (every process on it, less what was in use before) sampled through NVML every
    ``interval`` s (nvidia-ml-py's pynvml, else the copy vendored in Ray)."""

    def __init__(self, interval: float = 0.1):
        self.peak = 0
        self.interval = interval
        self._stop = threading.Event()
        self._thread = None
        try:
            try:
                import pynvml  # nvidia-ml-py, where installed
            except ImportError:
                from ray._private.thirdparty import pynvml  # the copy Ray vendors (always there with Ray)
            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.baseline = pynvml.nvmlDeviceGetMemoryInfo(self._handle).used
        except Exception:  # noqa: BLE001 - no NVML (CPU machine): nothing to sample
            self._nvml = None
            self.baseline = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
            self._stop.wait(self.interval)

    def __enter__(self):
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def peak_mib(self) -> float | None:
        return (self.peak - self.baseline) / 2**20 if self._nvml is not None else None


def tokens_per_pair(data: Path, model: Path, max_length: int) -> float:
    from dpo_ray.config import DPOConfig
    from dpo_ray.data import load_tokenizer, tokenize_rows

    rows = [json.loads(ln) for ln in data.read_text().splitlines() if ln.strip()]
    cols = tokenize_rows(rows, load_tokenizer(str(model)), DPOConfig(max_length=max_length))
    return (sum(len(x) for x in cols["chosen_input_ids"])
            + sum(len(x) for x in cols["rejected_input_ids"])) / len(rows)


def dpo_ray_extra(name: str, gpus: int, dry: bool) -> dict:
    """DPOConfig keys for one dpo_ray configuration on this machine."""
    parts = name.split("+")[1:]
    extra: dict = {}
    if "local" in parts:
        extra["reference"] = {"source": "local"}
        extra["ray"] = {"resources_per_worker": {"CPU": 0.5} if dry else {"CPU": 1, "GPU": 1}}
    elif dry:
        extra["reference"] = {"source": "actor", "num_gpus": 0, "num_cpus": 0.5}
        extra["ray"] = {"resources_per_worker": {"CPU": 0.5}}
    else:
        # the actor beside the policy: half the GPU each on a one-GPU machine,
        # a GPU each where there are more
        share = 0.5 if gpus < 2 else 1
        extra["reference"] = {"source": "actor", "num_gpus": share, "num_cpus": 1}
        extra["ray"] = {"resources_per_worker": {"CPU": 1, "GPU": share}}
    if "noshare" in parts:
        extra["prefix_sharing"] = "off"
    return extra


def stage_throughput(args, dry: bool, env: dict[str, str], work: Path, device_name: str) -> dict:
    gpus = 0 if dry else __import__("torch").cuda.device_count()
    model = save_model(work / ("qwen2_tiny" if dry else "qwen2_0.5b_random"),
                       QWEN2_TINY if dry else QWEN2_05B)
    pairs = args.batch * args.steps
    data = skewed_pairs(work / "data" / f"skewed_{args.min_tokens}_{args.max_tokens}_{pairs}.jsonl", pairs,
                        args.min_tokens, args.max_tokens)
    max_length = args.max_tokens + 8
    tpp = tokens_per_pair(data, model, max_length)
    n_params = flop_params(model)
    peak = args.peak_tflops or (None if dry else peak_tflops(device_name))
    flops_per_pair = 8.0 * n_params * tpp
    names = args.configs.split(",")
    runs = {}
    for name in names:
        left = args.budget_s - (time.perf_counter() - T0)
        if left < 30:
            runs[name] = {"error": f"not run: the {args.budget_s:.0f} s budget is spent"}
            print(f"{name}: skipped, budget spent", flush=True)
            continue
        kind = "trl" if name == "trl" else "dpo_ray"
        out = work / f"{name}.json"
        # a fresh output_dir (dpo_ray refuses to reuse one)
        shutil.rmtree(work / f"run_{name}", ignore_errors=True)
        child = [str(BENCH / "bench_throughput.py"), "--child", kind, "--model", str(model), "--data",
                 str(data), "--workers", "1", "--threads", "2" if dry else "0", "--out", str(out),
                 "--workdir", str(work / f"run_{name}"), "--batch", str(args.batch), "--epochs", "1",
                 "--lr", str(args.lr), "--max_length", str(max_length),
                 "--dpo_ray_extra", json.dumps(dpo_ray_extra(name, gpus, dry) if kind == "dpo_ray" else {})]
        child += [] if dry else ["--gpu"]
        if kind == "trl" and not dry:
            child[child.index("--threads") + 1] = "4"
        with GpuMemory() as mem:
            res = run_child(child, out, min(left, args.child_timeout), env=env, log=work / f"{name}.log")
        res["gpu_used_peak_mib"] = mem.peak_mib()
        if "error" in res:
            print(f"{name}: FAILED ({res['error']})\n{res.get('log_tail', '')}", file=sys.stderr, flush=True)
        else:
            res["steady_pairs_s"] = steady_rate(res["step_times"], args.batch, args.warmup)
            print(f"{name}: {res['steady_pairs_s']:.2f} pairs/s, wall {res['process_wall_s']:.0f} s",
                  flush=True)
        runs[name] = res
    summary = {}
    base = runs.get("trl") if "error" not in runs.get("trl", {"error": 1}) else None
    for name, res in runs.items():
        if "error" in res:
            summary[name] = {"error": res["error"]}
            continue
        rate = res["steady_pairs_s"]
        s = {"pairs_s": rate, "tokens_s": rate * tpp,
             "mfu": rate * flops_per_pair / (peak * 1e12) if peak else None,
             "gpu_used_peak_mib": res["gpu_used_peak_mib"],
             "gpu_alloc_peak_mib": res.get("gpu_peak_mib") or None,
             "peak_pss_mib": res["peak_pss_mib"], "process_wall_s": res["process_wall_s"],
             "first_step_s": res["first_step_s"], "steps": len(res["losses"])}
        if base is not None and name != "trl":
            n = min(len(base["losses"]), len(res["losses"]))
            s["max_abs_dloss"] = (max(abs(a - b) for a, b in zip(base["losses"][:n], res["losses"][:n])) if n
                                  else None)
            s["loss_steps_compared"] = n
            s["x_trl_pairs_s"] = rate / base["steady_pairs_s"]
            mem_key = "gpu_used_peak_mib" if not dry else "peak_pss_mib"
            if res.get(mem_key) and base.get(mem_key):
                s["memory_vs_trl"] = res[mem_key] / base[mem_key]
        summary[name] = s
    mem_col = "peak PSS MiB (CPU)" if dry else "GPU used peak MiB"

    def f(v, fmt="{:.3g}"):
        return "-" if v is None else (fmt.format(v) if isinstance(v, float) else str(v))

    rows = []
    for name in names:
        s = summary[name]
        if "error" in s:
            rows.append([name, "failed: " + s["error"]] + [""] * 7)
            continue
        rows.append([name, f(s["pairs_s"]), f(s["tokens_s"], "{:.0f}"),
                     f(s.get("x_trl_pairs_s", 1.0 if name == "trl" else None)),
                     f(s["mfu"], "{:.1%}") if s["mfu"] is not None else "n/a",
                     f(s["peak_pss_mib"] if dry else s["gpu_used_peak_mib"], "{:.0f}"),
                     f(s["gpu_alloc_peak_mib"], "{:.0f}"), f(s.get("max_abs_dloss"), "{:.2e}"),
                     f(s["process_wall_s"], "{:.0f}")])
    print(f"\n{'DRY RUN (CPU, tiny Qwen2 shape, fp32): not GPU numbers' if dry else device_name}: {pairs} "
          f"pairs, batch {args.batch}, {tpp:.0f} tokens/pair (skewed {args.min_tokens}..{args.max_tokens} "
          f"per sequence), N = {n_params / 1e6:.1f} M, peak {peak or 'unknown'} TFLOP/s")
    print(table(["config", "pairs/s", "tokens/s", "× TRL", "MFU", mem_col, "alloc peak MiB", "max |Δloss|",
                 "wall s"], rows))
    goals = {}
    d, t = summary.get("dpo_ray", {}), summary.get("trl", {})
    if "pairs_s" in d and "pairs_s" in t:
        goals["pairs_s_x_trl_ge_1.3"] = {"value": d["x_trl_pairs_s"], "met": d["x_trl_pairs_s"] >= 1.3}
        if d.get("memory_vs_trl") is not None:
            goals["peak_memory_le_trl"] = {"value": d["memory_vs_trl"], "met": d["memory_vs_trl"] <= 1.0}
        print("goals (dpo_ray defaults vs TRL):", json.dumps(goals))
    ok = all("error" not in summary[n] for n in names)
    return {"ok": ok, "model": str(model), "shape": QWEN2_TINY if dry else QWEN2_05B,
            "n_flop_params": n_params, "tokens_per_pair": tpp, "pairs": pairs, "batch": args.batch,
            "peak_tflops": peak, "flops_per_pair": flops_per_pair, "summary": summary, "goals": goals,
            "runs": {k: {kk: vv for kk, vv in v.items() if kk != "log_tail"} for k, v in runs.items()}}


# ------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="the CPU rehearsal (automatic without CUDA)")
    ap.add_argument("--stages", default="tests,throughput")
    ap.add_argument("--tests_k", default="", help="pytest -k expression for the tests stage")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    ap.add_argument("--steps", type=int, default=None,
                    help="optimizer steps per configuration (GPU 24, dry 4)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="steps left out of the steady rate (GPU 4, dry 1)")
    ap.add_argument("--min_tokens", type=int, default=None, help="shortest sequence (GPU 64, dry 16)")
    ap.add_argument("--max_tokens", type=int, default=None, help="longest sequence (GPU 1024, dry 64)")
    ap.add_argument("--lr", type=float, default=5e-7)
    ap.add_argument("--peak_tflops", type=float, default=None,
                    help="the GPU's dense bf16 peak, if not in the table")
    ap.add_argument("--budget_s", type=float, default=480.0, help="stop starting configurations after this")
    ap.add_argument("--child_timeout", type=float, default=300.0)
    ap.add_argument("--workdir", default="/tmp/dpo_ray_bench/gpu_check")
    ap.add_argument("--out", default=str(RESULTS / "gpu_check.json"))
    args = ap.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    dry = args.dry or not cuda
    d = {"steps": (4, 24), "warmup": (1, 4), "min_tokens": (16, 64), "max_tokens": (64, 1024)}
    for key, (dry_v, gpu_v) in d.items():
        if getattr(args, key) is None:
            setattr(args, key, dry_v if dry else gpu_v)
    device_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    why = "--dry" if args.dry else ("no CUDA device" if not cuda else "")
    mode = f"DRY RUN on the CPU ({why}): fp32, gloo, tiny model" if dry else f"{device_name}: bf16, nccl"
    print(f"gpu_check: {mode}", flush=True)
    # What the children add to this environment (never replace it: a compiler needs PATH, caches need HOME).
    # DeepSpeed's ops are built first, once, where dpo_ray's workers look for them, and never half-built
    # (bench/ds_ops.py): a fresh machine builds them here, a killed build is repaired on the next run.
    ext_dir = os.environ.get("TORCH_EXTENSIONS_DIR") or str(default_extensions_dir())
    env = {"DS_ACCELERATOR": "cpu" if dry else "cuda", "TORCH_EXTENSIONS_DIR": ext_dir}
    os.environ.update(env)
    if "tests" in args.stages.split(",") or "throughput" in args.stages.split(","):
        for op in ensure_ops(env["DS_ACCELERATOR"], Path(ext_dir)):
            print(f"DeepSpeed op {op['op']}: {'built' if op['built'] else 'already built'} in {ext_dir} "
                  f"({op['seconds']:.0f} s; was {op['state_before']})", flush=True)
    work = Path(args.workdir) / ("dry" if dry else "gpu")
    work.mkdir(parents=True, exist_ok=True)
    result = {"dry": dry, "device": device_name, "gpus": torch.cuda.device_count() if cuda else 0,
              "machine": machine(), "versions": versions(), "args": vars(args), "stages": {}}
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - {"tests", "throughput"}
    if unknown:
        ap.error(f"--stages: unknown {sorted(unknown)}; choose from tests, throughput")
    if "tests" in stages:
        print("\n== stage 1: GPU-marked tests", flush=True)
        result["stages"]["tests"] = stage_tests(args, dry, env, work)
    if "throughput" in stages:
        print("\n== stage 2: throughput and memory against TRL", flush=True)
        result["stages"]["throughput"] = stage_throughput(args, dry, env, work, device_name)
    result["wall_s"] = time.perf_counter() - T0
    result["ok"] = all(s["ok"] for s in result["stages"].values())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\ngpu_check {'passed' if result['ok'] else 'FAILED'} in {result['wall_s']:.0f} s; wrote {out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
