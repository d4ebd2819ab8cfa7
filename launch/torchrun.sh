#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Multi-node training with torchrun (c10d rendezvous). Run the same command on every node; only
# --node-rank differs. After a failure, run it again (on as many nodes as are left, with
# --nnodes MIN:MAX to allow fewer): the trainer resumes from run_dir.
SCRIPT_NAME=torchrun.sh
USAGE="Usage: launch/torchrun.sh --config FILE [key=value ...] [options]

Options:
  --config FILE          training config (configs/...); key=value words after it override its keys
  --module NAME          training entry point (default pipeline.pretrain; pipeline.finetune to fine-tune)
  --nnodes N|MIN:MAX     nodes in the job (default 1). MIN:MAX makes the job elastic: it starts with
                         whatever nodes join (at least MIN), so a restart on fewer nodes works
  --node-rank R          this node's rank, 0 on the node named in --rdzv-endpoint (default 0)
  --nproc-per-node G     processes (GPUs) per node (default auto: all GPUs, or CPU count without GPUs)
  --rdzv-endpoint H:P    rendezvous on node 0 (required for more than one node); single-node runs
                         use torchrun --standalone
  --rdzv-id ID           job id shared by all nodes (default: derived from run_dir)
  --local-addr ADDR      address this node advertises (default: torchrun's hostname lookup)
  --max-restarts K       in-place restarts of failed workers by torchrun (default 0)
  --dry-run              print the exact command and stop

Example (two nodes; node 1 runs the same with --node-rank 1):
  launch/torchrun.sh --config configs/pretrain/in1k_coatnet-0.yaml --nnodes 2 --node-rank 0 \\
      --nproc-per-node 8 --rdzv-endpoint node0.cluster:29400"

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG="" MODULE=pipeline.pretrain NNODES=1 NODE_RANK=0 NPROC=auto RDZV_ENDPOINT="" RDZV_ID="" LOCAL_ADDR=""
MAX_RESTARTS=0
declare -A FLAGS=()
declare -A OPTIONS=([--config]=CONFIG [--module]=MODULE [--nnodes]=NNODES [--node-rank]=NODE_RANK
  [--nproc-per-node]=NPROC [--rdzv-endpoint]=RDZV_ENDPOINT [--rdzv-id]=RDZV_ID [--local-addr]=LOCAL_ADDR
  [--max-restarts]=MAX_RESTARTS)
parse_args "$@"
take_overrides
[[ $NNODES =~ ^[0-9]+(:[0-9]+)?$ ]] || die "--nnodes must be N or MIN:MAX, got '$NNODES'"
require_int NODE_RANK --node-rank
require_int MAX_RESTARTS --max-restarts
check_config
trainer_args

cmd=("$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC" --max-restarts "$MAX_RESTARTS")
if [[ $NNODES == 1 && -z $RDZV_ENDPOINT ]]; then
  cmd+=(--standalone)
else
  require RDZV_ENDPOINT --rdzv-endpoint "HOST:PORT of node 0 for the c10d rendezvous (every node passes the same)"
  [[ $RDZV_ENDPOINT == *:* ]] || die "--rdzv-endpoint must be HOST:PORT, got '$RDZV_ENDPOINT'"
  # The same id on every node and every relaunch: it names the job, not one attempt.
  [[ -n $RDZV_ID ]] || RDZV_ID=coatnet-$(printf '%s' "$RUN_DIR" | tr -c 'A-Za-z0-9_-' '-')
  cmd+=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT"
    --rdzv-id "$RDZV_ID")
  [[ -z $LOCAL_ADDR ]] || cmd+=(--local-addr "$LOCAL_ADDR")
fi
cmd+=(-m "${TRAINER_ARGS[@]}")

note "node rank $NODE_RANK of $NNODES; rendezvous ${RDZV_ENDPOINT:-standalone}; run_dir $RUN_DIR"
run_exec "${cmd[@]}"
