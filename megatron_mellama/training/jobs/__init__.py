"""The training loop's periodic jobs, one duty a file (the protocol and their order: `../periodic.py`)."""
