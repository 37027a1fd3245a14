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
#   3. waits until the head answers (a head whose step ended is reported as such, before any worker tries to join
#      it), then until `ray status` counts N nodes (S seconds in all);
#   4. runs COMMAND here with RAY_ADDRESS=<head>:P and exits with its status;
#   5. on exit, Ctrl-C or SIGTERM (SLURM's time limit, qllm's timeout_s): `ray stop --force` on every node, then ends
#      the background srun steps.
# Empty arrays expand as ${a[@]+"${a[@]}"}: bash < 4.4 (still on many clusters) takes "${a[@]}" of one for unset.
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
secs="${timeout%.*}"
case "$secs" in ''|*[!0-9]*) echo "[ray_slurm] --timeout must be seconds (e.g. 600); got $timeout" >&2; exit 2 ;; esac

mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
if [ "${#hosts[@]}" -eq 0 ]; then
  echo "[ray_slurm] scontrol show hostnames '$SLURM_JOB_NODELIST' listed no node" >&2; exit 2
fi
[ -n "$nodes" ] || nodes="${#hosts[@]}"
if [ "${#hosts[@]}" -lt "$nodes" ]; then
  echo "[ray_slurm] the allocation has ${#hosts[@]} node(s) (${hosts[*]}); $nodes needed" >&2; exit 2
fi
hosts=("${hosts[@]:0:$nodes}")
head="${hosts[0]}"
workers=("${hosts[@]:1}")
gpu_arg=()
[ -n "$gpus" ] && gpu_arg=(--num-gpus="$gpus")
srun_on=(srun --overlap --nodes=1 --ntasks=1 -w)  # one step on one node, beside the steps already running
step() { "${srun_on[@]}" "$1" "${@:2}"; }

pids=() worker_pids=() head_pid="" stage="" done_=0
teardown() {
  [ "$done_" = 1 ] && return
  done_=1
  [ -n "$stage" ] && kill -TERM "$stage" 2>/dev/null && wait "$stage" 2>/dev/null
  echo "[ray_slurm] stopping ray on ${hosts[*]}" >&2
  for h in "${hosts[@]}"; do step "$h" "$ray" stop --force >/dev/null 2>&1 || true; done
  for p in ${pids[@]+"${pids[@]}"}; do kill -TERM "$p" 2>/dev/null || true; done
  for p in ${pids[@]+"${pids[@]}"}; do wait "$p" 2>/dev/null || true; done
}
trap 'teardown' EXIT
trap 'teardown; exit 130' INT
trap 'teardown; exit 143' TERM

# the head's address: its first non-loopback one (`hostname -I`, else `hostname --ip-address`, which some systems
# lack or answer with 127.0.1.1), else its name
first_ip() { awk '{for (i = 1; i <= NF; i++) if ($i !~ /^127\./ && $i != "::1") {print $i; exit}}'; }
head_ip="$(step "$head" hostname -I 2>/dev/null | first_ip)"
[ -n "$head_ip" ] || head_ip="$(step "$head" hostname --ip-address 2>/dev/null | first_ip)"
[ -n "$head_ip" ] || head_ip="$head"
address="$head_ip:$port"
joined() { "$ray" status --address="$address" 2>/dev/null | grep -c ' node_' || true; }
head_alive() {  # false, with why, once the head's step has ended
  kill -0 "$head_pid" 2>/dev/null && return 0
  wait "$head_pid"
  echo "[ray_slurm] ray head on $head ($address) ended (status $?) before the cluster was up; see its output above" >&2
  return 1
}
ended_workers() {  # the worker nodes whose `ray start` step has ended, for the timeout's message
  local i=0 out=""
  while [ "$i" -lt "${#worker_pids[@]}" ]; do
    kill -0 "${worker_pids[$i]}" 2>/dev/null || out+=" ${workers[$i]}"
    i=$((i + 1))
  done
  [ -z "$out" ] || echo "; ray start ended on:$out (see its output above)"
}
deadline=$((SECONDS + secs))

echo "[ray_slurm] head $head ($address), workers: ${workers[*]:-none}" >&2
"${srun_on[@]}" "$head" "$ray" start --head --node-ip-address="$head_ip" --port="$port" ${gpu_arg[@]+"${gpu_arg[@]}"} --block &
head_pid=$!
pids+=("$head_pid")
until [ "$(joined)" -ge 1 ] 2>/dev/null; do  # workers join a head that answers
  head_alive || exit 3
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "[ray_slurm] ray head on $head ($address) not answering after ${timeout}s" >&2; exit 3
  fi
  sleep 1
done
for h in ${workers[@]+"${workers[@]}"}; do
  "${srun_on[@]}" "$h" "$ray" start --address="$address" ${gpu_arg[@]+"${gpu_arg[@]}"} --block &
  worker_pids+=($!)
  pids+=($!)
done

while :; do
  up="$(joined)"
  [ "${up:-0}" -ge "$nodes" ] && break
  head_alive || exit 3
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "[ray_slurm] ray cluster not up after ${timeout}s: ${up:-0} of $nodes node(s) joined$(ended_workers)" >&2
    exit 3
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
