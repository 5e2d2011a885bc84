"""The schema: DPOConfig and its sections (``ray``, ``reference``, ``deepspeed``, ``inspect``), field by
field.

Field names follow TRL's ``DPOConfig`` / ``transformers.TrainingArguments``; the sections hold what TRL does
not have. Building a DPOConfig runs pydantic's per-field checks, then every cross-field rule
(``config.rules``), and raises one ``ConfigError`` listing every problem, each naming the key as the user
writes it (``config.messages``)."""

from __future__ import annotations

import os
import re
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from dpo_ray.config.messages import problems_from_pydantic
from dpo_ray.config.rules import choose_reference_source, cross_field_problems, effective_reference_source
from dpo_ray.data.checks import INSPECT_CHECKS
from dpo_ray.errors import ConfigError
from dpo_ray.losses import LOSSES, LossParams, canonical_loss_name
from dpo_ray.optim import canonical_optimizer
from dpo_ray.redact import REDACTED as _REDACTED
from dpo_ray.redact import redact
from dpo_ray.schedule import SCHEDULES
from dpo_ray.trl_keys import TRL_KEYS, translate

_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=,+-]{0,199}")
TruncationMode = Literal["keep_start", "keep_end"]
ReferenceSource = Literal["auto", "actor", "local", "precomputed", "adapter_off", "ref_adapter", "none"]



class _RuleViolations(Exception):
    # Not a ValueError on purpose: pydantic lets it through unwrapped, so __init__ can re-raise the
    # collected problems as one ConfigError with the keys intact.
    def __init__(self, problems):
        self.problems = problems


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RayConfig(_Section):
    """Where and how wide the run is."""

    address: str | None = Field(None, description="Ray cluster address; None joins RAY_ADDRESS or starts a "
                                "local Ray")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one DeepSpeed rank each)")
    use_gpu: bool | None = Field(None, description="one GPU per worker; None = auto (GPU when the cluster "
                                 "has one)")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="Ray resources per worker, e.g. {CPU: 0.5, policy_gpu: 1}; empty = auto (fractional CPU "
        "on CPU)",
    )
    num_cpus: float | None = Field(None, description="logical CPUs for a local Ray (default: 2× cores, at "
                                   "least 8)")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads of each worker on CPU; "
                                      "default the node's cores ÷ its workers (at least 1)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how the workers' bundles are placed across nodes")
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint (-1 = "
                              "forever)")
    storage_path: str | None = Field(None, description="Ray Train storage (shared path on clusters); default "
                                     "output_dir/ray_results")
    runtime_env: dict[str, Any] = Field(default_factory=dict, description="runtime_env for a local ray.init")


class ReferenceConfig(_Section):
    """Where reference log-probs come from."""

    source: ReferenceSource = Field(
        "auto",
        description="actor: Ray actor pool; local: frozen copy on each worker; precomputed: one pass before "
        "training; adapter_off / ref_adapter: PEFT; none: reference-free; auto: actor where the pool has a "
        "place of its own (num_gpus, resources, node_label, or a multi-node cluster), else local (one node "
        "the workers fill). Unset: auto, but under PEFT without a reference model TRL's choice: adapter_off "
        "for a new adapter, ref_adapter (a frozen copy named ref) for peft_adapter_path",
    )
    model_name_or_path: str | None = Field(None, description="reference model dir; None = the policy's "
                                           "initial weights")
    num_actors: int = Field(1, ge=1, description="reference actors in the pool")
    num_cpus: float = Field(0.5, ge=0, description="CPUs per reference actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per reference actor (fractions share a GPU)")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per actor")
    node_label: dict[str, str] = Field(default_factory=dict,
                                       description="node labels the actors must land on")
    prefetch_depth: int = Field(2, ge=0, description="reference requests in flight ahead of the trainer")
    max_restarts: int = Field(3, ge=0, description="restarts per actor before the run fails")
    max_task_retries: int = Field(3, ge=0, description="retries of a request whose actor died")
    batch_size: int | None = Field(None, ge=1, description="pairs per actor forward (default: per_device "
                                   "batch)")
    cache_dir: str | None = Field(None, description="precomputed cache dir; default "
                                  "~/.cache/dpo_ray/ref_logps")
    request_timeout_s: float = Field(600.0, gt=0, description="seconds a worker waits for one reference "
                                     "answer before failing (a wedged actor becomes an error, not a hang)")
    capacity_timeout_s: float = Field(600.0, gt=0, description="seconds a worker waits for a reference actor "
                                      "that lost its node to find a node with its resources again (Ray "
                                      "restarts it there) before failing, naming the resources")
    ready_timeout_s: float = Field(900.0, gt=0, description="seconds the driver waits for the actors to load "
                                   "their model")
    check_placement: bool = Field(True, description="fail at once when the cluster's nodes cannot hold the "
                                  "pool; turn off under an autoscaler that adds nodes on demand")

    def resolve_source(self, source: str) -> None:
        """Set the source the run uses (a default, or ``auto`` decided) without marking it as given:
        whether the user wrote ``source`` stays what ``model_fields_set`` says, so
        ``reference_source_defaulted`` holds and a config rebuilt from ``model_dump(exclude_unset=True)``
        (sweep trials, resumes) resolves it again for its own settings."""
        given = "source" in self.model_fields_set
        self.source = source
        if not given:
            self.model_fields_set.discard("source")


