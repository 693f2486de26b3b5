#!/usr/bin/env bash
# Train with the DeepSpeed engine through the `deepspeed` launcher (ssh/pdsh to the hosts of a hostfile).
#   launch/deepspeed_launch.sh CONFIG.yaml [key=value ...]
# Environment knobs:
#   HOSTFILE     DeepSpeed hostfile ("host slots=N" lines; default launch/deepspeed_hostfile);
#                HOSTFILE=none runs on this machine only
#   NPROC        processes on this machine when HOSTFILE=none (default: visible GPUs, else 2 CPU processes)
#   ZERO_STAGE   ZeRO stage 0-3 (default 1: optimizer state partitioned, weights.N.pkl resumable)
#   MASTER_PORT  rendezvous port (default 29500)
#   PYTHON       python with distdrgn and deepspeed installed (default: python)
set -euo pipefail
if [ $# -lt 1 ]; then echo "usage: $0 CONFIG.yaml [key=value ...]" >&2; exit 2; fi
PY=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")" && pwd)
HOSTFILE=${HOSTFILE:-$HERE/deepspeed_hostfile}
OPTS=(--master_port "${MASTER_PORT:-29500}")
if [ "$HOSTFILE" = none ]; then
  NPROC=${NPROC:-$($PY -c "import torch; print(torch.cuda.device_count() or 2)")}
  # a missing hostfile makes the launcher use localhost with --num_gpus slots
  OPTS+=(--hostfile /dev/null --num_gpus "$NPROC")
else
  OPTS+=(--hostfile "$HOSTFILE")
fi
# The launcher sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR for every process; distdrgn.train
# then joins with deepspeed.init_distributed (NCCL on GPU, gloo on CPU).
exec $PY -m deepspeed.launcher.runner "${OPTS[@]}" --no_local_rank --module distdrgn.train \
  "$@" train.engine=deepspeed "train.zero_stage=${ZERO_STAGE:-1}"
