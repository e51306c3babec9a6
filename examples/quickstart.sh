#!/usr/bin/env bash
# The whole Me-LLaMA pipeline in miniature, on one CPU machine (or GPUs when present):
#   1. a small three-domain corpus (biomedical, clinical, general), a SentencePiece tokenizer, and
#      a multiple-choice "general knowledge" task from the general domain's sentences
#   2. each domain preprocessed to Megatron .bin/.idx
#   3. a tiny LLaMA2 (GQA) created in Hugging Face format and imported
#   4. continual pretraining on the 15:1:4 blend with TP 2 x PP 2 (4 processes), evaluating each
#      domain and scoring the general task (is general knowledge kept?); stopped half way (as a
#      preemption would) and resumed from its checkpoint
#   5. exported to Hugging Face, loaded with transformers, and asked for a short generation
# Everything goes under $OUT (default outputs/quickstart). Extra arguments go to both training runs.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-outputs/quickstart}"
NPROC="${NPROC:-4}"
ITERS="${ITERS:-60}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
rm -rf "$OUT" && mkdir -p "$OUT/data"

echo "== 1. corpus and tokenizer"
python examples/quickstart/helpers.py corpus "$OUT/raw"
python examples/quickstart/helpers.py general-task "$OUT/raw"
python examples/quickstart/helpers.py tokenizer "$OUT/raw"
cp "$OUT/raw/tokenizer.model" "$OUT/tokenizer.model"

echo "== 2. preprocessing each domain"
for domain in bio clin gen; do
    python tools/preprocess_data.py --input "$OUT/raw/$domain.jsonl" --output-prefix "$OUT/data/$domain" \
        --tokenizer-type Llama2Tokenizer --tokenizer-model "$OUT/tokenizer.model" --append-eod --workers 2 \
        --log-interval 1000
done

echo "== 3. a LLaMA2 to start from, imported from Hugging Face format"
python examples/quickstart/helpers.py hf-model "$OUT"
python checkpoints_convert/hf_to_mellama.py --hf-dir "$OUT/hf_start" --save "$OUT/imported" --no-progress

TRAIN=(
    --num-layers 4 --hidden-size 128 --num-attention-heads 4 --group-query-attention --num-query-groups 2
    --ffn-hidden-size 344 --max-position-embeddings 256 --seq-length 128
    --tokenizer-type Llama2Tokenizer --tokenizer-model "$OUT/tokenizer.model"
    --data-path 15 "$OUT/data/bio_text_document" 1 "$OUT/data/clin_text_document" 4 "$OUT/data/gen_text_document"
    --split 98,2,0 --data-cache-path "$OUT/cache"
    --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel
    --micro-batch-size 2 --global-batch-size 8 --train-iters "$ITERS"
    --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-fraction 0.05
    --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 1e-5 --clip-grad 1.0
    --log-interval 10 --eval-interval $((ITERS / 2)) --eval-iters 2 --num-workers 0
    --eval-tasks general="$OUT/raw/general_task.jsonl"
    --save "$OUT/checkpoints" --save-interval $((ITERS / 2))
    --tensorboard-dir "$OUT/tensorboard" --log-file "$OUT/metrics.jsonl" --seed 1234
)

echo "== 4a. continual pretraining from the imported model, stopped half way"
torchrun --standalone --nproc-per-node "$NPROC" -m megatron_mellama.pretrain "${TRAIN[@]}" \
    --load "$OUT/imported" --finetune --exit-interval $((ITERS / 2)) "$@"

echo "== 4b. resumed from $OUT/checkpoints (iteration $(cat "$OUT/checkpoints/latest"))"
torchrun --standalone --nproc-per-node "$NPROC" -m megatron_mellama.pretrain "${TRAIN[@]}" \
    --load "$OUT/checkpoints" "$@"

echo "== 5. export to Hugging Face, load with transformers"
python checkpoints_convert/mellama_to_hf.py --load "$OUT/checkpoints" --hf-dir "$OUT/hf_final" \
    --tokenizer-model "$OUT/tokenizer.model" --no-progress
python examples/quickstart/helpers.py generate "$OUT/hf_final" "The patient presents with"

python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
records = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
train = [r for r in records if "lm_loss" in r]
evals = [r for r in records if "eval" in r]
downstream = [r for r in records if "downstream" in r]
print("\n== summary")
print(f"lm loss: {train[0]['lm_loss']:.3f} at iteration {train[0]['iteration']} -> "
      f"{train[-1]['lm_loss']:.3f} at iteration {train[-1]['iteration']}")
for r in evals:
    print(f"validation at iteration {r['iteration']}: " +
          ", ".join(f"{k} {v['lm_loss']:.3f}" for k, v in r["eval"].items()))
for r in downstream:
    print(f"downstream accuracy at iteration {r['iteration']}: " +
          ", ".join(f"{k} acc {v['acc']:.3f} acc_norm {v['acc_norm']:.3f}" for k, v in r["downstream"].items()))
print(f"TensorBoard logs:    {out}/tensorboard   (tensorboard --logdir {out}/tensorboard)")
print(f"metrics (JSON lines): {out}/metrics.jsonl")
print(f"checkpoints:         {out}/checkpoints (latest: {open(f'{out}/checkpoints/latest').read().strip()})")
print(f"exported model:      {out}/hf_final (transformers.AutoModelForCausalLM.from_pretrained)")
PY
# the run's curves in one picture (loss, per-domain validation, learning rate, grad norm, accuracy, tokens/s)
curves=$(python tools/plot_run.py "$OUT/metrics.jsonl" --output "$OUT/metrics.png")
echo "curves:              $curves (look at it)"