class DeepSpeedConfig(_Section):
    """DeepSpeed ZeRO; the rest of the DeepSpeed dict is derived from the top-level keys."""

    zero_stage: int = Field(0, ge=0, le=3, description="ZeRO stage: 0 DDP-like, 1 optimizer, 2 +gradients, 3 "
                            "+parameters sharded")
    offload_optimizer: bool = Field(False, description="keep optimizer states in CPU memory (stage >= 1)")
    offload_param: bool = Field(False, description="keep parameters in CPU memory (stage 3)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="merged last into the DeepSpeed dict")


InspectLevel = Literal["error", "warn", "off"]

class InspectConfig(_Section):
    """Levels and thresholds of `dpo-ray inspect-data` (docs/inspect.md lists the checks)."""

    levels: dict[str, InspectLevel] = Field(
        default_factory=dict,
        description="per-check level overrides (error | warn | off), e.g. {missing_eos: error, "
        "truncated_rows: off}",
    )
    max_fraction: dict[str, float] = Field(
        default_factory=dict,
        description="per-check thresholds: fires when its share of rows exceeds this, "
        "e.g. {truncated_rows: 0.3}",
    )
    example_rows: int = Field(5, ge=1, le=100, description="row numbers listed per finding")
    histogram_bins: int = Field(40, ge=5, le=500, description="bins of the token-length histograms")

    @field_validator("levels", "max_fraction")
    @classmethod
    def _known_checks(cls, value: dict) -> dict:
        unknown = [name for name in value if name not in INSPECT_CHECKS]
        if unknown:
            raise ValueError(f"{', '.join(unknown)} is not a check; choose from {', '.join(INSPECT_CHECKS)}")
        bad = {name: v for name, v in value.items() if isinstance(v, float) and not 0 <= v <= 1}
        if bad:
            raise ValueError(f"fractions must be in [0, 1]; {', '.join(bad)} is not")
        return value

    def level(self, check: str) -> str:
        return self.levels.get(check, INSPECT_CHECKS[check][0])

    def threshold(self, check: str) -> float:
        return self.max_fraction.get(check, INSPECT_CHECKS[check][1])


class IterateConfig(_Section):
    """``dpo-ray iterate``: rounds of sample -> score -> group DPO -> sync (docs/iterative.md). \
``dpo-ray train``
    ignores this section."""

    rounds: int = Field(3, ge=1, description="rounds of sample, score, train, sync")
    samples: int = Field(4, ge=2, description="responses sampled per prompt (K): one prompt group each")
    prompts: str | None = Field(None, description="prompt file (JSON Lines / JSON / CSV / Parquet with a "
                                "'prompt' column, standard or conversational); None: the prompts of "
                                "dataset_name (the bundled task's when that is unset too)")
    prompts_per_round: int | None = Field(None, ge=1, description="prompts sampled per round, taken in turn "
                                          "from the shuffled prompt set (None: all of them every round)")
    eval_prompts: str | None = Field(None, description="held-out prompt file for the per-round metric (the "
                                     "mean score of greedy answers); None: the bundled task's held-out "
                                     "prompts when the prompts are the bundled task's, else none")
    eval_limit: int = Field(200, ge=0,
                            description="held-out prompts scored per round (0: no held-out metric)")
    temperature: float = Field(1.0, ge=0, description="sampling temperature (0: greedy, every sample alike)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: the smallest token set with this "
                         "mass")
    max_new_tokens: int = Field(64, ge=1, description="tokens generated per response at most")
    scorer: str = Field("rule", description="rule: the bundled task's rule (1 follows it, 0 not); "
                        "module:function: a Python callable (prompt, response) -> float; a directory: a "
                        "reward model (AutoModelForSequenceClassification, its first logit)")
    reference: Literal["previous", "initial"] = Field(
        "previous", description="each round's DPO reference: previous: the model the round starts from "
        "(Self-Rewarding LMs, Iterative RPO); initial: the model of round 1 (the KL anchor of online "
        "iterative RLHF's analysis)")
    rollout_actors: int = Field(1, ge=1, description="rollout actors sampling in parallel, each with the "
                                "policy")
    rollout_cpus: float = Field(1.0, ge=0, description="CPUs per rollout actor (torch threads: this, at "
                                "least 1)")
    rollout_gpus: float = Field(0.0, ge=0, description="GPUs per rollout actor")
    rollout_resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per "
                                                "rollout actor (to place them on nodes that carry them)")
    scorer_actors: int = Field(1, ge=1, description="scorer actors")
    scorer_cpus: float = Field(0.5, ge=0, description="CPUs per scorer actor")
    scorer_gpus: float = Field(0.0, ge=0, description="GPUs per scorer actor (a reward model)")
    scorer_resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per "
                                               "scorer actor")
    max_restarts: int = Field(3, ge=0, description="restarts of a rollout or scorer actor that died, per "
                              "round, before the job fails")
    overlap: bool = Field(False, description="sample round r+1 while round r trains, from the weights round "
                          "r started from (one round off-policy): the rollout actors work during training "
                          "instead of waiting")


