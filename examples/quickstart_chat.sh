#!/usr/bin/env bash
# The Me-LLaMA-chat stage in miniature, after examples/quickstart.sh (whose model it instruction-tunes):
#   1. a task with one right answer per question: questions about made-up patient records
#   2. the conversations rendered with LLaMA-2-chat's template into token and loss-mask .bin/.idx
#   3. the continually pretrained model exported with that template and asked the held-out questions
#   4. instruction tuning (`pretrain --sft`) from the pretraining checkpoint, data parallel with FSDP
#   5. exported to Hugging Face (the chat template in tokenizer_config.json) and asked again through
#      transformers' apply_chat_template + greedy generate: the accuracy before and after
# Everything goes under $OUT/chat (OUT as for the quickstart). Extra arguments go to the training run.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-outputs/quickstart}"
NPROC="${NPROC:-2}"
ITERS="${ITERS:-250}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [ ! -f "$OUT/checkpoints/latest" ]; then
    echo "quickstart_chat.sh: no $OUT/checkpoints/latest: run examples/quickstart.sh first (same OUT)" >&2
    exit 2
fi
CHAT="$OUT/chat"
rm -rf "$CHAT" && mkdir -p "$CHAT/data"

echo "== 1. the task"
python examples/quickstart/chat_task.py data "$CHAT/raw"

echo "== 2. conversations to token and loss-mask binaries"
python tools/preprocess_sft.py --input "$CHAT/raw/train.jsonl" --output-prefix "$CHAT/data/records" \
    --tokenizer-type Llama2Tokenizer --tokenizer-model "$OUT/tokenizer.model" --seq-length 256

echo "== 3. the pretrained model, before instruction tuning"
python checkpoints_convert/mellama_to_hf.py --load "$OUT/checkpoints" --hf-dir "$CHAT/hf_before" \
    --tokenizer-model "$OUT/tokenizer.model" --chat-template llama-2 --no-progress
python examples/quickstart/chat_task.py accuracy "$CHAT/hf_before" "$CHAT/raw/test.jsonl" \
    --label "before instruction tuning"

echo "== 4. instruction tuning from the pretraining checkpoint"
torchrun --standalone --nproc-per-node "$NPROC" -m megatron_mellama.pretrain \
    --num-layers 4 --hidden-size 128 --num-attention-heads 4 --group-query-attention --num-query-groups 2 \
    --ffn-hidden-size 344 --max-position-embeddings 256 --seq-length 256 \
    --tokenizer-type Llama2Tokenizer --tokenizer-model "$OUT/tokenizer.model" \
    --sft --data-path "$CHAT/data/records" --split 98,2,0 \
    --data-parallel-sharding full --micro-batch-size 8 --global-batch-size 16 --train-iters "$ITERS" \
    --lr 3e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-fraction 0.05 \
    --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 1e-5 --clip-grad 1.0 \
    --log-interval 50 --eval-interval "$ITERS" --eval-iters 2 --num-workers 0 --seed 1234 \
    --load "$OUT/checkpoints" --finetune --save "$CHAT/checkpoints" --log-file "$CHAT/metrics.jsonl" "$@"

echo "== 5. exported with its chat template, asked again"
python checkpoints_convert/mellama_to_hf.py --load "$CHAT/checkpoints" --hf-dir "$CHAT/hf_chat" \
    --tokenizer-model "$OUT/tokenizer.model" --no-progress
python examples/quickstart/chat_task.py accuracy "$CHAT/hf_chat" "$CHAT/raw/test.jsonl" \
    --label "after instruction tuning"
echo "instruction-tuned model: $CHAT/hf_chat (tokenizer.apply_chat_template + model.generate in transformers)"
