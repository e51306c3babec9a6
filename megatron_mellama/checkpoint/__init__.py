"""Checkpoints: DCP save/load and Hugging Face / Meta conversion maps."""