class DPOConfig(BaseModel):
    """The run's configuration. Field names and defaults follow TRL 1.x DPOConfig / TrainingArguments."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    _auto_reason: str | None = PrivateAttr(None)  # why reference.source auto became actor or local

    # --- model (TRL's ModelConfig, folded in) ---
    model_name_or_path: str | None = Field(None, description="model directory; None = the bundled tiny Llama")
    ref_model_name_or_path: str | None = Field(None, description="alias of reference.model_name_or_path")
    model_init_kwargs: dict[str, Any] = Field(default_factory=dict,
                                              description="extra from_pretrained kwargs")
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        None, description="weights dtype for from_pretrained (default float32 master weights; DeepSpeed "
        "casts for bf16/fp16)")
    attn_implementation: str | None = Field(None, description="eager | sdpa | flash_attention_2 (passed to "
                                            "from_pretrained)")
    trust_remote_code: bool = Field(False, description="allow model code from the model directory (off by "
                                    "default)")
    use_peft: bool = Field(False, description="train a LoRA adapter instead of the full model")
    lora_r: int = Field(16, ge=1, description="LoRA rank")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling alpha")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout (0 when disable_dropout)")
    lora_target_modules: list[str] | None = Field(None, description="module names to adapt (default: all "
                                                  "linear layers)")
    lora_modules_to_save: list[str] | None = Field(None, description="modules trained in full and saved with "
                                                   "the adapter (e.g. lm_head)")
    peft_adapter_path: str | None = Field(None, description="start from this existing adapter directory")
    load_in_4bit: bool = Field(False, description="QLoRA: 4-bit base via bitsandbytes (GPU only)")
    model_adapter_name: str | None = Field(None, description="name of the trained adapter (default "
                                           "'default')")
    ref_adapter_name: str | None = Field(None, description="name of the frozen reference adapter "
                                         "(reference.source ref_adapter)")
    merge_adapter: bool = Field(False, description="also save a merged full model, with its tokenizer, under "
                                 "output_dir/merged (loads with from_pretrained alone)")
    router_aux_loss_coef: float = Field(0.001, ge=0, description="weight of the MoE router load-balancing "
                                        "loss")
    output_router_logits: bool = Field(False, description="MoE: add the router load-balancing loss")

    # --- data ---
    dataset_name: str | None = Field(None, description="file/glob/dir (jsonl, parquet, csv, save_to_disk) or "
                                     "hub name; None = bundled")
    dataset_config: str | None = Field(None, description="hub dataset configuration name")
    dataset_train_split: str = Field("train", description="split (or file stem) to train on")
    dataset_test_split: str | None = Field("test", description="split (or file beside the training file) to "
                                           "evaluate on")
    eval_dataset_name: str | None = Field(None, description="a separate eval dataset (same forms as "
                                          "dataset_name)")
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="held-out fraction when there is no eval split")
    max_length: int | None = Field(1024, ge=1, description="truncate prompt+completion to this many tokens "
                                   "(None: no truncation)")
    truncation_mode: TruncationMode = Field("keep_start", description="keep_start: keep the first max_length "
                                            "tokens (rows whose prompt fills it are dropped); keep_end: keep "
                                            "the last")
    pad_to_multiple_of: int | None = Field(None, ge=1, description="pad batch length up to a multiple of "
                                           "this (tensor-core friendly on GPU)")
    length_bucketing: bool | Literal["auto"] = Field(
        False, description="batch rows of similar length together (less padding); auto: per pool of "
        "bucket_size_multiplier batches, when that saves at least 10% of the pool's padded tokens. Off by "
        "default (TRL's default): on the bundled demo it halved the SFT task accuracy (docs/data.md)")
    prefix_sharing: Literal["auto", "on", "off"] = Field(
        "auto", description="run each pair as one [prompt, chosen, rejected] row so the prompt is computed "
        "once (policy and reference); auto: on where the attention takes a custom 4-D mask (sdpa, eager) and "
        "the first batch agrees with the standard layout; on: skip that check; off: never (true/false also "
        "accepted)")
    prefix_attention: Literal["auto", "dense", "flex"] = Field(
        "auto", description="the attention of packed pairs (prefix sharing): dense: a 4-D mask through the "
        "model's sdpa/eager attention; flex: FlexAttention's block-sparse BlockMask (skips masked blocks, "
        "fused kernel; falls back to dense with the reason where it is missing or disagrees); auto: on a "
        "GPU, prefix_sharing auto times the first batch in the standard layout, dense and flex and keeps the "
        "fastest that agrees; on the CPU, dense")
    bucket_size_multiplier: int = Field(16, ge=1, description="rows per bucket pool = multiplier × batch "
                                        "size")
    on_bad_row: Literal["raise", "skip"] = Field("raise", description="raise: stop at the first bad row, "
                                                 "naming it; skip: drop and count bad rows by kind")
    max_dropped_fraction: float = Field(0.5, ge=0, le=1, description="stop the run (exit 3) when more than "
                                        "this fraction of a split's rows is dropped (on_bad_row: skip, "
                                        "prompts that fill max_length); a split with every row dropped "
                                        "always stops it; 1.0 = no limit")
    dataset_num_proc: int | None = Field(None, description="tokenization tasks in flight (default: the "
                                         "driver's cores)")
    max_train_samples: int | None = Field(None, ge=1, description="use at most this many training rows")
    max_eval_samples: int | None = Field(None, ge=1, description="use at most this many eval rows")

    # --- DPO ---
    beta: float = Field(0.1, gt=0, description="β: deviation from the reference (reward = β·log-ratio)")
    loss_type: list[str] = Field(default_factory=lambda: ["sigmoid"], description="one or more losses of the "
                                 "family (docs/losses.md)")
    loss_weights: list[float] | None = Field(None, description="one weight per loss_type (default 1 each)")
    label_smoothing: float = Field(0.0, ge=0, le=1, description="ε: cDPO on sigmoid, noise rate of robust, "
                                   "EXO's ε")
    rpo_alpha: float | None = Field(None, description="RPO: adds rpo_alpha × chosen NLL")
    use_weighting: bool = Field(False, description="WPO: weight each pair by its policy probability (no "
                                "gradient through the weight)")
    ld_alpha: float | None = Field(None, description="LD-DPO: weight of tokens past the shorter completion's "
                                   "length, in [0, 1]")
    group_pairs: Literal["all", "best_vs_rest", "best_vs_worst", "best_vs_random"] = Field(
        "all", description="prompt groups (rows with completions + scores/ranking): which pairs to train on; "
        "all: every pair whose score gap exceeds group_margin; best_vs_rest: the best against each response "
        "it beats; best_vs_worst: the best against the worst; best_vs_random: the best against one response "
        "it beats, drawn per row with data_seed (docs/data.md)")
    group_margin: float = Field(0.0, ge=0, description="prompt groups: a pair needs a score gap larger than "
                                "this (ties never pair)")
    f_divergence_type: str = Field("reverse_kl", description="reverse_kl | forward_kl | js_divergence | "
                                   "alpha_divergence (with sigmoid, sigmoid_norm, hinge, ipo, exo_pair, "
                                   "robust, discopop, sft, as TRL)")
    f_alpha_divergence_coef: float = Field(0.5, description="α of alpha_divergence, score "
                                           "(t^(α-1) - 1)/(α-1) as TRL 1.x; α = 1 is reverse KL, α = 0 "
                                           "forward KL; a pre-1.0 α is 1 - α here")
    discopop_tau: float = Field(0.05, gt=0, description="τ of the discopop loss")
    reference_free: bool = Field(False, description="TRL spelling of reference.source: none")
    precompute_ref_log_probs: bool = Field(False, description="TRL spelling of reference.source: precomputed")
    sync_ref_model: bool = Field(False, description="TR-DPO: mix the policy into the reference every "
                                 "ref_model_sync_steps")
    ref_model_mixup_alpha: float = Field(0.6, ge=0, le=1, description="TR-DPO α: π_ref ← α·π_θ + (1-α)·π_ref")
    ref_model_sync_steps: int = Field(512, ge=1,
                                      description="TR-DPO: optimizer steps between reference syncs")

    # --- TrainingArguments ---
    output_dir: str = Field("dpo_output", description="model, tokenizer, config, metrics, plot, report and "
                            "checkpoints go here")
    shared_dir: str | None = Field(
        default_factory=lambda: os.environ.get("DPO_RAY_SHARED_DIR") or None,
        description="storage every node mounts: relative output_dir, ray.storage_path and "
        "reference.cache_dir are taken against it, and the precomputed-reference cache defaults to "
        "<shared_dir>/ref_logps_cache (needed under `ray job submit --working-dir`, whose working copy Ray "
        "deletes); default $DPO_RAY_SHARED_DIR")
    learning_rate: float = Field(1e-6, gt=0, description="peak AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not on norms and biases)")
    adam_beta1: float = Field(0.9, description="AdamW β1")
    adam_beta2: float = Field(0.999, description="AdamW β2")
    adam_epsilon: float = Field(1e-8, description="AdamW ε")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping (0 = off)")
    per_device_train_batch_size: int = Field(8, ge=1, description="pairs per worker per micro-batch (prompt "
                                             "groups: groups, each with all its pairs)")
    per_device_eval_batch_size: int = Field(8, ge=1, description="pairs per worker per eval batch (prompt "
                                            "groups: groups)")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    num_train_epochs: float = Field(3.0, gt=0, description="epochs (fractions allowed) when max_steps is -1")
    max_steps: int = Field(-1, description="optimizer steps; -1 = from num_train_epochs")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="fraction of steps with linear warmup")
    warmup_steps: int | float = Field(0, ge=0, description="warmup steps (overrides warmup_ratio); a number "
                                      "in (0, 1) is a fraction of the run's steps, as in transformers 5 / "
                                      "TRL 1.16")
    lr_scheduler_type: str = Field("linear", description=f"{', '.join(SCHEDULES)} (transformers' schedules)")
    lr_scheduler_kwargs: dict[str, Any] = Field(default_factory=dict, description="the schedule's arguments "
                                                "in transformers' names, e.g. {num_cycles: 0.5} (cosine), "
                                                "{min_lr_rate: 0.1} (cosine_with_min_lr)")
    optim: str = Field("adamw_torch_fused", description="optimizer, TrainingArguments names: "
                       "adamw_torch_fused, adamw_torch (adamw_hf), adafactor, sgd, adagrad, rmsprop")
    optim_args: str | None = Field(None, description="optimizer arguments as 'k=v,k2=v2' (sgd: momentum, "
                                   "dampening, nesterov; adagrad; rmsprop)")
    logging_steps: int | float = Field(10, gt=0, description="log (console table, metrics.jsonl, "
                                       "TensorBoard) every N optimizer steps; a number in (0, 1) is a "
                                       "fraction of the run's optimizer steps, as in transformers")
    logging_first_step: bool = Field(False, description="also log after the first optimizer step")
    eval_on_start: bool = Field(False, description="evaluate once before the first step (a baseline)")
    eval_strategy: Literal["no", "steps", "epoch"] = Field("no", description="no | steps | epoch")
    eval_steps: int | float | None = Field(None, gt=0, description="eval every N steps (default "
                                           "logging_steps); a number in (0, 1) is a fraction of the run's "
                                           "optimizer steps, as in transformers")
    save_strategy: Literal["no", "steps", "epoch"] = Field("steps", description="no | steps | epoch "
                                                           "(checkpoints through ray.train.report)")
    save_steps: int | float = Field(500, gt=0, description="checkpoint every N steps; a number in (0, 1) is "
                                    "a fraction of the run's optimizer steps, as in transformers")
    save_total_limit: int | None = Field(None, ge=1, description="keep at most this many checkpoints")
    load_best_model_at_end: bool = Field(False, description="save the checkpoint with the best "
                                         "metric_for_best_model as the final model (needs save_strategy = "
                                         "eval_strategy)")
    metric_for_best_model: str | None = Field(None, description="eval metric that ranks checkpoints, e.g. "
                                              "loss or rewards/accuracies (default loss)")
    greater_is_better: bool | None = Field(None, description="whether a larger metric_for_best_model is "
                                           "better (default: false for *loss, else true)")
    resume_from_checkpoint: str | None = Field(None, description="a checkpoint directory, or 'latest': the "
                                               "newest complete checkpoint of run_name (no run_name: of the "
                                               "most recent run) under ray.storage_path or "
                                               "output_dir/ray_results")
    overwrite_output_dir: bool = Field(False, description="let a new run replace an earlier run's outputs in "
                                       "output_dir (else refused unless resuming)")
    seed: int = Field(42, description="seed for model init, data order and dropout")
    data_seed: int | None = Field(None, description="seed for data order (default seed)")
    bf16: bool | None = Field(None, description="None = auto: bf16 on GPU, fp32 on CPU")
    fp16: bool = Field(False, description="fp16 mixed precision (GPU)")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="recompute each layer's activations in the backward (less memory, ~1/3 more "
        "compute); auto: only for micro-batches whose activations would pass gradient_checkpointing_gib "
        "(under ZeRO-3: on, every rank must recompute alike)")
    gradient_checkpointing_gib: float = Field(
        1.0, gt=0, description="gradient_checkpointing auto: checkpoint a micro-batch whose activations, "
        "estimated from its tokens and the model's layers and widths, exceed this many GiB")
    disable_dropout: bool = Field(True, description="turn off dropout in the policy (and LoRA)")
    report_to: list[str] = Field(default_factory=lambda: ["tensorboard"], description="tensorboard, or none")
    run_name: str | None = Field(None, description="Ray Train run name, a plain name: the run's folder under "
                                 "ray.storage_path (default dpo_ray-<mode>-<time>-<random>)")

    # --- sections ---
    ray: RayConfig = Field(default_factory=RayConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    inspect: InspectConfig = Field(default_factory=InspectConfig)
    iterate: IterateConfig = Field(default_factory=IterateConfig)

    def __init__(self, **data):
        if isinstance(data.get("loss_type"), str):
            data["loss_type"] = [data["loss_type"]]
        if isinstance(data.get("report_to"), str):
            data["report_to"] = [data["report_to"]]
        # TrainingArguments' other spellings: None for output_dir (its default) and report_to (nothing), a
        # dict key given as a JSON string (transformers' _VALID_DICT_FIELDS)
        if "output_dir" in data and data["output_dir"] is None:
            del data["output_dir"]
        if "report_to" in data and data["report_to"] is None:
            data["report_to"] = []
        if isinstance(data.get("lr_scheduler_kwargs"), str) \
                and data["lr_scheduler_kwargs"].lstrip().startswith("{"):
            data["lr_scheduler_kwargs"] = yaml.safe_load(data["lr_scheduler_kwargs"])
        # TRL / TrainingArguments keys dpo_ray spells differently or does not have (dpo_ray/trl_keys.py)
        data, trl_problems = translate(data, set(type(self).model_fields))
        try:
            super().__init__(**data)
        except ValidationError as e:
            problems = trl_problems + problems_from_pydantic(e, known_keys())
            # The cross-field rules never ran; run them on the valid part so one error lists everything.
            reported = {key for key, _ in problems}
            problems += [pr for pr in _rule_problems(_without_invalid(data, e)) if pr[0] not in reported]
            raise ConfigError(problems) from None
        except _RuleViolations as e:
            raise ConfigError(trl_problems + e.problems) from None
        if trl_problems:
            raise ConfigError(trl_problems)

    @field_validator("run_name")
    @classmethod
    def _plain_run_name(cls, v):
        if v is not None and (not _PLAIN_NAME.fullmatch(v) or ".." in v):
            raise ValueError("must be a plain name (letters, digits and . _ - = , +, starting with a letter "
                             "or digit, no '/' and no '..', at most 200 characters): it names the run's "
                             "folder under ray.storage_path")
        return v

    @field_validator("prefix_sharing", mode="before")
    @classmethod
    def _prefix_sharing_bool(cls, v):
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _check_rules(self):
        problems = cross_field_problems(self)
        if problems:
            raise _RuleViolations(problems)
        # TRL spellings of the reference source resolve into the reference section; an unset source takes its
        # default (TRL's reference under PEFT), still marked as not given.
        source = effective_reference_source(self)
        if self.reference_free or self.precompute_ref_log_probs:
            self.reference.source = source
        elif self.reference_source_defaulted:
            self.reference.resolve_source(source)
            if source == "ref_adapter":  # TRL's names: the trained adapter "default", its frozen copy "ref"
                self.model_adapter_name = self.model_adapter_name or "default"
                self.ref_adapter_name = self.ref_adapter_name or "ref"
        if self.ref_model_name_or_path and not self.reference.model_name_or_path:
            self.reference.model_name_or_path = self.ref_model_name_or_path
        if self.load_best_model_at_end:  # transformers' defaults
            self.metric_for_best_model = self.metric_for_best_model or "loss"
            if self.greater_is_better is None:
                self.greater_is_better = not self.metric_for_best_model.endswith("loss")
        self.optim = canonical_optimizer(self.optim)
        self.loss_type = [canonical_loss_name(n) for n in self.loss_type]
        return self

    @property
    def reference_source_defaulted(self) -> bool:
        """True when reference.source was not given (nor reference_free / precompute_ref_log_probs), so the
        run uses the default: adapter_off / ref_adapter under PEFT without a reference model (as TRL), else
        actor."""
        return ("source" not in self.reference.model_fields_set and not self.reference_free
                and not self.precompute_ref_log_probs)

    def resolve_auto_reference(self, nodes: int) -> DPOConfig:
        """A copy with ``reference.source: auto`` decided for a cluster of ``nodes`` nodes
        (``choose_reference_source``), the reason kept for ``describe_reference``; self when the source is not
        auto."""
        if self.reference.source != "auto":
            return self
        source, why = choose_reference_source(self, nodes)
        out = self.model_copy(deep=True)
        out.reference.resolve_source(source)
        out._auto_reason = why
        return out

    def describe_reference(self) -> str:
        """One line for the run header: the reference source and where it came from."""
        src = self.reference.source
        what = {"auto": "decided when Ray is up (actor or local)",
                "actor": f"a Ray actor pool ({self.reference.num_actors} actor(s))",
                "local": "a frozen copy on each worker",
                "precomputed": "log-probs precomputed before training",
                "adapter_off": "the policy with its adapter disabled",
                "ref_adapter": f"the frozen adapter {self.ref_adapter_name!r}",
                "none": "none (reference-free)"}[src]
        if not self.needs_reference and src != "none":
            what += "; not used by " + ", ".join(self.loss_type)
        if self.reference_free or self.precompute_ref_log_probs:
            why = "reference_free" if self.reference_free else "precompute_ref_log_probs"
        elif self._auto_reason:
            why = f"reference.source auto: {self._auto_reason}"
        elif not self.reference_source_defaulted:
            why = "reference.source"
        elif src in ("adapter_off", "ref_adapter"):
            why = "default under PEFT, as TRL; reference.source: actor for a separate reference model"
        else:
            why = "default"
        return f"reference: {src} = {what} ({why})"

    def best_model_metric(self) -> tuple[str, bool] | None:
        """(eval metric key as logged, greater_is_better) for load_best_model_at_end, else None."""
        if not self.load_best_model_at_end:
            return None
        name = self.metric_for_best_model or "loss"
        return (name if name.startswith("eval_") else f"eval_{name}"), bool(self.greater_is_better)

    # --- derived values: one source for the batch arithmetic ---
    def loss_params(self) -> LossParams:
        return LossParams(self.beta, self.label_smoothing, self.discopop_tau, self.f_divergence_type,
                          self.f_alpha_divergence_coef)

    @property
    def data_order_seed(self) -> int:
        """The seed of the training rows' order (shuffles, prompt groups' pairing): data_seed, else seed, as
        transformers' Trainer falls back."""
        return self.data_seed if self.data_seed is not None else self.seed

    @property
    def uses_peft(self) -> bool:
        """The policy is a PEFT model: a new adapter (use_peft) or one loaded from peft_adapter_path."""
        return self.use_peft or self.peft_adapter_path is not None

    @property
    def needs_reference(self) -> bool:
        return self.reference.source != "none" and any(LOSSES[n].needs_reference for n in self.loss_type)

    def global_batch_size(self, world_size: int) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * world_size

    def use_bf16(self, on_gpu: bool) -> bool:
        # auto (None) means bf16 on GPU, unless the user asked for fp16 instead
        return on_gpu and not self.fp16 if self.bf16 is None else self.bf16

    def to_yaml(self, redact: bool = True) -> str:
        """The resolved config as YAML; secrets (``dpo_ray.redact``) shown as ``<redacted>`` unless ``redact``
        is false."""
        data = self.model_dump(mode="json")
        if redact:
            data = redact_secrets(data)
        return yaml.safe_dump(data, sort_keys=False)


