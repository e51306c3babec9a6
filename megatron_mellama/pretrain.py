"""Continual pretraining of LLaMA2: `torchrun --nproc-per-node N -m megatron_mellama.pretrain <flags>`.

In this version the command validates the full configuration and runs the built-in example: the
model is built on the meta device, materialised, initialised, and one global batch of mock tokens
(`--mock-data`) goes forward and backward through it in micro-batches, reporting the loss, the
gradient norm and the throughput. Multi-process layouts and real data are refused with a clear
message until the engine and the data pipeline are in place.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

from .config import Config, ConfigError, build_parser, parse_config
from .model import build_model
from .model.flops import parameter_count, training_flops_per_token

PROG = "megatron_mellama.pretrain"


def _tokenizer_vocab_size(data) -> int:
    from .data.tokenizer import build_tokenizer

    return build_tokenizer(data.tokenizer_type, data.tokenizer_model).vocab_size


def load_run_config(argv=None) -> Config:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    parser = build_parser(prog=PROG, description=__doc__.split("\n\n")[0])
    cfg = parse_config(argv, world_size=world_size, vocab_size_of=_tokenizer_vocab_size, parser=parser)
    if world_size > 1:
        raise ConfigError(f"WORLD_SIZE={world_size}: this version trains in a single process only")
    if not cfg.data.mock_data:
        raise ConfigError("--data-path: training on indexed data is not available in this version; "
                          "pass --mock-data to run on random tokens")
    return cfg


def describe(cfg: Config) -> str:
    m = cfg.model
    heads = f"{m.num_attention_heads} heads" + (f" ({m.kv_heads} key/value)" if m.kv_heads != m.num_attention_heads else "")
    return (f"LLaMA2 {cfg.preset or 'custom'}: {m.num_layers} layers, hidden {m.hidden_size}, {heads}, "
            f"ffn {m.ffn_size}, vocab {m.padded_vocab_size}, sequence {cfg.seq_length}: "
            f"{parameter_count(m) / 1e6:,.2f}M parameters, "
            f"{training_flops_per_token(m, cfg.seq_length) / 1e6:,.1f} MFLOP per token (training)")


def run_example(cfg: Config) -> dict:
    """One global batch of mock tokens forward and backward; returns what it printed."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(describe(cfg), flush=True)
    model = build_model(cfg.model, device=device, seed=cfg.train.seed)
    generator = torch.Generator(device="cpu").manual_seed(cfg.train.seed)
    dtype = torch.bfloat16 if cfg.train.bf16 else torch.float16 if cfg.train.fp16 else None

    start = time.perf_counter()
    micro, seq = cfg.train.micro_batch_size, cfg.seq_length
    total_loss = 0.0
    for _ in range(cfg.num_microbatches):
        tokens = torch.randint(0, cfg.model.vocab_size, (micro, seq + 1), generator=generator).to(device)
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()) / cfg.num_microbatches
        loss.backward()
        total_loss += loss.item()
    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    elapsed = time.perf_counter() - start

    tokens_done = cfg.train.global_batch_size * seq
    result = dict(lm_loss=total_loss, grad_norm=grad_norm, tokens_per_sec=tokens_done / elapsed,
                  num_microbatches=cfg.num_microbatches)
    print(f"forward/backward of {cfg.train.global_batch_size} x {seq} mock tokens in {cfg.num_microbatches} "
          f"micro-batches | lm loss {total_loss:.4f} | grad norm {grad_norm:.4f} | "
          f"{result['tokens_per_sec']:,.0f} tokens/s on {device}", flush=True)
    return result


def main(argv=None) -> int:
    try:
        cfg = load_run_config(argv)
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    run_example(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
