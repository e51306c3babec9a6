"""LLaMA2 on one device.

The math follows Hugging Face's `LlamaForCausalLM` (rotate-half RoPE, separate q/k/v and gate/up
projections, RMSNorm in fp32), and parameter names are Hugging Face's without the `model.` prefix,
so a Hugging Face state dict loads with a name map only. The norm, rotary embedding, SwiGLU,
attention and the loss go through `megatron_mellama.kernels`, which picks a backend for each; their
math, in plain PyTorch, is `kernels/reference.py`. Parallelism is applied to this module from
`megatron_mellama.parallel`; nothing here knows about it.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..config import ModelConfig
from .rope import rotary_tables, tables_in


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in fp32: bf16 loses the small variances of early layers
        return kernels.rms_norm(x, self.weight, self.eps)


class CausalAttention(nn.Module):
    """Each query attends to the keys at or before its position (within its document, when packed).
    A module of its own so that context parallelism (`parallel/context.py`) can replace it."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents=None) -> torch.Tensor:
        return kernels.attention(q, k, v, documents)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.attend = CausalAttention()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, documents=None) -> torch.Tensor:
        batch, seq, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds only its share of the heads
        q = self.q_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        q, k = kernels.apply_rotary_qk(q, k, cos, sin)
        # query head h reads key/value head h // (heads / kv_heads), as Hugging Face's repeat_kv
        out = self.attend(q, k, v, documents)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.ffn_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.ffn_size, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, documents=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, documents)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """tokens (batch, seq) -> logits (batch, seq, vocab); with labels, the summed token loss.

    `model(tokens, labels)` returns the cross-entropy summed over the tokens whose label is not -100,
    computed chunk by chunk without materialising the logits (`kernels.linear_cross_entropy`);
    with `per_row=True` (under no_grad: scoring choices by log-likelihood) the sum of each sequence,
    a [batch] tensor.
    Packed documents: `position_ids` (batch, seq) restart the rotary positions at each document, and
    `document_ids` (batch, seq), each token's document, keep attention within documents.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size)
        # a dict keyed by the global layer index, so a pipeline stage that keeps some layers
        # keeps their full names ("layers.17...") and checkpoints stay layout-independent
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg) for i in range(cfg.num_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.padded_vocab_size, bias=False)
        cos, sin = rotary_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # document ids (batch, seq) -> what every layer's attention takes for packed documents, made
        # once per forward; context parallelism puts the mask of its rank's queries here
        self.document_mask = kernels.document_mask
        # a list to append each training call's per-row summed losses to (the training loss per
        # domain, `training/domain_loss.py`), None when nobody asks
        self.row_losses: list | None = None

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                per_row: bool = False) -> torch.Tensor:
        # A pipeline stage replaces the parts it does not own with None; on the first stage the
        # input is token ids, on the others the previous stage's hidden states.
        h = self.embed_tokens(tokens) if self.embed_tokens is not None else tokens
        # whole tables, or gathered for the whole sequence: with sequence parallelism h holds only
        # a slice of the sequence here, attention sees all of it. In h's dtype, converted once, not
        # by FSDP2 in every layer (`rope.tables_in`)
        cos, sin = tables_in(self.rope_cos, self.rope_sin, h.dtype)
        if position_ids is not None:
            cos, sin = cos[position_ids], sin[position_ids]
        documents = self.document_mask(document_ids) if document_ids is not None else None
        for layer in self.layers.values():
            h = layer(h, cos, sin, documents)
        h = self.norm(h) if self.norm is not None else h
        if self.lm_head is None:
            return h
        if labels is not None:
            return kernels.linear_cross_entropy(h, self.lm_head.weight, labels, per_row=per_row,
                                                row_sums=None if per_row else self.row_losses)
        return self.lm_head(h)
