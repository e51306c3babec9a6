#!/usr/bin/env bash
# The built-in example: a tiny LLaMA2 (GQA) from the `tiny` preset, one global batch of mock
# tokens forward and backward on CPU (or the GPU when there is one). Runs in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m megatron_mellama.pretrain \
    --model tiny \
    --mock-data \
    --seq-length 128 \
    --micro-batch-size 2 \
    --global-batch-size 8 \
    --seed 1234 \
    "$@"
