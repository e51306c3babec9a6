#!/usr/bin/env bash
# Me-LLaMA 13B end to end: examples/me_llama/run.sh with size 13b.
#   bash examples/me_llama/run_13b.sh prepare|train|export   (DRY_RUN=1 prints the commands)
exec bash "$(dirname "$0")/run.sh" 13b "$@"
