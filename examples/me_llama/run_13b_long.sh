#!/usr/bin/env bash
# Me-LLaMA 13B to a 16k context: examples/me_llama/run.sh with size 13b-long, from the checkpoint
# run_13b.sh trained (checkpoints/me-llama-13b).
#   bash examples/me_llama/run_13b_long.sh train|export   (DRY_RUN=1 prints the commands)
exec bash "$(dirname "$0")/run.sh" 13b-long "$@"
