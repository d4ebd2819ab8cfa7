# shellcheck shell=bash
# Shared by the scripts in launch/: option parsing, --dry-run printing, checks of required settings.
# Sourced, never run. A script sets, before `parse_args "$@"`:
#   USAGE="..."                                   printed by --help and after a usage error
#   declare -A OPTIONS=([--nnodes]=NNODES ...)     options that take a value -> the variable they set
#   declare -A FLAGS=([--no-ssh]=NO_SSH ...)       options without a value   -> the variable set to 1
# and gets back DRY_RUN (0/1), POSITIONAL (other words) and REST (the words after `--`).
# Training launchers then call `take_overrides` (POSITIONAL -> OVERRIDES, all key=value) and
# `check_config` (validates --config and the overrides with pipeline.config, sets RUN_DIR).
#
# Resume contract: nothing here (or in any launcher) deletes or renames run_dir. Launching the same
# config and overrides again, on any number of nodes, lets the trainer resume from run_dir by itself.

set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$LAUNCH_DIR")
SCRIPT_NAME=${SCRIPT_NAME:-$(basename "$0")}
DRY_RUN=0
POSITIONAL=()
REST=()
OVERRIDES=()
RUN_DIR=""

# The interpreter every launched process uses: $PYTHON, else this checkout's .venv, else python3.
# Multi-node launches assume the same path exists on every node (a shared file system).
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $REPO_ROOT/.venv/bin/python ]]; then PYTHON=$REPO_ROOT/.venv/bin/python; else PYTHON=python3; fi
fi

die() {
  printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2
  exit 2
}

log() { printf '[%s] %s\n' "$SCRIPT_NAME" "$*" >&2; }

