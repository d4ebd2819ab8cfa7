#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Multi-node training with DeepSpeed's launcher and a hostfile: from one machine over pdsh (default),
# or with --no-ssh on every node (the same command, each with its own --node-rank).
# After a failure, run it again, with a dead node removed from the hostfile (or --exclude / --num-nodes):
# the trainer resumes from run_dir on the new world size.
SCRIPT_NAME=deepspeed.sh
USAGE="Usage: launch/deepspeed.sh --hostfile FILE --config FILE [key=value ...] [options]

Options:
  --config FILE        training config (configs/...); key=value words after it override its keys
  --module NAME        training entry point (default pipeline.pretrain; pipeline.finetune to fine-tune)
  --hostfile FILE      'HOST slots=GPUS' per line, node 0 first (see launch/hostfile.example)
  --num-nodes N        use only the first N hosts of the hostfile
  --num-gpus G         use only the first G GPUs of each host
  --exclude SPEC       hosts/GPUs to leave out, DeepSpeed syntax: 'host3' or 'host3:0,1@host4'
  --master-port P      port of the rendezvous on node 0 (default: DeepSpeed's, 29500)
  --master-addr ADDR   address of node 0 (pdsh mode: default its 'hostname -I'; required with --no-ssh)
  --no-ssh             launch only this node (run the command on every node, no pdsh/ssh needed)
  --node-rank R        this node's index in the hostfile (required with --no-ssh)
  --dry-run            print the exact command and stop

Examples:
  launch/deepspeed.sh --hostfile hostfile --config configs/pretrain/in21k_coatnet-3.yaml
  # on each node i of the hostfile, without ssh:
  launch/deepspeed.sh --hostfile hostfile --no-ssh --node-rank i --master-addr node0 \\
      --config configs/pretrain/in21k_coatnet-3.yaml"

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG="" MODULE=pipeline.pretrain HOSTFILE="" NUM_NODES="" NUM_GPUS="" EXCLUDE="" MASTER_PORT="" MASTER_ADDR=""
NO_SSH=0 NODE_RANK=""
declare -A FLAGS=([--no-ssh]=NO_SSH)
declare -A OPTIONS=([--config]=CONFIG [--module]=MODULE [--hostfile]=HOSTFILE [--num-nodes]=NUM_NODES
  [--num-gpus]=NUM_GPUS [--exclude]=EXCLUDE [--master-port]=MASTER_PORT [--master-addr]=MASTER_ADDR
  [--node-rank]=NODE_RANK)
# pdsh_exports_safe: the environment DeepSpeed copies into the pdsh command string (variables named MLFLOW*,
# PYTHON*, MV2*, UCX*, the accelerator's NCCL*/CCL*..., and .deepspeed_env lines) holds nothing a shell expands
# (it quotes such values in double quotes, inside which $(...) and backquotes still run).
pdsh_exports_safe() {
  local name file line
  for name in $(compgen -e); do
    [[ $name =~ ^(MLFLOW|PYTHON|MV2|UCX|NCCL|CCL|I_MPI|FI_|KMP|OMP|HCCL|HABANA|PT_) ]] || continue
    [[ ${!name} != *[\$\`\\\"$'\n']* ]] || die "environment variable $name holds \$, \`, \\ or a quote, which the pdsh launch would run in a shell on every node: unset it or launch with --no-ssh"
  done
  for file in "$HOME/${DS_ENV_FILE:-.deepspeed_env}" "./${DS_ENV_FILE:-.deepspeed_env}"; do
    [[ -f $file ]] || continue
    while IFS= read -r line; do
      [[ $line != *[\$\`\\\"\;\&\|\<\>\(\)]* ]] || die "$file: line ${line@Q} would run in a shell on every node (DeepSpeed exports it unquoted): remove it"
    done <"$file"
  done
}

parse_args "$@"
take_overrides
require HOSTFILE --hostfile "a DeepSpeed hostfile ('HOST slots=GPUS' per line; see launch/hostfile.example)"
[[ -f $HOSTFILE ]] || die "hostfile $HOSTFILE not found (see launch/hostfile.example)"
hosts=$(grep -cE '^[[:space:]]*[^#[:space:]]+[[:space:]]+slots=[0-9]+' "$HOSTFILE" || true)
((hosts > 0)) || die "hostfile $HOSTFILE has no 'HOST slots=N' line"
while read -r host _; do require_host "hostfile $HOSTFILE: host" "$host"; done < <(
  grep -E '^[[:space:]]*[^#[:space:]]+[[:space:]]+slots=' "$HOSTFILE")
[[ -z $MASTER_ADDR ]] || require_host --master-addr "$MASTER_ADDR"
[[ -z $NUM_NODES || -z $EXCLUDE ]] || die "--num-nodes and --exclude cannot be combined (DeepSpeed refuses it)"
cmd=("$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE")
[[ -z $NUM_NODES ]] || { require_int NUM_NODES --num-nodes; cmd+=(--num_nodes "$NUM_NODES"); }
[[ -z $NUM_GPUS ]] || { require_int NUM_GPUS --num-gpus; cmd+=(--num_gpus "$NUM_GPUS"); }
[[ -z $EXCLUDE ]] || cmd+=(--exclude "$EXCLUDE")
[[ -z $MASTER_PORT ]] || { require_int MASTER_PORT --master-port; cmd+=(--master_port "$MASTER_PORT"); }
if ((NO_SSH)); then
  require NODE_RANK --node-rank "this node's index in $HOSTFILE (0 for the first host) when using --no-ssh"
  require_int NODE_RANK --node-rank
  require MASTER_ADDR --master-addr "the address of node 0 (the first host of $HOSTFILE) when using --no-ssh"
  ((NODE_RANK < hosts)) || die "--node-rank $NODE_RANK is out of range: $HOSTFILE lists $hosts host(s)"
  cmd+=(--no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
  mode="node rank $NODE_RANK of $hosts (no ssh); master ${MASTER_ADDR}:${MASTER_PORT:-29500}"
else
  [[ -z $NODE_RANK ]] || die "--node-rank only applies with --no-ssh (pdsh starts every node from here)"
  [[ -z $MASTER_ADDR ]] || cmd+=(--master_addr "$MASTER_ADDR")
  mode="pdsh launch of $hosts host(s) from $HOSTFILE"
  if ! command -v pdsh >/dev/null && ((hosts > 1)); then
    ((DRY_RUN)) || die "pdsh not found: install pdsh, or run with --no-ssh --node-rank R on every node"
    mode+=" (pdsh not found here: install it before launching, or use --no-ssh)"
  fi
fi
check_config
trainer_args
cmd+=(--module "${TRAINER_ARGS[@]}")
note "$mode; run_dir $RUN_DIR"
if ((!NO_SSH)); then
  # DeepSpeed's PDSHRunner: `export K=V; cd CWD; PYTHON -u -m deepspeed.launcher.launch ... --module ARGS` as one
  # string; anything a shell would interpret there is refused, so the line below is what each host really runs.
  require_shell_safe "the checkout path (DeepSpeed's remote cd)" "$PWD"
  require_shell_safe "the interpreter path" "$PYTHON"
  require_shell_safe "argument" "${TRAINER_ARGS[@]}"
  pdsh_exports_safe
  note "each host runs: [export ...;] cd $PWD; $PYTHON -u -m deepspeed.launcher.launch --world_info=... --node_rank=%n --master_addr=${MASTER_ADDR:-...} --master_port=${MASTER_PORT:-29500} --module ${TRAINER_ARGS[*]}"
fi
run_exec "${cmd[@]}"
