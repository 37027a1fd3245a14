#!/usr/bin/env bash
# A Ray cluster over the nodes of this SLURM allocation, for one command run on its head node, torn down afterwards:
# what `launch.evaluate=vllm_multinode` runs (qllm/stages/launchers/vllm_multinode.py) so that vLLM spreads
# TP×PP workers over several nodes (eval.distributed_executor_backend=ray). Ray is the distributed engine; this
# script only starts and stops it.
#
#   ray_slurm.sh --port P --ray RAY --nodes N --gpus-per-node G --timeout S -- COMMAND...
#
# Run it inside the allocation, on its first node (where the sbatch script of the cell runs). It
#   1. reads the nodes: scontrol show hostnames "$SLURM_JOB_NODELIST" (the first is the head);
#   2. starts `ray start --head --block` on the head and `ray start --address=<head>:P --block` on every other node,
#      each as a background `srun --overlap --nodes=1 --ntasks=1 -w <node>` step;
#   3. waits until `ray status` counts N nodes (at most S seconds);
#   4. runs COMMAND here with RAY_ADDRESS=<head>:P and exits with its status;
#   5. on exit, Ctrl-C or SIGTERM (SLURM's time limit, qllm's timeout_s): `ray stop --force` on every node, then ends
#      the background srun steps.
set -u -o pipefail

port="" ray="ray" nodes="" gpus="" timeout=600
while [ $# -gt 0 ]; do
  case "$1" in
    --port) port="$2"; shift 2 ;;
    --ray) ray="$2"; shift 2 ;;
    --nodes) nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus="$2"; shift 2 ;;
    --timeout) timeout="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "[ray_slurm] unknown option $1" >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "[ray_slurm] no command after --" >&2; exit 2; }
[ -n "$port" ] || { echo "[ray_slurm] --port is required" >&2; exit 2; }
[ -n "${SLURM_JOB_NODELIST:-}" ] || { echo "[ray_slurm] not inside a SLURM allocation (no SLURM_JOB_NODELIST)" >&2; exit 2; }

mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
[ -n "$nodes" ] || nodes="${#hosts[@]}"
if [ "${#hosts[@]}" -lt "$nodes" ]; then
  echo "[ray_slurm] the allocation has ${#hosts[@]} node(s) (${hosts[*]}); $nodes needed" >&2; exit 2
fi
hosts=("${hosts[@]:0:$nodes}")
head="${hosts[0]}"
gpu_arg=()
[ -n "$gpus" ] && gpu_arg=(--num-gpus="$gpus")
srun_on=(srun --overlap --nodes=1 --ntasks=1 -w)  # one step on one node, beside the steps already running
step() { "${srun_on[@]}" "$1" "${@:2}"; }

pids=() stage="" done_=0
teardown() {
  [ "$done_" = 1 ] && return
  done_=1
  [ -n "$stage" ] && kill -TERM "$stage" 2>/dev/null && wait "$stage" 2>/dev/null
  echo "[ray_slurm] stopping ray on ${hosts[*]}" >&2
  for h in "${hosts[@]}"; do step "$h" "$ray" stop --force >/dev/null 2>&1 || true; done
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap 'teardown' EXIT
trap 'teardown; exit 130' INT
trap 'teardown; exit 143' TERM

head_ip="$(step "$head" hostname --ip-address 2>/dev/null | awk '{print $1; exit}')"
[ -n "$head_ip" ] || head_ip="$head"
address="$head_ip:$port"
echo "[ray_slurm] head $head ($address), workers: ${hosts[*]:1}" >&2
"${srun_on[@]}" "$head" "$ray" start --head --node-ip-address="$head_ip" --port="$port" "${gpu_arg[@]}" --block &
pids+=($!)
for h in "${hosts[@]:1}"; do
  "${srun_on[@]}" "$h" "$ray" start --address="$address" "${gpu_arg[@]}" --block &
  pids+=($!)
done

deadline=$((SECONDS + ${timeout%.*}))
while :; do
  up="$("$ray" status --address="$address" 2>/dev/null | grep -c ' node_' || true)"
  [ "${up:-0}" -ge "$nodes" ] && break
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "[ray_slurm] ray cluster not up after ${timeout}s: ${up:-0} of $nodes node(s) joined" >&2; exit 3
  fi
  sleep 2
done
echo "[ray_slurm] ray cluster up: $nodes node(s)" >&2

RAY_ADDRESS="$address" "$@" &
stage=$!
wait "$stage"
rc=$?
stage=""
exit "$rc"
