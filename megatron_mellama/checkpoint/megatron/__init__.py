"""Megatron-LM checkpoints (torch_dist, torch and the legacy names) read into ours, and ours written as them."""
