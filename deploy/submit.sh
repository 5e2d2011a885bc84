#!/usr/bin/env bash
# Submit a dpo_ray run to an existing Ray cluster through its Jobs API (the dashboard, port 8265).
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
# Environment:
#   RAY_ADDRESS          the Jobs API: http://HOST:8265 (default http://127.0.0.1:8265). Not HOST:6379: that
#                        is the GCS port `ray start --address` joins, not the Jobs API.
#   DPO_RAY_SHARED_DIR   a directory on storage every node mounts (/mnt/shared/outputs): relative output_dir,
#                        ray.storage_path and reference.cache_dir are taken against it, and the precomputed
#                        reference cache defaults to DPO_RAY_SHARED_DIR/ref_logps_cache. Without it a relative
#                        output_dir is refused: under a job it would land in the job's node-local working
#                        directory, which Ray deletes after the job.
#   RAY_AUTH_MODE=token + RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token)
#                        for a cluster with token authentication (docs/deploy.md, "Authentication").
#   SUBMIT_ARGS          extra `ray job submit` options, e.g. "--no-wait --submission-id run1".
#
# Outputs: output_dir is a path on the cluster, not on this machine. On a multi-node cluster give a
# path every node shares (--output_dir /mnt/shared/outputs/NAME, or DPO_RAY_SHARED_DIR).
set -euo pipefail

ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
case "$ADDRESS" in
  http://*|https://*) ;;
  *) echo "submit.sh: RAY_ADDRESS=$ADDRESS is not the Jobs API; give http://HOST:8265 (the dashboard port)," \
          "not the GCS address HOST:6379" >&2
     exit 2 ;;
esac
CONFIG="${1:-examples/tiny_demo.yaml}"
shift || true

# env_vars: do not repeat the variables dpo_ray's driver sets itself (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE,
# HF_DATASETS_OFFLINE, TOKENIZERS_PARALLELISM, RAY_TRAIN_V2_ENABLED): Ray refuses to merge a job's and a
# driver's runtime_env that both set the same variable.
SHARED_ENV=""
if [ -n "${DPO_RAY_SHARED_DIR:-}" ]; then
  SHARED_ENV=", \"DPO_RAY_SHARED_DIR\": \"$DPO_RAY_SHARED_DIR\""
fi
RUNTIME_ENV='{"env_vars": {"PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"'"$SHARED_ENV"'},
  "excludes": [".git", ".venv", "**/__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache",
               "demo_output", "dpo_output", "*_output", "bench/results", "*.safetensors", "*.bin",
               ".env", "**/.env", "*.pem", "*.key"]}'

# shellcheck disable=SC2086  # SUBMIT_ARGS is a list of options
exec ray job submit --address "$ADDRESS" ${SUBMIT_ARGS:-} --working-dir . --runtime-env-json "$RUNTIME_ENV" \
  -- python -m dpo_ray train --config "$CONFIG" "$@"
