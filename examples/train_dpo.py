"""TRL's DPO quick start, on Ray: the same script shape, ``dpo_ray`` spelling.

    # TRL                                         # dpo_ray
    from trl import DPOConfig, DPOTrainer          from dpo_ray import DPOConfig, DPOTrainer
    accelerate launch train_dpo.py                 python examples/train_dpo.py

With no arguments it trains the bundled tiny Llama on the bundled preference task (CPU, a few minutes):

    $ python examples/train_dpo.py

The seed's recipe, once the model and data are on disk (dpo_ray downloads nothing at run time):

    $ python examples/train_dpo.py --model ./Qwen2-0.5B-Instruct --dataset ./ultrafeedback_binarized \
        --output_dir Qwen2-0.5B-DPO --gpu --num_workers 8 --max_steps -1 \
        # not run by the tests: needs the model on disk and GPUs

Where it runs: with no RAY_ADDRESS, ``train()`` starts a local Ray in this process; with RAY_ADDRESS set
(or under ``ray job submit ... -- python examples/train_dpo.py``) the same code joins that cluster; under a
job, a relative ``--output_dir`` lands in ``$DPO_RAY_SHARED_DIR`` (set it in the job's runtime_env env_vars)
and is refused without it: the job's working directory is node-local and deleted after the job.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dpo_ray import DPOConfig, DPOTrainer


def load_preference_dataset(name: str):
    """A ``datasets.Dataset`` from a save_to_disk dir, a .jsonl/.json/.parquet/.csv file, or a hub name."""
    import datasets

    path = Path(name)
    if path.is_dir() and (path / "dataset_dict.json").exists():
        return datasets.load_from_disk(str(path))["train"]
    if path.is_dir() and (path / "dataset_info.json").exists():
        return datasets.load_from_disk(str(path))
    builders = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    if path.is_file() and path.suffix in builders:
        return datasets.load_dataset(builders[path.suffix], data_files=str(path), split="train")
    return datasets.load_dataset(name, split="train")  # a hub name: needs a machine that reaches the hub


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the bundled tiny Llama)")
    p.add_argument("--dataset", default=None, help="preference data (default: the bundled task)")
    p.add_argument("--output_dir", default="tiny-dpo")
    p.add_argument("--max_steps", type=int, default=20, help="-1 trains num_train_epochs (1) instead")
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16, gradient checkpointing")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)

    # TRL: model = AutoModelForCausalLM.from_pretrained(...). A directory path is what dpo_ray wants: each
    # Ray worker loads it itself. An in-memory model also works; it is shipped through the object store.
    model = args.model  # None -> the bundled tiny Llama
    tokenizer = None
    if args.model is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
    train_dataset = load_preference_dataset(args.dataset) if args.dataset else None  # None -> bundled

    training_args = DPOConfig(
        output_dir=args.output_dir,
        logging_steps=5 if args.model is None else 25,
        max_steps=args.max_steps,
        num_train_epochs=1,
        learning_rate=5e-4 if args.model is None else 5e-7,  # tiny model from scratch vs TRL's recipe
        per_device_train_batch_size=8,
        max_length=128 if args.model is None else 1024,
        save_strategy="no",
        bf16=args.gpu,
        gradient_checkpointing=args.gpu,
        report_to=[],
        ray={"num_workers": args.num_workers, "use_gpu": args.gpu,
             "resources_per_worker": {"CPU": 4} if args.gpu else {"CPU": 0.5}},
        reference={"source": "actor", "num_cpus": 0.5},
    )
    trainer = DPOTrainer(model=model, args=training_args, train_dataset=train_dataset,
                         processing_class=tokenizer)
    result = trainer.train()

    m = result.metrics
    print(f"done: {result.report['steps']} steps; loss {m.get('loss', float('nan')):.4f}, "
          f"rewards/accuracies {m.get('rewards/accuracies', float('nan')):.3f}, "
          f"rewards/margins {m.get('rewards/margins', float('nan')):.4f}")
    print(f"model, tokenizer, metrics.jsonl, metrics.png in {result.output_dir}")


if __name__ == "__main__":
    main()
