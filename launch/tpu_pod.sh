#!/usr/bin/env bash
# Cloud TPU VM slices: ship this commit to every worker, start the trainer on all of them, collect logs, stop.
#
#   launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=P] [--preset=tpu_v5p] [--workdir=o1jax] [--run=RUN]
#                     [--hosts=IP,IP,...] [--slices=N] [--dry-run] ACTION [-- TRAINER ARGS]
#
#   setup   copy `git archive HEAD` to every worker, unpack it in ~/WORKDIR and pip install the requirements
#           (requirements.txt + requirements-tpu.txt, i.e. jax with libtpu)
#   train   start `python3 -m o1jax.train TRAINER ARGS` on every worker in the background (survives the ssh
#           session), with the preset's LIBTPU_INIT_ARGS; each worker logs to ~/WORKDIR/logs/RUN/<hostname>.log
#   logs    copy every worker's logs/RUN/*.log to ./logs/RUN/ here
#   stop    SIGTERM the trainers: they save a checkpoint and exit (config.checkpoint.dir, e.g. gs://...)
#   exec    run the command after -- on every worker, in ~/WORKDIR (e.g. copy weights and data to local disk)
#
# Every worker runs the same command; jax.distributed.initialize() (o1jax.sharding.initialize_distributed) finds
# the other workers because TPU_WORKER_HOSTNAMES lists them: the slice's internal IPs, from
# `gcloud compute tpus tpu-vm describe` unless --hosts gives them. --dry-run prints the gcloud commands instead.
#
# Multi-slice (--slices=N > 1): NAME is the node prefix of a queued resource of N slices
# (`gcloud compute tpus queued-resources create ... --node-count=N --node-prefix=NAME`), whose slices are the TPU VMs
# NAME-0 ... NAME-(N-1). Every action runs on every worker of every slice; `train` also gives each slice the
# MEGASCALE_* variables of the DCN transport (coordinator: slice 0's first worker; each slice's index) and the
# trainer --config.mesh.dcn_data=N first (the data axis across the slices, fsdp/tensor inside each: arguments
# after -- come later and win).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

tpu="" zone="" project="" preset=tpu_v5p workdir=o1jax run="" hosts="" slices=1 action=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --preset=*) preset="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --run=*) run="${1#*=}" ;;
    --hosts=*) hosts="${1#*=}" ;;
    --slices=*) slices="${1#*=}" ;;
    --dry-run) export O1_DRY_RUN=1 ;;
    setup|train|logs|stop|exec) action="$1" ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift
done
[[ -n "$tpu" && -n "$zone" ]] || { echo "tpu_pod.sh: --tpu=NAME and --zone=ZONE are required" >&2; exit 2; }
[[ -n "$action" ]] || { echo "tpu_pod.sh: give an action: setup, train, logs, stop or exec" >&2; exit 2; }
[[ "$slices" =~ ^[1-9][0-9]*$ ]] || { echo "tpu_pod.sh: --slices=$slices: expected a positive integer" >&2; exit 2; }
if [[ "$slices" != 1 && -n "$hosts" ]]; then
  echo "tpu_pod.sh: --hosts lists one slice's workers; with --slices=$slices they are looked up per slice" >&2
  exit 2
fi
run="${run:-${O1_RUN:-run}}"
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=("--zone=$zone")
[[ -z "$project" ]] || where+=("--project=$project")

# The TPU VMs: the slice, or the queued resource's slices NAME-0 ... NAME-(N-1).
nodes=("$tpu")
[[ "$slices" == 1 ]] || { nodes=(); for ((i = 0; i < slices; i++)); do nodes+=("$tpu-$i"); done; }

# Runs a shell command line on every worker of node $1.
on_workers() { o1_run "${gcloud_tpu[@]}" ssh "$1" "${where[@]}" --worker=all --command="$2"; }
# ... of every node.
on_all_workers() { local node; for node in "${nodes[@]}"; do on_workers "$node" "$1"; done; }

# Sets node_hosts to the internal IPs of node $1's workers, comma-separated (a dry run prints the lookup and
# sets a placeholder).
lookup_workers() {
  local describe=("${gcloud_tpu[@]}" describe "$1" "${where[@]}" "--format=value(networkEndpoints[].ipAddress)")
  if [[ "${O1_DRY_RUN:-0}" == 1 ]]; then
    o1_run "${describe[@]}"
    node_hosts="<worker-ips>"
    [[ "$slices" == 1 ]] || node_hosts="<$1-ips>"
  else
    node_hosts="$("${describe[@]}" | tr ';' ',')"
  fi
}

case "$action" in
  setup)
    commit="$(git rev-parse --short HEAD)"
    archive="o1jax-$commit.tar.gz"
    o1_run git archive --format=tar.gz -o "/tmp/$archive" HEAD
    for node in "${nodes[@]}"; do
      o1_run "${gcloud_tpu[@]}" scp "/tmp/$archive" "$node:$archive" "${where[@]}" --worker=all
    done
    on_all_workers "set -e; mkdir -p $workdir && tar xzf $archive -C $workdir && cd $workdir && \
python3 -m pip install -q -r requirements.txt -r requirements-tpu.txt"
    ;;
  train)
    [[ $# -gt 0 ]] || { echo "tpu_pod.sh train: no trainer arguments after --" >&2; exit 2; }
    flags="$(o1_preset_flags "$preset")"
    train_args=("$@")
    [[ "$slices" == 1 ]] || train_args=("--config.mesh.dcn_data=$slices" "$@")
    train_args="$(printf '%q ' "${train_args[@]}")"
    coordinator=""
    for ((i = 0; i < ${#nodes[@]}; i++)); do
      node_hosts="$hosts"
      [[ -n "$node_hosts" ]] || lookup_workers "${nodes[$i]}"
      env="LIBTPU_INIT_ARGS='$flags' TPU_WORKER_HOSTNAMES=$node_hosts"
      if [[ "$slices" != 1 ]]; then
        # Slice 0's first worker coordinates the DCN transport (MaxText's multihost_runner does the same).
        [[ -n "$coordinator" ]] || coordinator="${node_hosts%%,*}"
        env+=" MEGASCALE_COORDINATOR_ADDRESS=$coordinator:8080 MEGASCALE_PORT=8080"
        env+=" MEGASCALE_NUM_SLICES=$slices MEGASCALE_SLICE_ID=$i"
      fi
      on_workers "${nodes[$i]}" "set -e; cd $workdir; mkdir -p logs/$run; \
export $env; \
nohup python3 -m o1jax.train ${train_args% } > logs/$run/\$(hostname).log 2>&1 < /dev/null & \
echo \$! > logs/$run/\$(hostname).pid"
    done
    ;;
  logs)
    o1_run mkdir -p "logs/$run"
    for node in "${nodes[@]}"; do
      o1_run "${gcloud_tpu[@]}" scp "$node:$workdir/logs/$run/*.log" "logs/$run/" "${where[@]}" --worker=all
    done
    ;;
  stop)
    on_all_workers "kill -TERM \$(cat $workdir/logs/$run/*.pid)"
    ;;
  exec)
    [[ $# -gt 0 ]] || { echo "tpu_pod.sh exec: no command after --" >&2; exit 2; }
    command="$(printf '%q ' "$@")"
    on_all_workers "cd $workdir && ${command% }"
    ;;
esac
