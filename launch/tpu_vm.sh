#!/usr/bin/env bash
# Train magnet_jax on a Cloud TPU VM slice (single- or multi-host) with plain gcloud.
#
#   launch/tpu_vm.sh train  NAME ZONE ACCELERATOR [RECIPE] -- [train flags...]
#   launch/tpu_vm.sh logs   NAME ZONE            # last lines of every host's log
#   launch/tpu_vm.sh stop   NAME ZONE            # SIGTERM: every host saves a checkpoint at the same step, then exits
#   launch/tpu_vm.sh delete NAME ZONE
#
# `train` creates the TPU VM if it does not exist (reuses it otherwise), copies this checkout (without .venv/.git) to
# every host, installs it into ~/magnet_jax/.venv (Python >= 3.11, pinned by constraints.txt, `tpu` extra = libtpu),
# and starts `python -m magnet_jax.train --distributed ...` on all hosts at once (`--worker=all`), detached, one log
# per host in ~/magnet_jax/logs/train.<hostname>.log. RECIPE is a launch/recipes/*.sh file whose overrides come first.
# The workdir must be reachable from every host (gs://...); a restarted job resumes from its latest checkpoint.
#
# Example (v5p-128, small 10 s model):
#   launch/tpu_vm.sh train magnet-small us-east5-a v5p-128 launch/recipes/v5p-128_small.sh -- \
#       --workdir=gs://my-bucket/magnet/small-10s \
#       --config.data.train_files='gs://my-bucket/codes/train-*.array_record' \
#       --config.conditioner.t5=t5-base
#
# Environment: PROJECT (gcloud project; default: gcloud's), TPU_VERSION (VM image; default v2-alpha-tpuv5 for v5p,
# v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv6e for v6e, tpu-ubuntu2204-base otherwise), SPOT=1 (spot capacity),
# PYTHON (interpreter on the VMs; default python3.11, installed from the deadsnakes PPA when missing).
set -euo pipefail

usage() { sed -n '2,8p' "$0" >&2; exit 2; }
[ $# -ge 3 ] || usage
cmd=$1 name=$2 zone=$3
shift 3
gc=(gcloud compute tpus tpu-vm)
[ -n "${PROJECT:-}" ] && gc+=(--project "$PROJECT")
remote() { "${gc[@]}" ssh "$name" --zone "$zone" --worker=all --command "$1"; }

case "$cmd" in
  logs)
    remote 'echo "== $(hostname)"; tail -n 20 ~/magnet_jax/logs/train.$(hostname).log'
    exit 0 ;;
  stop)
    remote 'f=~/magnet_jax/logs/train.$(hostname).pid; [ -f $f ] && kill -TERM "$(cat $f)" && echo "$(hostname): stopping"'
    exit 0 ;;
  delete)
    "${gc[@]}" delete "$name" --zone "$zone" --quiet
    exit 0 ;;
  train) ;;
  *) usage ;;
esac

[ $# -ge 1 ] || usage
accel=$1
shift
recipe_flags=()
if [ $# -ge 1 ] && [ "$1" != "--" ]; then
  # shellcheck source=/dev/null
  source "$1"  # sets TOPOLOGY and RECIPE_FLAGS
  if [ "${TOPOLOGY:-$accel}" != "$accel" ]; then
    echo "tpu_vm.sh: recipe $1 is for $TOPOLOGY, not $accel" >&2
    exit 2
  fi
  recipe_flags=("${RECIPE_FLAGS[@]}")
  shift
fi
[ "${1:-}" = "--" ] && shift
train_flags=("${recipe_flags[@]}" "$@")

case "$accel" in
  v5p-*) default_version=v2-alpha-tpuv5 ;;
  v5litepod-*) default_version=v2-alpha-tpuv5-lite ;;
  v6e-*) default_version=v2-alpha-tpuv6e ;;
  *) default_version=tpu-ubuntu2204-base ;;
esac

if ! "${gc[@]}" describe "$name" --zone "$zone" >/dev/null 2>&1; then
  echo "creating $accel TPU VM $name in $zone"
  "${gc[@]}" create "$name" --zone "$zone" --accelerator-type "$accel" \
    --version "${TPU_VERSION:-$default_version}" ${SPOT:+--spot}
else
  echo "reusing TPU VM $name"
fi

repo=$(cd "$(dirname "$0")/.." && pwd)
archive=$(mktemp --suffix=.tgz)
trap 'rm -f "$archive"' EXIT
tar czf "$archive" -C "$repo" --exclude=.venv --exclude=.git --exclude='*.egg-info' --exclude=__pycache__ .
"${gc[@]}" scp "$archive" "$name":magnet_jax.tgz --zone "$zone" --worker=all

py=${PYTHON:-python3.11}
quoted=$(printf '%q ' "${train_flags[@]}")
remote "set -e
  mkdir -p ~/magnet_jax/logs && tar xzf ~/magnet_jax.tgz -C ~/magnet_jax && cd ~/magnet_jax
  if ! command -v $py >/dev/null; then
    sudo add-apt-repository -y ppa:deadsnakes/ppa >/dev/null && sudo apt-get update -qq
    sudo apt-get install -y -qq ${py}-venv >/dev/null
  fi
  [ -x .venv/bin/python ] || $py -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[tpu]'
  log=logs/train.\$(hostname).log
  nohup .venv/bin/python -m magnet_jax.train --distributed $quoted >> \$log 2>&1 < /dev/null &
  echo \$! > logs/train.\$(hostname).pid
  echo \"\$(hostname): started, log ~/magnet_jax/\$log\""
