#!/usr/bin/env bash
# Train on every GPU of one node (or N CPU processes with gloo when there is no GPU).
#   launch/single_node.sh CONFIG.yaml [key=value ...]
# NPROC defaults to the number of visible GPUs, else 2 CPU processes.
set -euo pipefail
if [ $# -lt 1 ]; then echo "usage: $0 CONFIG.yaml [key=value ...]" >&2; exit 2; fi
PY=${PYTHON:-python}
if [ -z "${NPROC:-}" ]; then
  NPROC=$($PY -c "import torch; print(torch.cuda.device_count() or 2)")
fi
exec $PY -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m distdrgn.train "$@"
