"""Continual pretraining of LLaMA2: `torchrun --nproc-per-node N -m megatron_mellama.pretrain <flags>`.

In this version the command validates the full configuration, builds the blended datasets
(`--data-path 15 bio 1 clin 4 gen`, or `--mock-data`), builds the model on the meta device,
materialises and initialises it, and runs the first global batch forward and backward in
micro-batches, then the first validation batch of each domain forward; it reports the losses, the
gradient norm and the throughput. There is no optimizer step yet, and multi-process layouts are
refused with a clear message until the parallel engine is in place.
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
        raise ConfigError(f"WORLD_SIZE={world_size}: this version runs in a single process only")
    if not cfg.data.mock_data and not cfg.data.data_path:
        raise ConfigError("--data-path is required (or --mock-data)")
    if cfg.train.train_iters is None and cfg.train.train_samples is None:
        cfg.train.train_iters = 1
    return cfg


def describe(cfg: Config) -> str:
    m = cfg.model
    heads = f"{m.num_attention_heads} heads" + (f" ({m.kv_heads} key/value)" if m.kv_heads != m.num_attention_heads else "")
    return (f"LLaMA2 {cfg.preset or 'custom'}: {m.num_layers} layers, hidden {m.hidden_size}, {heads}, "
            f"ffn {m.ffn_size}, vocab {m.padded_vocab_size}, sequence {cfg.seq_length}: "
            f"{parameter_count(m) / 1e6:,.2f}M parameters, "
            f"{training_flops_per_token(m, cfg.seq_length) / 1e6:,.1f} MFLOP per token (training)")


def _lm_loss(model, micro_batch, device, dtype) -> torch.Tensor:
    tokens, labels = micro_batch["tokens"].to(device), micro_batch["labels"].to(device)
    mask = micro_batch["loss_mask"].to(device)
    with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
        logits = model(tokens)
    losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")
    return (losses * mask.flatten()).sum() / mask.sum()


def run_example(cfg: Config) -> dict:
    """The first global batch forward and backward, each domain's first validation batch forward."""
    from .data.datasets import build_datasets
    from .data.loader import eval_batches, train_batches

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(describe(cfg), flush=True)
    data = build_datasets(cfg)
    model = build_model(cfg.model, device=device, seed=cfg.train.seed)
    dtype = torch.bfloat16 if cfg.train.bf16 else torch.float16 if cfg.train.fp16 else None

    start = time.perf_counter()
    global_batch = next(train_batches(cfg, data.train, consumed_samples=0, dp_rank=0, dp_size=1))
    total_loss = 0.0
    for micro_batch in global_batch:
        loss = _lm_loss(model, micro_batch, device, dtype) / len(global_batch)
        loss.backward()
        total_loss += loss.item()
    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    elapsed = time.perf_counter() - start
    seq = cfg.seq_length
    result = dict(lm_loss=total_loss, grad_norm=grad_norm, num_microbatches=len(global_batch),
                  tokens_per_sec=cfg.train.global_batch_size * seq / elapsed, validation={})
    source = "mock" if cfg.data.mock_data else "blended"
    print(f"forward/backward of {cfg.train.global_batch_size} x {seq} {source} tokens in {len(global_batch)} "
          f"micro-batches | lm loss {total_loss:.4f} | grad norm {grad_norm:.4f} | "
          f"{result['tokens_per_sec']:,.0f} tokens/s on {device}", flush=True)

    validation_sets = dict(data.valid_per_domain) or ({"all": data.valid} if data.valid is not None else {})
    if cfg.train.eval_iters > 0:
        with torch.no_grad():
            for name, dataset in validation_sets.items():
                first = next(iter(eval_batches(cfg, dataset, dp_rank=0, dp_size=1)))
                loss = sum(_lm_loss(model, mb, device, dtype).item() for mb in first) / len(first)
                result["validation"][name] = loss
                print(f"lm loss validation/{name}: {loss:.4f}", flush=True)
    return result


def main(argv=None) -> int:
    try:
        cfg = load_run_config(argv)
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        run_example(cfg)
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
