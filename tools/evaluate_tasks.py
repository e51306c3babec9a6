"""Runs `megatron_mellama.tools.evaluate` from a clone, installed or not; see its --help."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mellama.tools.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
