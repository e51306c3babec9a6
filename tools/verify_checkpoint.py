#!/usr/bin/env python
"""Verify a checkpoint against its checksums; see megatron_mellama/tools/verify_checkpoint.py or run with --help."""

import os
import sys

# Runnable from a clone without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mellama.tools.verify_checkpoint import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
