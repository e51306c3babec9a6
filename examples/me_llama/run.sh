#!/usr/bin/env bash
# Me-LLaMA end to end, for LLaMA2-13B or -70B: tokenize the three domains, import LLaMA2 from
# Hugging Face, continue pretraining under SLURM with examples/me_llama/me_llama_<size>.yaml,
# export to Hugging Face. run_13b.sh and run_70b.sh call this with their size.
#
#   bash examples/me_llama/run.sh 13b prepare   # steps 1-2: data and the imported checkpoint
#   bash examples/me_llama/run.sh 13b train     # step 3: submit (again after a preemption/time-out)
#   bash examples/me_llama/run.sh 13b export    # step 4: once training has finished
#   DRY_RUN=1 bash examples/me_llama/run.sh 70b train   # print the commands, run nothing
#   bash examples/me_llama/run.sh 13b-long train  # extend Me-LLaMA 13B to a 16k context (after 13b)
#
# Run it from the repository root; every path below is a variable and may be set from outside.
set -euo pipefail

SIZE="${1:-}"
START=()  # what the first launch adds to starting from $IMPORTED
case "$SIZE" in
    13b) DEFAULT_NODES=8 ;;   # x 8 GPUs: the recipe's TP 4 x DP 16
    70b) DEFAULT_NODES=16 ;;  # x 8 GPUs: the recipe's TP 8 x PP 4 x DP 4
    # the long-context stage starts from Me-LLaMA 13B's own checkpoint, with new RoPE values
    13b-long) DEFAULT_NODES=8; START=(--extend-context)
              IMPORTED="${IMPORTED:-checkpoints/me-llama-13b}" ;;
    *) echo "usage: $0 13b|70b|13b-long prepare|train|export" >&2; exit 2 ;;
esac
MODEL_SIZE="${SIZE%-long}"

# --- paths and sizes ---------------------------------------------------------------------------
HF_LLAMA="${HF_LLAMA:-checkpoints/Llama-2-$MODEL_SIZE-hf}"  # meta-llama/Llama-2-<size>-hf, downloaded
TOKENIZER="${TOKENIZER:-$HF_LLAMA/tokenizer.model}"       # LLaMA2's SentencePiece model
RAW_DIR="${RAW_DIR:-raw}"                                 # raw/{bio,clin,gen}/*.jsonl, {"text": ...}
DATA_DIR=data                                             # fixed: the recipe's --data-path reads data/*
IMPORTED="${IMPORTED:-checkpoints/llama2-$SIZE-hf-import}"  # LLaMA2 weights as our iteration 0
SAVE="${SAVE:-checkpoints/me-llama-$SIZE}"                  # training checkpoints
EXPORT="${EXPORT:-checkpoints/Me-LLaMA-$SIZE-hf}"           # the final Hugging Face folder
CONFIG="examples/me_llama/me_llama_${SIZE//-/_}.yaml"
NODES="${NODES:-$DEFAULT_NODES}"
WORKERS="${WORKERS:-32}"                                  # tokenizing processes per domain
DRY_RUN="${DRY_RUN:-0}"

run() {  # run a command, or with DRY_RUN=1 only print it
    if [[ "$DRY_RUN" == 1 ]]; then printf -v line '%q ' "$@"; echo "${line% }"; else "$@"; fi
}

prepare() {
    # 1. Tokenize each domain into Megatron's .bin/.idx, one end-of-document token per document.
    #    Writes data/bio_text_document.{bin,idx}, data/clin_..., data/gen_...; done domains are kept.
    run mkdir -p "$DATA_DIR"
    for domain in bio clin gen; do
        if [[ -f "$DATA_DIR/${domain}_text_document.idx" ]]; then continue; fi
        run python tools/preprocess_data.py --input "$RAW_DIR/$domain/*.jsonl" \
            --output-prefix "$DATA_DIR/$domain" --tokenizer-type Llama2Tokenizer \
            --tokenizer-model "$TOKENIZER" --workers "$WORKERS" --append-eod
    done

    # 2. Import LLaMA2 from Hugging Face as iteration 0 of our checkpoint format (weights only,
    #    in fp32: the training keeps fp32 master weights). Any TP/PP layout can load it.
    if [[ "$SIZE" != *-long && ! -f "$IMPORTED/latest" ]]; then
        run python checkpoints_convert/hf_to_mellama.py --hf-dir "$HF_LLAMA" --save "$IMPORTED" --dtype fp32
    fi
}

train() {
    # 3. Continue pretraining, one command line for every launch: --pretrained-checkpoint makes
    #    the first start from the imported LLaMA2 weights as --finetune does (weights only,
    #    iteration 0, fresh optimizer and LR schedule) and every later one (this step run again
    #    after a preemption or time-out, or `scontrol requeue`) resume $SAVE, restoring optimizer,
    #    LR schedule, RNG, iteration and data position.
    run mkdir -p logs
    run sbatch --nodes "$NODES" --job-name "me-llama-$SIZE" launch/slurm_multi_node.sbatch \
        --config "$CONFIG" --tokenizer-model "$TOKENIZER" --pretrained-checkpoint "$IMPORTED" \
        ${START[@]+"${START[@]}"} --save "$SAVE"
}

export_hf() {
    # 4. Export the newest checkpoint to a Hugging Face folder (bf16 safetensors + tokenizer), ready
    #    for instruction tuning and evaluation with transformers.
    run python checkpoints_convert/mellama_to_hf.py --load "$SAVE" --hf-dir "$EXPORT" --overwrite \
        --tokenizer-model "$TOKENIZER" --dtype bf16
}

case "${2:-}" in
    prepare) prepare ;;
    train) train ;;
    export) export_hf ;;
    *) echo "usage: $0 13b|70b|13b-long prepare|train|export" >&2; exit 2 ;;
esac
