#!/usr/bin/env python
"""Concatenate Megatron indexed datasets; see megatron_mellama/tools/merge_datasets.py or run with --help."""

import os
import sys

# Runnable from a clone without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mellama.tools.merge_datasets import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
