#!/usr/bin/env bash
# Submit a dpo_ray run to an existing Ray cluster through its Jobs API (dashboard port 8265).
#
#   deploy/submit.sh                                    # examples/tiny_demo.yaml
#   deploy/submit.sh examples/lora.yaml --max_steps 50  # any config; extra args are dpo-ray flags
#   RAY_ADDRESS=http://127.0.0.1:8265 deploy/submit.sh ...
#
# Run it from the repository root. --working-dir uploads this checkout (minus the excludes) to the
# cluster, so the job runs this code and can read examples/*.yaml; the cluster needs dpo_ray's
# dependencies installed (the deploy/Dockerfile image has them). On KubeRay, port-forward first:
#   kubectl port-forward svc/dpo-ray-head-svc 8265:8265
#
# Outputs: output_dir is a path on the cluster, not on this machine. On a multi-node cluster give a
# path every node shares (--output_dir /mnt/shared/outputs/NAME); a node-local default would be
# written on whichever node runs rank 0.
set -euo pipefail

ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
CONFIG="${1:-examples/tiny_demo.yaml}"
shift || true

# env_vars: do not repeat the variables dpo_ray's driver sets itself (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE,
# HF_DATASETS_OFFLINE, TOKENIZERS_PARALLELISM, RAY_TRAIN_V2_ENABLED): Ray refuses to merge a job's and a
# driver's runtime_env that both set the same variable.
RUNTIME_ENV='{"env_vars": {"PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"},
  "excludes": [".git", ".venv", "**/__pycache__", "*.egg-info", ".pytest_cache",
               "demo_output", "dpo_output", "*_output", "bench/results", "*.safetensors", "*.bin"]}'

exec ray job submit --address "$ADDRESS" --working-dir . --runtime-env-json "$RUNTIME_ENV" \
  -- python -m dpo_ray train --config "$CONFIG" "$@"
