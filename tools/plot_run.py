#!/usr/bin/env python
"""Draw a run's curves (loss, validation per domain, learning rate, grad norm, accuracy, tokens/s, memory) in one PNG; see megatron_mellama/tools/plot_run.py or --help."""

import os
import sys

# Runnable from a clone without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mellama.tools.plot_run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
