#!/usr/bin/env bash
# Rehearse a multi-host (pod) job on one machine: N local JAX processes of any entry point, joined by
# jax.distributed over 127.0.0.1, each with its own simulated CPU devices and its own log file.
#
#   bash launch/multihost_local.sh N [-d DEVICES] [-l LOG_DIR] [-t TIMEOUT] [-g GRACE] -- COMMAND [ARGS...]
#   e.g. bash launch/multihost_local.sh 2 -d 4 -- python -m magnet_jax.train --distributed \
#          --config=configs/magnet.py:size=tiny --workdir=runs/mh ...
#
# COMMAND must pass --distributed; each process gets JAX_COORDINATOR_ADDRESS (a free local port), JAX_NUM_PROCESSES=N,
# JAX_PROCESS_ID=i, JAX_PLATFORMS=cpu (unless set) and XLA_FLAGS with DEVICES simulated CPU devices (default 1).
# Process i writes stdout and stderr to LOG_DIR/process_i.log (default multihost_logs/) and its pid to
# LOG_DIR/process_i.pid. The script waits for all: exit 0 if every process exits 0, else the first failure's
# status (its log's last lines go to stderr). When one fails, the others get GRACE seconds (default 90, above the
# entry points' 60 s heartbeat timeout) to stop on their own, then SIGKILL. TIMEOUT (seconds, default none) bounds
# the whole job: past it every process is killed and the script exits 124. SIGTERM / SIGINT to the script are
# passed to every process (a whole-job preemption).
set -uo pipefail

usage() { echo "usage: $0 N [-d DEVICES] [-l LOG_DIR] [-t TIMEOUT] [-g GRACE] -- COMMAND [ARGS...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
n=$1; shift
[[ $n =~ ^[1-9][0-9]*$ ]] || { echo "$0: N=$n: expected a positive integer" >&2; exit 2; }
devices=1 log_dir=multihost_logs timeout=0 grace=90
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case $1 in
    -d) devices=${2:?}; shift 2 ;;
    -l) log_dir=${2:?}; shift 2 ;;
    -t) timeout=${2:?}; shift 2 ;;
    -g) grace=${2:?}; shift 2 ;;
    *) usage ;;
  esac
done
[ "${1:-}" = "--" ] && [ $# -ge 2 ] || usage
shift
for v in devices timeout grace; do
  [[ ${!v} =~ ^[0-9]+$ ]] || { echo "$0: -${v:0:1} ${!v}: expected a non-negative integer" >&2; exit 2; }
done

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$log_dir"
xla_flags="$(echo "${XLA_FLAGS:-}" | sed 's/--xla_force_host_platform_device_count=[0-9]*//g') "
xla_flags+="--xla_force_host_platform_device_count=$devices"

pids=()
for ((i = 0; i < n; i++)); do
  JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$i \
    JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} XLA_FLAGS=$xla_flags "$@" > "$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
  echo "$!" > "$log_dir/process_$i.pid"
done
echo "multihost_local: $n processes on 127.0.0.1:$port, $devices devices each, logs in $log_dir/process_*.log" >&2

forward() { for p in "${pids[@]}"; do kill -"$1" "$p" 2> /dev/null; done; }
trap 'forward TERM' TERM
trap 'forward INT' INT

start=$SECONDS status=0 failed_at= finished=0
exited=()
while [ "$finished" -lt "$n" ]; do
  for ((i = 0; i < n; i++)); do
    [ -n "${exited[$i]:-}" ] && continue
    kill -0 "${pids[$i]}" 2> /dev/null && continue
    wait "${pids[$i]}"; rc=$?
    exited[$i]=$rc finished=$((finished + 1))
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
      status=$rc failed_at=$SECONDS
      echo "multihost_local: process $i exited with status $rc; last lines of $log_dir/process_$i.log:" >&2
      tail -n 5 "$log_dir/process_$i.log" >&2
    fi
  done
  [ "$finished" -ge "$n" ] && break
  if [ -n "$failed_at" ] && [ $((SECONDS - failed_at)) -ge "$grace" ]; then
    echo "multihost_local: killing the processes still running ${grace} s after the failure" >&2
    forward KILL
  fi
  if [ "$timeout" -gt 0 ] && [ $((SECONDS - start)) -ge "$timeout" ]; then
    echo "multihost_local: timeout after $timeout s; killing every process" >&2
    forward KILL
    status=124 timeout=0
  fi
  sleep 0.2
done
exit "$status"
