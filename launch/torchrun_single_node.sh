#!/usr/bin/env bash
# Single-node training: one torchrun starting one process per GPU of this machine.
#
#   bash launch/torchrun_single_node.sh --config examples/me_llama/me_llama_13b.yaml --train-iters 100
#   GPUS_PER_NODE=4 bash launch/torchrun_single_node.sh --model llama2-7b --mock-data --train-iters 10
#   DRY_RUN=1 bash launch/torchrun_single_node.sh <flags>     # print the command, run nothing
#   MAX_RESTARTS=0 bash launch/torchrun_single_node.sh <flags>  # a failure ends the job
#
# Restarts: when a trainer fails (a crash, a killed process), torchrun stops the others and starts
# them all again, up to MAX_RESTARTS times (default 3; torchrun's --max-restarts). A restart resumes
# from `latest` only when the run loads its own checkpoints: pass `--save DIR --load DIR` (or
# `--pretrained-checkpoint PRE --save DIR`); with `--finetune --load PRE` a restart that finds
# checkpoints in --save is refused by the --save guard instead of starting over. A configuration
# error is restarted too (each attempt fails the same way, in seconds).
#
# Every argument is handed to `megatron_mellama.pretrain` unchanged (see its --help); relative
# paths in them are resolved from the directory you run this from.
set -euo pipefail

# --- settings (override from the environment) -------------------------------------------------
# One process per GPU; without nvidia-smi (or without GPUs) one process, e.g. a CPU smoke test.
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    GPUS_PER_NODE=$( (nvidia-smi --list-gpus 2>/dev/null || true) | grep -c '^GPU' || true)
    [[ "$GPUS_PER_NODE" -gt 0 ]] || GPUS_PER_NODE=1
fi
# torchrun would otherwise set 1 thread per process silently; make the choice visible. Raise it
# for CPU-side work (data loading runs in --num-workers processes, not threads).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Let `-m megatron_mellama.pretrain` import from this checkout even without `pip install -e .`.
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
DRY_RUN="${DRY_RUN:-0}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"

# --standalone: a private rendezvous on localhost with a free port, so several single-node runs
# can share a machine without choosing ports.
CMD=(torchrun --standalone --nproc-per-node "$GPUS_PER_NODE" --max-restarts "$MAX_RESTARTS" -m megatron_mellama.pretrain "$@")

if [[ "$DRY_RUN" == 1 ]]; then
    # shell-quoted, so the printed line can be pasted back as is
    printf -v line '%q ' "${CMD[@]}"
    echo "${line% }"
    exit 0
fi
# Under srun (and with scancel --signal=USR1), SIGUSR1 reaches every process of the step, torchrun
# included, whose default action is to die and take its trainers down mid-save. The ignore is
# inherited by the trainers, which install their own handler; SIGTERM keeps its default, so
# torchrun still passes it on to them.
trap "" USR1
exec "${CMD[@]}"