_SECTIONS = ("ray", "reference", "deepspeed", "inspect")
REDACTED = _REDACTED


def redact_secrets(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of a dumped config with its secrets replaced (``dpo_ray.redact.redact``: credential-looking keys
    at any depth, every ray.runtime_env env var, credentials inside URLs)."""
    return redact(data)


def _without_invalid(data: dict[str, Any], err: ValidationError) -> dict[str, Any]:
    """``data`` minus every key pydantic rejected: a section's bad sub-key, else the top-level key."""
    out = {k: dict(v) if k in _SECTIONS and isinstance(v, dict) else v for k, v in data.items()}
    for e in err.errors():
        loc = e["loc"]
        if len(loc) > 1 and loc[0] in _SECTIONS and isinstance(out.get(loc[0]), dict):
            out[loc[0]].pop(loc[1], None)
        elif loc:
            out.pop(loc[0], None)
    return out


def _rule_problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    """The problems a DPOConfig built from ``data`` reports (the cross-field rules, for valid fields)."""
    try:
        DPOConfig(**data)
    except ConfigError as e:
        return e.problems
    return []


def flag_fields() -> dict[str, tuple[str, Any, str]]:
    """Flag name -> (dotted key, annotation, help) for every field, sections as --section.key."""
    out = {}
    for name, f in DPOConfig.model_fields.items():
        if isinstance(f.default_factory, type) and issubclass(f.default_factory, _Section):
            for sub, sf in f.default_factory.model_fields.items():
                out[f"{name}.{sub}"] = (f"{name}.{sub}", sf.annotation, sf.description or "")
        else:
            out[name] = (name, f.annotation, f.description or "")
    return out


def known_keys() -> list[str]:
    """Every key a config may hold: the fields (sections dotted) and the TRL keys dpo_ray translates or
    refuses."""
    return list(flag_fields()) + [k for k in TRL_KEYS if k not in DPOConfig.model_fields]
