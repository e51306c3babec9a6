#!/usr/bin/env python
"""Summarise a Megatron indexed dataset; see megatron_mellama/tools/inspect_dataset.py or run with --help."""

import os
import sys

# Runnable from a clone without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mellama.tools.inspect_dataset import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
