"""Megatron-style LLaMA2 continual pretraining (Me-LLaMA)."""
