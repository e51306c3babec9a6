#!/usr/bin/env python
"""Compare two runs' metrics over their common iterations (table, exit code for CI, overlay PNG); see megatron_mellama/tools/compare_runs.py or --help."""

import os
import sys

# Runnable from a clone without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mellama.tools.compare_runs import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