# Everything launched from here (ranks, Ray nodes, their files) is private to the user unless $COATNET_UMASK
# says otherwise (e.g. 027: readable by the group); the Python entry points apply the same (core.files).
UMASK=${COATNET_UMASK:-077}
[[ $UMASK =~ ^0?[0-7]{3}$ ]] || die "COATNET_UMASK=${UMASK@Q} is not an octal umask such as 077 or 027; fix or unset it"
(( (8#$UMASK & 8#022) == 8#022 )) || die "COATNET_UMASK=${UMASK@Q} lets group or others write run folders and checkpoints, which a resume then refuses as possibly tampered with; use 077, 027 or 022"
umask "$UMASK"

# Words a remote shell takes as they are: DeepSpeed's pdsh launch joins its arguments into one shell
# command string run on every node, unquoted (`x;cmd`, `$(cmd)` would run there).
# [ ] too: the planner's selective-recompute override is a YAML list, model.activation_checkpointing=[0,1]
# (a glob in a remote shell only if a file of that very name exists; it runs nothing).
SHELL_SAFE='^[][A-Za-z0-9_@%+=:,./-]+$'
# require_shell_safe WHAT WORD...: die naming the first word a remote shell would interpret.
require_shell_safe() {
  local what=$1 word
  shift
  for word in "$@"; do
    [[ $word =~ $SHELL_SAFE ]] || die "$what ${word@Q} holds characters a remote shell would interpret (the pdsh launch runs it inside one shell command on every node): use only letters, digits and _@%+=:,./-[] there, or launch with --no-ssh on each node"
  done
}

# require_host WHAT HOST: a host name or IPv4/IPv6 address (never an ssh option such as -oProxyCommand=...).
HOST_RE='^([A-Za-z0-9][A-Za-z0-9.-]*|[0-9A-Fa-f]*:[0-9A-Fa-f:.]*)$'
require_host() {
  [[ $2 =~ $HOST_RE ]] || die "$1 ${2@Q} is not a host name or IP address (letters, digits, '.', '-'; ':' for IPv6): fix it"
}

usage() { printf '%s\n' "$USAGE"; }

# quote WORD...: the words as one shell-safe line (what a user can copy and paste).
quote() {
  local word out=""
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+=" $word"
    else
      out+=" '${word//\'/\'\\\'\'}'"
    fi
  done
  printf '%s' "${out# }"
}

# run CMD...: print the exact command ("+ ..."), then run it unless --dry-run.
run() {
  printf '+ %s\n' "$(quote "$@")"
  if ((DRY_RUN)); then return 0; fi
  "$@"
}

# run_exec CMD...: like run, but the command replaces this shell (signals reach it directly).
run_exec() {
  printf '+ %s\n' "$(quote "$@")"
  if ((DRY_RUN)); then exit 0; fi
  exec "$@"
}

# run_bg CMD...: like run, but in the background; the pid is appended to BG_PIDS.
BG_PIDS=()
run_bg() {
  printf '+ %s &\n' "$(quote "$@")"
  if ((DRY_RUN)); then return 0; fi
  "$@" &
  BG_PIDS+=($!)
}

# note TEXT: an explanatory line in the dry-run/launch transcript (commented, so it stays copy-pastable).
note() { printf '# %s\n' "$*"; }

parse_args() {
  local arg name
  while (($#)); do
    arg=$1
    case $arg in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --) shift; REST=("$@"); return 0 ;;
      --*=*) name=${arg%%=*}; shift; set -- "$name" "${arg#*=}" "$@"; continue ;;
      --*)
        if [[ -n ${FLAGS[$arg]+x} ]]; then
          printf -v "${FLAGS[$arg]}" '%s' 1
        elif [[ -n ${OPTIONS[$arg]+x} ]]; then
          (($# >= 2)) || die "option $arg needs a value (see --help)"
          printf -v "${OPTIONS[$arg]}" '%s' "$2"
          shift
        else
          die "unknown option $arg (see --help)"
        fi
        ;;
      *) POSITIONAL+=("$arg") ;;
    esac
    shift
  done
}

# take_overrides: every positional word must be a dotted key=value override of the config.
take_overrides() {
  local word
  for word in ${POSITIONAL[@]+"${POSITIONAL[@]}"}; do
    [[ $word == *=* && $word != -* ]] || die "unexpected argument '$word': config overrides look like key=value (e.g. train.steps=100)"
    OVERRIDES+=("$word")
  done
}

# require NAME FLAG HINT: fail with one line when the variable NAME is empty.
require() {
  [[ -n ${!1:-} ]] || die "missing $2: $3"
}

# require_int NAME FLAG: the variable NAME holds a non-negative integer.
require_int() {
  [[ ${!1} =~ ^[0-9]+$ ]] || die "$2 must be a non-negative integer, got '${!1}'"
}

# check_config: --config exists and, with the overrides, passes pipeline.config; sets RUN_DIR and
# says whether the trainer will resume (a complete checkpoint in run_dir) or start fresh.
check_config() {
  require CONFIG --config "the training config YAML, e.g. --config configs/pretrain/in1k_coatnet-0.yaml"
  [[ -f $CONFIG ]] || die "config file $CONFIG not found"
  local out mode=pretrain
  # The same defaults the launched module will apply under the file (fine-tune has its own run_dir, lr, ...).
  [[ ${MODULE:-} != pipeline.finetune ]] || mode=finetune
  local last
  if ! out=$("$PYTHON" -m launch.config_check --config "$CONFIG" --mode "$mode" ${OVERRIDES[@]+"${OVERRIDES[@]}"} 2>&1); then
    last=${out##*$'\n'}
    die "${last#error: }"  # config_check prints the CLIs' `error: ...` line; die adds the script's own prefix
  fi
  RUN_DIR=${out##*$'\n'}
  # The trainer resumes from the newest checkpoint with a complete.json marker, not from DeepSpeed's
  # `latest` (a kill during a save can leave `latest` naming a half-written one). Tags are zero-padded.
  local newest=""
  for marker in "$RUN_DIR"/checkpoints/step_*/complete.json; do
    [[ -f $marker ]] && newest=$(basename "$(dirname "$marker")")
  done
  if [[ -n $newest ]]; then
    note "resume: $RUN_DIR/checkpoints -> $newest; the trainer continues from it (any world size)"
  else
    note "fresh run: no checkpoint in $RUN_DIR yet; relaunching this same command resumes from $RUN_DIR"
  fi
}

# trainer_args: the training module and its arguments, identical on every node and every relaunch
# (the launcher puts its own "run as a module" flag in front: torchrun -m, deepspeed --module).
trainer_args() {
  # shellcheck disable=SC2034  # read by the launcher that sourced this file
  TRAINER_ARGS=("$MODULE" --config "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"})
}

# is_local HOST: true for addresses that name this machine (run there without ssh).
is_local() {
  case $1 in
    127.0.0.1 | localhost | "$(hostname)" | "$(hostname -f 2>/dev/null || true)") return 0 ;;
    *) return 1 ;;
  esac
}

# free_port: a TCP port nobody on this machine listens on now (bind to port 0).
free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_for_port HOST PORT SECONDS: poll until something accepts connections (bash's /dev/tcp).
wait_for_port() {
  local host=$1 port=$2 deadline=$((SECONDS + $3))
  until (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}
