#!/usr/bin/env python
"""Rank TP x PP x DP layouts by estimated memory and step time; see megatron_mellama/tools/plan_layout.py or --help."""

import os
import sys

# Runnable from a clone without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mellama.tools.plan_layout import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
