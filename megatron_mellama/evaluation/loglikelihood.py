"""Single-process `loglikelihood_fn`s for `scoring.score_task`: our `Llama` and transformers' LLaMA.

Each takes rows (`tokens`, `labels`, `loss_mask`, all [B, S]) and returns [B] fp32: the summed
log-probability of the labels where the mask is 1. The log-softmax is taken in fp32 whatever the
model's dtype. Columns past the last masked position of the batch are cut before the forward:
rows end with padding, attention is causal, so those columns cannot change the scored positions,
and a task of short questions then costs its own length rather than the model's.
"""

from __future__ import annotations

import torch


def _masked_sum(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (picked * loss_mask.float()).sum(-1)


def _used_length(loss_mask: torch.Tensor) -> int:
    columns = loss_mask.any(dim=0).nonzero()
    return int(columns[-1]) + 1 if len(columns) else 1


def llama_loglikelihood_fn(model):
    """For `megatron_mellama.model.llama.Llama`: `model(tokens)` returns logits.

    The logits are cut to the real vocabulary (`cfg.vocab_size`): rows past it only pad the
    embedding for tensor parallelism, and the exported Hugging Face model has none, so both
    normalise over the same tokens and give the same numbers."""
    vocab = model.cfg.vocab_size
    device = next(model.parameters()).device

    @torch.no_grad()
    def loglikelihood(tokens, labels, loss_mask):
        n = _used_length(loss_mask)
        tokens, labels, loss_mask = (t[:, :n].to(device) for t in (tokens, labels, loss_mask))
        logits = model(tokens)[..., :vocab]
        return _masked_sum(logits, labels, loss_mask).cpu()

    return loglikelihood


def hf_loglikelihood_fn(model):
    """For a `transformers` causal LM (`LlamaForCausalLM`): `model(input_ids=...).logits`."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def loglikelihood(tokens, labels, loss_mask):
        n = _used_length(loss_mask)
        tokens, labels, loss_mask = (t[:, :n].to(device) for t in (tokens, labels, loss_mask))
        logits = model(input_ids=tokens).logits
        return _masked_sum(logits, labels, loss_mask).cpu()

    return loglikelihood
