"""Runnable from a clone without installing: `python checkpoints_convert/mellama_to_megatron.py --help`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mellama.tools.mellama_to_megatron import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
