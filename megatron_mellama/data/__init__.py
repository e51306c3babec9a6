"""Data: tokenizers, indexed datasets and blends, the resumable loader."""
