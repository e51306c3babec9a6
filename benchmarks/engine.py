"""Training throughput of the engine beside transformers.LlamaForCausalLM, in one run.

    python benchmarks/engine.py                      # CPU: a small LLaMA2 shape, fp32
    python benchmarks/engine.py --shape 1b --bf16 --seq-length 4096 --micro-batch-size 1   # on a GPU

Both sides train the same config on the same batches with the same optimizer (AdamW, clipping at
1.0): tokens/s of whole optimizer steps after warm-up steps, and the ratio engine / transformers.
On a GPU it also reports TFLOP/s and MFU (bf16 dense peak given by --peak-tflops).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_mellama.model.hf_format import hf_config_dict  # noqa: E402
from megatron_mellama.config import parse_config  # noqa: E402
from megatron_mellama.model.flops import parameter_count, training_flops_per_token  # noqa: E402
from megatron_mellama.training.engine import Engine  # noqa: E402

SHAPES = {
    # CPU-sized: big enough that matrix multiplies dominate, small enough for a 2-core machine
    "small": ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "8",
              "--group-query-attention", "--num-query-groups", "4", "--ffn-hidden-size", "688",
              "--vocab-size", "8000", "--max-position-embeddings", "4096"],
    # ~1B LLaMA2-shaped (TinyLlama-like widths with LLaMA2's vocabulary)
    "1b": ["--num-layers", "22", "--hidden-size", "2048", "--num-attention-heads", "32",
           "--group-query-attention", "--num-query-groups", "4", "--ffn-hidden-size", "5632",
           "--vocab-size", "32000", "--max-position-embeddings", "4096"],
}


def _batches(cfg, steps, device):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        data = torch.randint(0, cfg.model.vocab_size, (cfg.train.global_batch_size, cfg.seq_length + 1), generator=g)
        out.append(data.to(device))
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_engine(cfg, batches, warmup, device) -> float:
    engine = Engine(cfg, device=device)
    mbs = cfg.train.micro_batch_size
    for i, data in enumerate(batches):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        micro = [dict(tokens=data[j:j + mbs, :-1], labels=data[j:j + mbs, 1:],
                      loss_mask=torch.ones_like(data[j:j + mbs, 1:], dtype=torch.float))
                 for j in range(0, len(data), mbs)]
        engine.step(micro)
    _sync(device)
    return time.perf_counter() - start


def time_transformers(cfg, batches, warmup, device) -> float:
    import transformers

    hf_cfg = transformers.LlamaConfig(**hf_config_dict(cfg.model), attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hf_cfg).to(device)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim == 1]
    o = cfg.optim
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=o.weight_decay),
                                   dict(params=no_decay, weight_decay=0.0)],
                                  lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps)
    dtype = torch.bfloat16 if cfg.train.bf16 else None
    mbs, n_micro = cfg.train.micro_batch_size, cfg.train.global_batch_size // cfg.train.micro_batch_size
    for i, data in enumerate(batches):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        for j in range(0, len(data), mbs):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = model(input_ids=data[j:j + mbs, :-1], labels=data[j:j + mbs, 1:]).loss
            (loss / n_micro).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--seq-length", type=int, default=256)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--global-batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2,
                    help="alternate the two sides this many times and keep each side's best (machine noise)")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="device dense bf16 peak (H100/H200 SXM: 989)")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    flags = SHAPES[args.shape] + ["--seq-length", str(args.seq_length), "--micro-batch-size", str(args.micro_batch_size),
                                  "--global-batch-size", str(args.global_batch_size), "--lr", "1e-4",
                                  "--weight-decay", "0.1", "--clip-grad", "1.0", "--lr-decay-style", "constant"]
    cfg = parse_config(flags + (["--bf16"] if args.bf16 else []))
    batches = _batches(cfg, args.warmup + args.steps, device)
    tokens = args.steps * cfg.train.global_batch_size * cfg.seq_length
    flops_per_token = training_flops_per_token(cfg.model, cfg.seq_length)
    print(f"shape {args.shape}: {parameter_count(cfg.model) / 1e6:,.1f}M parameters, sequence {cfg.seq_length}, "
          f"global batch {cfg.train.global_batch_size} (micro {cfg.train.micro_batch_size}), "
          f"{'bf16' if args.bf16 else 'fp32'} on {device} ({torch.get_num_threads()} threads)", flush=True)

    results, peak_memory = {}, {}
    for _ in range(args.repeats):
        for name, fn in (("engine", time_engine), ("transformers", time_transformers)):
            rate = tokens / fn(cfg, batches, args.warmup, device)
            results[name] = max(rate, results.get(name, 0.0))
            if device.type == "cuda":
                peak_memory[name] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.empty_cache()
    for name, rate in results.items():
        line = f"{name:>12}: {rate:,.0f} tokens/s"
        if device.type == "cuda":
            tflops = rate * flops_per_token / 1e12
            line += f", {tflops:,.1f} TFLOP/s, MFU {100 * tflops / args.peak_tflops:.1f}%"
            line += f", peak memory {peak_memory[name]:.1f} GiB"
        print(line, flush=True)
    print(f"ratio engine / transformers: {results['engine'] / results['transformers']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
