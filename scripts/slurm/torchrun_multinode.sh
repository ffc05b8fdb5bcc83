#!/bin/bash
# Run one talr config on NNODES nodes x NPROC_PER_NODE GPUs with torchrun: start this script once on every node.
#
#   # on each node (NODE_RANK 0 .. NNODES-1; MASTER_ADDR = node 0's address, reachable from all nodes):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 scripts/slurm/torchrun_multinode.sh configs/paper/...yaml [overrides]
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 scripts/slurm/torchrun_multinode.sh configs/paper/...yaml [overrides]
#   # or elastic rendezvous (no NODE_RANK): RDZV_ENDPOINT=node0:29400 RDZV_ID=run42 NNODES=2 scripts/slurm/...
#   # inside a SLURM allocation, one task per node: srun --ntasks-per-node=1 scripts/slurm/torchrun_multinode.sh ...
#
# torchrun starts NPROC_PER_NODE processes per node and Lightning's own TorchElasticEnvironment reads RANK,
# LOCAL_RANK, WORLD_SIZE, GROUP_RANK and MASTER_ADDR/PORT from it (it takes precedence over SLURMEnvironment,
# so the srun form above works too). The same scaling overrides as train.sbatch (scripts/slurm/scale_args.py):
# num_nodes, devices, FSDP2 data_parallel_size, accumulate_grad_batches (global batch kept; ACCUMULATE=K
# overrides), CheckpointOnSigterm, `--ckpt_path last`.
#
# Restarts: with MAX_RESTARTS > 0 torchrun restarts every worker after a failure, and the rerun resumes from the
# newest last.ckpt. A SIGTERM to torchrun is forwarded to the workers (then SIGKILL after 30 s): Lightning stops
# after the running step and CheckpointOnSigterm writes last.ckpt. Run and checkpoint directories (relative to
# TALR_WORKDIR, default the current directory) must be on storage every node sees.
set -uo pipefail
if [ $# -lt 1 ]; then
  echo "usage: NNODES=N NODE_RANK=i MASTER_ADDR=host $0 CONFIG.yaml [talr fit overrides]" >&2
  exit 2
fi
CONFIG=$1
shift
cd "${TALR_WORKDIR:-$PWD}" || exit 2
PYTHON=${PYTHON:-python}
NNODES=${NNODES:?set NNODES}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-0}
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

SCALE_OPTS=(--nodes "$NNODES" --gpus-per-node "$NPROC_PER_NODE")
[ -n "${ACCUMULATE:-}" ] && SCALE_OPTS+=(--accumulate "$ACCUMULATE")
SCALE=$("$PYTHON" scripts/slurm/scale_args.py "${SCALE_OPTS[@]}" -- --config "$CONFIG" "$@") || exit 2
mapfile -t SCALE_ARGS <<< "$SCALE"

if [ -n "${RDZV_ENDPOINT:-}" ]; then
  LAUNCH=(--rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-talr}")
else
  LAUNCH=(--node_rank "${NODE_RANK:?set NODE_RANK (or RDZV_ENDPOINT)}" --master_addr "${MASTER_ADDR:?set MASTER_ADDR}"
          --master_port "$MASTER_PORT")
fi
CMD=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" "${LAUNCH[@]}"
     --max_restarts "$MAX_RESTARTS" -m talr fit --config "$CONFIG" "$@" "${SCALE_ARGS[@]}")

if [ -n "${TALR_DRY_RUN:-}" ]; then  # print the command, one argument per line (tests/test_multinode.py)
  printf '%s\n' "${CMD[@]}"
  exit 0
fi
exec "${CMD[@]}"
