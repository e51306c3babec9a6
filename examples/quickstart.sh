#!/usr/bin/env bash
# The built-in example: a tiny LLaMA2 (GQA) from the `tiny` preset, trained on megatron-core's mock
# data with tensor parallel 2 x pipeline parallel 2 on 4 CPU processes (gloo), or on 4 GPUs when
# there are. Loss falls within a minute; per-domain validation runs at iterations 20 and 40.
# Extra arguments are passed to pretrain (e.g. --train-iters 100).
set -euo pipefail
cd "$(dirname "$0")/.."

NPROC="${NPROC:-4}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

torchrun --standalone --nproc-per-node "$NPROC" -m megatron_mellama.pretrain \
    --model tiny \
    --vocab-size 1024 \
    --mock-data \
    --seq-length 64 \
    --tensor-model-parallel-size 2 \
    --pipeline-model-parallel-size 2 \
    --sequence-parallel \
    --micro-batch-size 2 \
    --global-batch-size 8 \
    --train-iters 40 \
    --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-fraction 0.05 \
    --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 1e-5 --clip-grad 1.0 \
    --log-interval 5 --eval-interval 20 --eval-iters 2 \
    --seed 1234 \
    "$@"
