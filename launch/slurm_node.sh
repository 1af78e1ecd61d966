#!/usr/bin/env bash
# launch/slurm_node.sh CONFIG.yaml [key=value ...]: ONE per node, started by launch/slurm.sbatch through srun.
#
# Runs `accelerate launch` (torchrun's elastic agent, one rank per GPU) and forwards SIGUSR1 and
# SIGTERM to the ranks, and only to them. SLURM's proctrack/cgroup signals only this process (the
# task), never the agent's children: torchrun starts every rank in a session of its own. The
# agent itself must not act on them: on SIGTERM it would kill the ranks before they save. Decode
# workers ignore them (tvlars_scale/data/stream_loader.py). A time limit's SIGTERM to every process
# thus ends the same way: the ranks save, exit 0, the agent exits 0.
set -euo pipefail

: "${ACCELERATE:?}" "${STRATEGY:?}" "${PROCS_PER_NODE:?}" "${SLURM_NNODES:?}" "${NNODES_MIN:?}"
: "${MASTER_ADDR:?}" "${MASTER_PORT:?}" "${MAX_RESTARTS:?}" "${SLURM_JOB_ID:?}" "${TVLARS_STOP_MARKER:?}"

# c10d rendezvous: the nodes form the group through a store on the first node, named by the job id
# (two jobs never merge), from NNODES_MIN to SLURM_NNODES nodes; each restart re-forms it with the
# nodes alive. These torchrun settings go in as PET_* variables (torchrun reads every option from
# PET_<OPTION>): `accelerate launch` has no option for them and fixes --nnodes to --num_machines
# when that is above 1, hence --num_machines 1 below, counting this node only.
export PET_NNODES="$NNODES_MIN:$SLURM_NNODES"
export PET_RDZV_ENDPOINT="$MASTER_ADDR:$MASTER_PORT"
export PET_RDZV_ID="$SLURM_JOB_ID"
# The agent leaves SIGTERM to the ranks (by default it would terminate them on it; torchrun's
# --signals-to-handle, which Accelerate does not pass on).
export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT

options=(
  --config_file "launch/accelerate_multinode_$STRATEGY.yaml"
  --num_machines 1
  --num_processes "$PROCS_PER_NODE"
  --rdzv_backend c10d
  --max_restarts "$MAX_RESTARTS"
  # the agent's own port (unused by c10d; any free one): the rendezvous is PET_RDZV_ENDPOINT
  --main_process_port 0
  # rank-labelled lines ("[default3]:..."; srun --label adds the node)
  --tee 3
)
# The first node hosts the rendezvous store (MASTER_ADDR is its name); say so rather than let each
# agent guess from its host names. It must outlive the others: c10d has no fail-over.
is_host=false
[[ ${SLURM_NODEID:-0} != 0 ]] || is_host=true
options+=(--rdzv_conf "is_host=$is_host${RDZV_CONF:+,$RDZV_CONF}")
# CPU and NUMA affinity per GPU (Accelerate reads it from NVML): on GPU nodes only.
[[ -z ${SLURM_GPUS_ON_NODE:-} ]] || options+=(--enable_cpu_affinity)

# Started with USR1 and TERM ignored: the agent keeps ignoring them, the ranks install their own
# handlers (tvlars_scale.preemption) once set up; a signal before that is lost.
trap '' USR1 TERM
"$ACCELERATE" launch "${options[@]}" -m tvlars_scale.train --config "$@" &
agent=$!

interrupted=0
# shellcheck disable=SC2329  # called by the traps below
forward() {
  interrupted=1
  echo "node ${SLURM_NODEID:-?}: SIG$1 -> ranks $(pgrep -d, -P "$agent" || echo none)" >&2
  pkill "-$1" -P "$agent" || true # the ranks are the agent's children
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

while :; do
  interrupted=0
  status=0
  wait "$agent" || status=$?
  # wait returns above 128 when a trapped signal interrupts it; the agent then still runs.
  ((interrupted && status > 128)) || break
done
# For an elastic job: the batch script counts the nodes that ended well (a lost node writes nothing).
echo "$status" >"$TVLARS_STOP_MARKER.node-${SLURM_NODEID:-0}"
exit "$status"
