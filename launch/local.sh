#!/usr/bin/env bash
# Several JAX processes on this machine, each with its own fake CPU devices, joined by jax.distributed on
# 127.0.0.1: the multi-host code path (per-process batch rows, cross-process collectives, checkpoints) without a pod.
#
#   launch/local.sh [--processes=2] [--devices=4] [--port=PORT] [--logdir=DIR] [--preset=cpu]
#                   [--module=o1jax.train] [--dry-run] -- --config=configs/tiny_cpu.py [--config.a.b=v ...]
#
# Each process gets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (read by
# o1jax.sharding.initialize_distributed) and logs to DIR/process_<i>.log. The launcher waits for all of them and
# exits with the first non-zero status, stopping the others: one process failing leaves the rest blocked in a
# collective. Ctrl-C stops them all.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

processes=2 devices=4 port=${O1_PORT:-} logdir=runs/local preset=cpu module=o1jax.train
while [[ $# -gt 0 ]]; do
  case "$1" in
    --processes=*) processes="${1#*=}" ;;
    --devices=*) devices="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --logdir=*) logdir="${1#*=}" ;;
    --preset=*) preset="${1#*=}" ;;
    --module=*) module="${1#*=}" ;;
    --dry-run) export O1_DRY_RUN=1 ;;
    --) shift; break ;;
    *) echo "local.sh: unknown option '$1' (trainer arguments go after --)" >&2; exit 2 ;;
  esac
  shift
done
[[ $# -gt 0 ]] || { echo "local.sh: no trainer arguments; e.g. -- --config=configs/tiny_cpu.py" >&2; exit 2; }
[[ "$processes" =~ ^[1-9][0-9]*$ && "$devices" =~ ^[1-9][0-9]*$ ]] \
  || { echo "local.sh: --processes and --devices must be positive integers" >&2; exit 2; }
if [[ -z "$port" ]]; then
  # A free port from the kernel; in a dry run a fixed one keeps the printed commands reproducible.
  if [[ "${O1_DRY_RUN:-0}" == 1 ]]; then port=12355; else
    port="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  fi
fi
flags="$(o1_preset_flags "$preset") --xla_force_host_platform_device_count=$devices"

o1_run mkdir -p "$logdir"
pids=()
stop_all() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap 'stop_all; exit 130' INT TERM
for ((i = 0; i < processes; i++)); do
  cmd=(env JAX_PLATFORMS=cpu "XLA_FLAGS=$flags" "JAX_COORDINATOR_ADDRESS=127.0.0.1:$port"
       "JAX_NUM_PROCESSES=$processes" "JAX_PROCESS_ID=$i" python -m "$module" "$@")
  if [[ "${O1_DRY_RUN:-0}" == 1 ]]; then
    o1_run "${cmd[@]}"
    echo "  > $logdir/process_$i.log"
    continue
  fi
  "${cmd[@]}" > "$logdir/process_$i.log" 2>&1 &
  pids+=("$!")
done
[[ "${O1_DRY_RUN:-0}" == 1 ]] && exit 0

status=0
remaining=("${pids[@]}")
while [[ ${#remaining[@]} -gt 0 ]]; do
  # wait -n returns as soon as any process ends (-p names it, bash >= 5.1); on a failure stop the rest instead
  # of letting them hang in a collective.
  rc=0
  wait -n -p finished "${remaining[@]}" || rc=$?
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
    echo "local.sh: process $finished exited with status $rc; stopping the others (logs in $logdir)" >&2
    stop_all
  fi
  alive=()
  for pid in "${remaining[@]}"; do [[ "$pid" == "$finished" ]] || alive+=("$pid"); done
  remaining=("${alive[@]+"${alive[@]}"}")
done
echo "local.sh: $processes processes finished with status $status; logs in $logdir" >&2
exit "$status"
