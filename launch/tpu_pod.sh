#!/usr/bin/env bash
# Cloud TPU VM slices: ship this commit to every worker, start the trainer on all of them, collect logs, stop.
#
#   launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=P] [--preset=tpu_v5p] [--workdir=o1jax] [--run=RUN]
#                     [--hosts=IP,IP,...] [--dry-run] ACTION [-- TRAINER ARGS]
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
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

tpu="" zone="" project="" preset=tpu_v5p workdir=o1jax run="" hosts="" action=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --preset=*) preset="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --run=*) run="${1#*=}" ;;
    --hosts=*) hosts="${1#*=}" ;;
    --dry-run) export O1_DRY_RUN=1 ;;
    setup|train|logs|stop|exec) action="$1" ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift
done
[[ -n "$tpu" && -n "$zone" ]] || { echo "tpu_pod.sh: --tpu=NAME and --zone=ZONE are required" >&2; exit 2; }
[[ -n "$action" ]] || { echo "tpu_pod.sh: give an action: setup, train, logs, stop or exec" >&2; exit 2; }
run="${run:-${O1_RUN:-run}}"
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=("--zone=$zone")
[[ -z "$project" ]] || where+=("--project=$project")

# Runs a shell command line on every worker of the slice.
on_all_workers() { o1_run "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --worker=all --command="$1"; }

case "$action" in
  setup)
    commit="$(git rev-parse --short HEAD)"
    archive="o1jax-$commit.tar.gz"
    o1_run git archive --format=tar.gz -o "/tmp/$archive" HEAD
    o1_run "${gcloud_tpu[@]}" scp "/tmp/$archive" "$tpu:$archive" "${where[@]}" --worker=all
    on_all_workers "set -e; mkdir -p $workdir && tar xzf $archive -C $workdir && cd $workdir && \
python3 -m pip install -q -r requirements.txt -r requirements-tpu.txt"
    ;;
  train)
    [[ $# -gt 0 ]] || { echo "tpu_pod.sh train: no trainer arguments after --" >&2; exit 2; }
    if [[ -z "$hosts" ]]; then
      if [[ "${O1_DRY_RUN:-0}" == 1 ]]; then
        o1_run "${gcloud_tpu[@]}" describe "$tpu" "${where[@]}" "--format=value(networkEndpoints[].ipAddress)"
        hosts='<worker-ips>'
      else
        hosts="$("${gcloud_tpu[@]}" describe "$tpu" "${where[@]}" "--format=value(networkEndpoints[].ipAddress)" \
                 | tr ';' ',')"
      fi
    fi
    flags="$(o1_preset_flags "$preset")"
    train_args="$(printf '%q ' "$@")"
    on_all_workers "set -e; cd $workdir; mkdir -p logs/$run; \
export LIBTPU_INIT_ARGS='$flags' TPU_WORKER_HOSTNAMES=$hosts; \
nohup python3 -m o1jax.train ${train_args% } > logs/$run/\$(hostname).log 2>&1 < /dev/null & \
echo \$! > logs/$run/\$(hostname).pid"
    ;;
  logs)
    o1_run mkdir -p "logs/$run"
    o1_run "${gcloud_tpu[@]}" scp "$tpu:$workdir/logs/$run/*.log" "logs/$run/" "${where[@]}" --worker=all
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
