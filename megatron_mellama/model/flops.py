"""Parameter count and training FLOPs per token, from the shape alone (for MFU).

FLOPs follow the convention of Megatron-LM and PaLM: every matrix multiply counts 2 x m x n x k,
the backward pass costs twice the forward, and causal attention is counted in full (no halving
for the mask), so MFU figures compare with theirs.
"""

from __future__ import annotations

from ..config import ModelConfig


def layer_matmul_params(cfg: ModelConfig) -> int:
    h, kv = cfg.hidden_size, cfg.kv_heads * cfg.head_dim
    attention = h * h + 2 * h * kv + h * h  # q, k, v, o
    mlp = 3 * h * cfg.ffn_size  # gate, up, down
    return attention + mlp


def parameter_count(cfg: ModelConfig, padded: bool = True) -> int:
    """All parameters: embedding, blocks (with their two norms), final norm, untied output layer."""
    vocab = cfg.padded_vocab_size if padded else cfg.vocab_size
    per_layer = layer_matmul_params(cfg) + 2 * cfg.hidden_size
    return 2 * vocab * cfg.hidden_size + cfg.num_layers * per_layer + cfg.hidden_size


def forward_flops_per_token(cfg: ModelConfig, seq_length: int) -> int:
    """Matrix-multiply FLOPs of one token's forward pass in a sequence of `seq_length`.

    The embedding lookup multiplies nothing; the output layer does. Attention adds QK^T and
    scores x V: 2 x 2 x seq x (heads x head_dim) per layer.
    """
    matmuls = cfg.num_layers * layer_matmul_params(cfg) + cfg.padded_vocab_size * cfg.hidden_size
    attention = cfg.num_layers * 4 * seq_length * cfg.num_attention_heads * cfg.head_dim
    return 2 * matmuls + attention


def training_flops_per_token(cfg: ModelConfig, seq_length: int) -> int:
    """Forward plus backward (twice the forward); recomputation is not counted, as in MFU."""
    return 3 * forward_flops_per_token(cfg, seq_length)
