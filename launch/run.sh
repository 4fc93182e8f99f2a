#!/usr/bin/env bash
# One process of a k2jax run, on any scheduler: the plain launcher. SLURM (launch/slurm.sbatch),
# Kubernetes (launch/k8s/jobset.yaml) and launch/local.py all start their processes through it.
#
#   launch/run.sh --config=configs/pretrain.py --workdir=/shared/ckpt/pretrain [--config.k=v ...]
#
# Who is who comes from the environment (k2jax/training/cluster.py, docs/multihost.md):
#   K2JAX_COORDINATOR=host:port K2JAX_NUM_PROCESSES=N K2JAX_PROCESS_ID=i   set by hand, or
#   SLURM's variables inside srun, or JOB_COMPLETION_INDEX of a Kubernetes Indexed Job;
#   K2JAX_LOCAL_DEVICE_IDS=0,1,..  the GPUs of this process (default: all it sees).
# Settings:
#   K2JAX_GPU_PRESET=h100|h200     XLA / NCCL / memory settings (launch/gpu_flags.py); default none
#   K2JAX_FABRIC=ndv5              also a cluster's NCCL settings (Azure ND H100/H200 v5)
#   K2JAX_COMPILE_CACHE_DIR=DIR    persistent compilation cache (default <workdir>/compile_cache)
#   K2JAX_EXIT_UNFINISHED=75       exit with this status when the trainer stopped (SIGTERM)
#                                  before the end of the stage (Kubernetes restarts the pods)
#   K2JAX_DRY_RUN=1                print the layout, settings and command, start nothing
#   PYTHON=python                  the interpreter with k2jax installed
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
helper() { PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m "$@"; }
workdir_of() {  # the value of --workdir=DIR (or --workdir DIR) among the arguments
  while (($#)); do
    case "$1" in
      --workdir=*) echo "${1#--workdir=}" ;;
      --workdir) echo "${2:-}" ;;
    esac
    shift
  done
}

preset="${K2JAX_GPU_PRESET:-none}"
if [[ "$preset" != none ]]; then
  settings="$(helper launch.gpu_flags "$preset" --fabric="${K2JAX_FABRIC:-}" \
    --keep_xla_flags="${XLA_FLAGS:-}")"
  eval "$settings"
  # Every flag must be known to this jaxlib; the CPU backend parses them all, in seconds and
  # without touching a GPU, so a bad flag stops here with XLA's own message.
  if ! JAX_PLATFORMS=cpu "$PYTHON" -c 'import jax; jax.devices()' >/dev/null; then
    echo "error: this jaxlib rejects the XLA_FLAGS above (preset $preset)" >&2
    exit 2
  fi
fi

cmd=("$PYTHON" -m k2jax.train --distributed "$@")
if [[ "${K2JAX_DRY_RUN:-0}" == 1 ]]; then
  helper launch.layout
  echo "XLA_FLAGS=${XLA_FLAGS:-}"
  [[ "$preset" != none ]] && echo "$settings" | grep -v '^export XLA_FLAGS=' | sed 's/^export //'
  echo "command: ${cmd[*]}"
  exit 0
fi
if [[ -z "${K2JAX_EXIT_UNFINISHED:-}" ]]; then
  # exec: the trainer itself receives the scheduler's SIGTERM (JAX's preemption notice).
  exec "${cmd[@]}"
fi
# Kubernetes: a pod stopped by SIGTERM saves and exits 0, which would mark its index done.
# Here this script stays the container's first process, passes SIGTERM on to the trainer, and
# exits K2JAX_EXIT_UNFINISHED (e.g. 75) when the stage has steps left, so the JobSet's failure
# policy restarts every pod and the run resumes.
"${cmd[@]}" &
trainer=$!
trap 'kill -TERM "$trainer" 2>/dev/null || true' TERM INT
status=0
wait "$trainer" || status=$?
while kill -0 "$trainer" 2>/dev/null; do  # wait returns early when a trapped signal arrives
  status=0
  wait "$trainer" || status=$?
done
if ((status == 0)) && ! helper launch.finished "$(workdir_of "$@")"; then
  exit "$K2JAX_EXIT_UNFINISHED"
fi
exit "$status"
