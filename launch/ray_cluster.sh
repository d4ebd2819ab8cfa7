#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Start or stop a Ray cluster for shard jobs on machines you list: the head on one, a worker on each
# of the others (over ssh; 127.0.0.1/localhost/this host run here). Each node runs `ray start --block`
# detached, with its pid recorded under --temp-dir on that node, so `stop` ends exactly the processes
# `start` made (never `ray stop`, which would kill every Ray of this user on the machine).
# Security: `ray start` replaces a loopback --node-ip-address by the machine's address and its GCS
# listens on every interface, so the cluster always uses Ray token authentication with a fresh token
# made for it (TEMP_DIR/auth_token, mode 600, copied to remote nodes over ssh). Clients (data_prep)
# need it too: `source TEMP_DIR/ray.env` first.
SCRIPT_NAME=ray_cluster.sh
USAGE="Usage: launch/ray_cluster.sh start [--head HOST] [--workers 'HOST ...'] [options]
       launch/ray_cluster.sh stop [--temp-dir DIR]

Options:
  --head HOST          address the head binds and the workers join (default 127.0.0.1: this machine
                       only; give the head's cluster-network IP to add other machines)
  --workers 'H ...'    worker machines (space separated; 127.0.0.1 adds a second node on this machine)
  --port P             head (GCS) port (default: a free port when the head is local, else 6379)
  --num-cpus N         CPUs each node offers Ray (default: all)
  --temp-dir DIR       Ray's temp dir on every node and where the pids are kept
                       (default \${XDG_RUNTIME_DIR:-\$HOME/.cache}/coatnet-ray); it must be yours and
                       private (mode 700: made so when missing); stop reads the cluster it started from here
  --repo DIR           checkout path on remote machines (default: this checkout's path)
  --timeout S          seconds to wait for the nodes to join (default 120)
  --dry-run            print the exact commands and stop

Then shard on it (from the head):
  source TEMP_DIR/ray.env && python -m data_prep shard SRC OUT --split train --ray-address HEAD:PORT"

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

HEAD=127.0.0.1 WORKERS="" PORT="" NUM_CPUS="" TEMP_DIR=${XDG_RUNTIME_DIR:-$HOME/.cache}/coatnet-ray REPO=$REPO_ROOT TIMEOUT=120
declare -A FLAGS=()
declare -A OPTIONS=([--head]=HEAD [--workers]=WORKERS [--port]=PORT [--num-cpus]=NUM_CPUS [--temp-dir]=TEMP_DIR
  [--repo]=REPO [--timeout]=TIMEOUT)
parse_args "$@"
((${#POSITIONAL[@]} == 1)) || die "say start or stop (see --help)"
ACTION=${POSITIONAL[0]}
[[ $TEMP_DIR == /* ]] || TEMP_DIR=$PWD/$TEMP_DIR
STATE=$TEMP_DIR/cluster.env
TOKEN_FILE=$TEMP_DIR/auth_token
AUTH_ENV="RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$(quote "$TOKEN_FILE")"
RAY_BIN=$(dirname "$PYTHON")/ray
[[ -x $RAY_BIN ]] || RAY_BIN=ray
# Shell test that TEMP_DIR is this user's and private: it holds the token and the state `stop` acts on,
# so a folder another user made (or can write to) must never be used. Run here and on remote nodes.
PRIVATE_CHECK="[ -d $(quote "$TEMP_DIR") ] && [ -O $(quote "$TEMP_DIR") ] && \
case \$(stat -c %a $(quote "$TEMP_DIR")) in *00) true ;; *) false ;; esac"

# require_private_dir: die unless TEMP_DIR passes PRIVATE_CHECK.
require_private_dir() {
  bash -c "$PRIVATE_CHECK" ||
    die "temp dir $TEMP_DIR must be a folder owned by you with no group/other access (chmod 700 it, or pass another --temp-dir)"
}

# on HOST SCRIPT: run a bash script on HOST (here, or over ssh), printing it first.
on() {
  local host=$1 script=$2
  if is_local "$host"; then
    run bash -c "$script"
  else
    run ssh -o BatchMode=yes "$host" "$script"
  fi
}

# start_node INDEX HOST ARGS...: a detached `ray start --block ARGS` on HOST, pid in TEMP_DIR/node-INDEX.pid.
start_node() {
  local index=$1 host=$2
  shift 2
  local dir=$TEMP_DIR/node-$index
  if ! is_local "$host"; then # the cluster's token goes over ssh's stdin, never on a command line
    local copy=(ssh -o BatchMode=yes "$host" "mkdir -m 700 -p $(quote "$TEMP_DIR") && $PRIVATE_CHECK && umask 077 && cat >$(quote "$TOKEN_FILE")")
    printf '+ %s <%s\n' "$(quote "${copy[@]}")" "$(quote "$TOKEN_FILE")"
    if ((!DRY_RUN)); then
      # shellcheck disable=SC2094  # reads the local token file, writes the remote copy
      "${copy[@]}" <"$TOKEN_FILE"
    fi
  fi
  on "$host" "umask $UMASK && mkdir -p $(quote "$dir") && cd $(quote "$REPO") || exit 1
$AUTH_ENV setsid nohup $(quote "$RAY_BIN" start --block --temp-dir "$dir" --disable-usage-stats "$@") \
>$(quote "$dir.log") 2>&1 </dev/null &
echo \$! >$(quote "$dir.pid")"
}

# stop_node INDEX HOST: SIGTERM the node's `ray start --block` (it stops its own Ray processes), then
# SIGKILL its process group (setsid made it the leader) if it is still there after 30 s.
stop_node() {
  local index=$1 host=$2 pidfile
  pidfile=$(quote "$TEMP_DIR/node-$index.pid")
  on "$host" "[ -f $pidfile ] || exit 0
pid=\$(cat $pidfile)
kill -TERM \$pid 2>/dev/null
for _ in \$(seq 60); do kill -0 \$pid 2>/dev/null || break; sleep 0.5; done
kill -0 \$pid 2>/dev/null && kill -KILL -- -\$pid 2>/dev/null
rm -f $pidfile"
}

# ports_for HOST: extra flags for a node on this machine, whose fixed default ports (the dashboard
# agent's 52365, the client server's 10001) could clash with another Ray here.
ports_for() {
  PORT_FLAGS=()
  if is_local "$1"; then
    PORT_FLAGS=(--dashboard-agent-listen-port "$(free_port)")
  fi
}

case $ACTION in
  start)
    [[ $HEAD$WORKERS != *$'\n'* ]] || die "--head and --workers must be on one line"
    [[ ! -f $STATE ]] || die "a cluster started from $TEMP_DIR is still recorded in $STATE: stop it first (launch/ray_cluster.sh stop --temp-dir $TEMP_DIR)"
    if [[ -z $PORT ]]; then
      if is_local "$HEAD"; then PORT=$(free_port); else PORT=6379; fi
    fi
    require_int PORT --port
    cpu_flags=()
    [[ -z $NUM_CPUS ]] || { require_int NUM_CPUS --num-cpus; cpu_flags=(--num-cpus "$NUM_CPUS"); }
    read -r -a worker_hosts <<<"$WORKERS"
    for host in "$HEAD" ${worker_hosts[@]+"${worker_hosts[@]}"}; do require_host "--head/--workers host" "$host"; done
    nodes=$((1 + ${#worker_hosts[@]}))
    if [[ $HEAD == 127.0.0.1 || $HEAD == localhost ]]; then
      for host in ${worker_hosts[@]+"${worker_hosts[@]}"}; do
        is_local "$host" || die "worker $host cannot join a head on $HEAD: pass --head with this machine's cluster address"
      done
    fi
    note "Ray cluster: head $HEAD:$PORT, ${#worker_hosts[@]} worker(s); temp dir $TEMP_DIR"
    if ((!DRY_RUN)); then
      # shellcheck disable=SC2174  # only TEMP_DIR itself needs mode 700; its parents are the user's own
      mkdir -m 700 -p "$TEMP_DIR"
      require_private_dir
      # Plain KEY=value lines, read back by `stop` without running them.
      printf 'HEAD=%s\nPORT=%s\nWORKERS=%s\n' "$HEAD" "$PORT" "$WORKERS" >"$STATE"
      (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(32))' >"$TOKEN_FILE")
      printf 'export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=%q\n' "$TOKEN_FILE" >"$TEMP_DIR/ray.env"
    fi
    ports_for "$HEAD"
    client_port=()
    if is_local "$HEAD"; then client_port=(--ray-client-server-port "$(free_port)"); fi
    start_node 0 "$HEAD" --head --node-ip-address "$HEAD" --port "$PORT" --include-dashboard false \
      --dashboard-host 127.0.0.1 ${cpu_flags[@]+"${cpu_flags[@]}"} "${PORT_FLAGS[@]}" ${client_port[@]+"${client_port[@]}"}
    if ((!DRY_RUN)); then
      wait_for_port "$HEAD" "$PORT" "$TIMEOUT" || die "the Ray head did not open $HEAD:$PORT within $TIMEOUT s (log: $TEMP_DIR/node-0.log on $HEAD)"
    fi
    for i in "${!worker_hosts[@]}"; do
      host=${worker_hosts[$i]}
      ip_flags=()
      # A second node on this machine stays on loopback only when the head does too.
      if is_local "$host" && is_local "$HEAD"; then ip_flags=(--node-ip-address 127.0.0.1); fi
      ports_for "$host"
      start_node "$((i + 1))" "$host" --address "$HEAD:$PORT" ${ip_flags[@]+"${ip_flags[@]}"} \
        ${cpu_flags[@]+"${cpu_flags[@]}"} "${PORT_FLAGS[@]}"
    done
    # Counted from the head: a Ray driver must run on a cluster node.
    on "$HEAD" "cd $(quote "$REPO") && $AUTH_ENV $(quote "$PYTHON" -m launch.ray_nodes --address "$HEAD:$PORT" --expect "$nodes" --timeout "$TIMEOUT")" ||
      die "not every node joined (logs: $TEMP_DIR/node-*.log on each machine); stop with: launch/ray_cluster.sh stop --temp-dir $TEMP_DIR"
    note "ready: source $TEMP_DIR/ray.env && python -m data_prep shard SRC OUT --split train --ray-address $HEAD:$PORT"
    note "stop:  launch/ray_cluster.sh stop --temp-dir $TEMP_DIR"
    ;;
  stop)
    [[ -f $STATE ]] || die "no cluster recorded in $STATE (was it started with --temp-dir $TEMP_DIR?)"
    require_private_dir
    HEAD="" PORT="" WORKERS=""
    while IFS='=' read -r key value; do # written by `start` above; only its keys are taken, nothing is run
      case $key in
        HEAD | PORT | WORKERS) printf -v "$key" '%s' "$value" ;;
      esac
    done <"$STATE"
    [[ -n $HEAD ]] || die "$STATE names no HEAD: stop the cluster's ray processes by hand and delete $STATE"
    read -r -a worker_hosts <<<"$WORKERS"
    for host in "$HEAD" ${worker_hosts[@]+"${worker_hosts[@]}"}; do require_host "$STATE: host" "$host"; done
    for i in "${!worker_hosts[@]}"; do stop_node "$((i + 1))" "${worker_hosts[$i]}"; done
    stop_node 0 "$HEAD"
    if ((!DRY_RUN)); then rm -f "$STATE" "$TOKEN_FILE" "$TEMP_DIR/ray.env"; fi
    note "stopped the Ray cluster $HEAD:$PORT recorded in $TEMP_DIR"
    ;;
  *) die "unknown action '$ACTION': say start or stop" ;;
esac
