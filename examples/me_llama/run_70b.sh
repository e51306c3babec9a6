#!/usr/bin/env bash
# Me-LLaMA 70B end to end: examples/me_llama/run.sh with size 70b.
#   bash examples/me_llama/run_70b.sh prepare|train|export   (DRY_RUN=1 prints the commands)
exec bash "$(dirname "$0")/run.sh" 70b "$@"
