"""Continual pretraining of LLaMA2: `torchrun --nproc-per-node N -m megatron_mellama.pretrain <flags>`.

Validates the whole configuration before any work, builds the blended datasets
(`--data-path 15 bio 1 clin 4 gen`, or `--mock-data`), builds the model for the TP x PP x DP layout
of the processes torchrun started, and trains for `--train-iters`, logging every
`--log-interval` (console, TensorBoard, `--log-file`), evaluating each domain every
`--eval-interval`, saving every `--save-interval`, resuming from `--load`, and stopping cleanly
(checkpoint, exit 0) on SIGTERM/SIGUSR1, `--exit-interval` or `--exit-duration-in-mins`.
"""

from __future__ import annotations

import argparse
import os
import sys

from .config import Config, ConfigError, as_given, build_parser, read_given, resolve, validate
from .config.paths import prepare_output_paths
from .errors import MellamaError
from .models import model_spec
from .training.stop_signals import StopSignals

PROG = "megatron_mellama.pretrain"


def _tokenizer_vocab_size(data) -> int:
    from .data.tokenizer import build_tokenizer

    return build_tokenizer(data.tokenizer_type, data.tokenizer_model).vocab_size


def _add_dry_run_flags(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    """The dry-run flags; without `defaults` they only show in --help (never in the parsed values)."""
    g = parser.add_argument_group("dry run: trace one step of the real layout on this machine's CPU, nothing trained")
    g.add_argument("--dry-run", action="store_true", default=False if defaults else argparse.SUPPRESS,
                   help="build the model for one rank of the run under a fake process group and fake tensors, "
                        "trace one optimizer step, print peak memory by kind and communication per step, exit")
    g.add_argument("--world-size", type=int, default=None if defaults else argparse.SUPPRESS, metavar="GPUS",
                   help="with --dry-run: the number of GPUs the real run will have (default: WORLD_SIZE, or 1)")
    g.add_argument("--dry-run-ranks", type=int, nargs="+", default=None if defaults else argparse.SUPPRESS, metavar="RANK",
                   help="with --dry-run: the ranks to trace (default: rank 0 and the first rank of the last "
                        "pipeline stage)")
    g.add_argument("--gpu-memory-gb", type=float, default=80.0 if defaults else argparse.SUPPRESS,
                   help="with --dry-run: memory of one GPU in GiB, to say whether the peak fits (default 80)")


def _split_dry_run_flags(argv) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _add_dry_run_flags(parser)
    dry, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if not dry.dry_run and (dry.world_size is not None or dry.dry_run_ranks is not None):
        raise ConfigError("--world-size and --dry-run-ranks are for --dry-run")
    if dry.world_size is not None and dry.world_size < 1:
        raise ConfigError(f"--world-size must be positive, got {dry.world_size}")
    return dry, rest


def resolve_run_config(argv=None, world_size: int = 1) -> tuple[Config, list[str]]:
    """Flags (and their YAML file) -> the validated Config of a run of `world_size` processes, with
    the model values recorded by the checkpoint it loads among the inputs of `resolve`; and a line
    per value taken from that checkpoint."""
    parser = build_parser(prog=PROG, description=__doc__.split("\n\n")[0])
    _add_dry_run_flags(parser, defaults=False)  # listed by --help; taken out of argv before parsing
    given = read_given(argv, parser)
    from .checkpoint.recorded_config import recorded_model_values  # after the flags: --help stays quick

    cfg, taken = resolve(given, world_size=world_size, vocab_size_of=_tokenizer_vocab_size,
                         recorded_model=recorded_model_values(as_given(given)))
    validate(cfg)
    return cfg, taken


def load_run_config(argv=None, world_size: int | None = None) -> Config:
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    cfg, taken = resolve_run_config(argv, world_size)
    if not cfg.data.mock_data and not cfg.data.data_path:
        raise ConfigError("--data-path is required (or --mock-data)")
    if cfg.train.train_iters is None and cfg.train.train_samples is None:
        raise ConfigError("--train-iters or --train-samples is required")
    if os.environ.get("RANK", "0") == "0":
        for line in taken:
            print(f"from the checkpoint: {line}", flush=True)
    return cfg


def describe(cfg: Config) -> str:
    m, p = cfg.model, cfg.parallel
    heads = f"{m.num_attention_heads} heads" + (f" ({m.kv_heads} key/value)" if m.kv_heads != m.num_attention_heads else "")
    return (f"LLaMA2 {cfg.preset or 'custom'}: {m.num_layers} layers, hidden {m.hidden_size}, {heads}, "
            f"ffn {m.ffn_size}, vocab {m.padded_vocab_size}, sequence {cfg.seq_length}: "
            f"{model_spec().parameter_count(m) / 1e6:,.2f}M parameters, "
            f"{model_spec().training_flops_per_token(m, cfg.seq_length) / 1e6:,.1f} MFLOP per token (training)\n"
            f"layout: TP {p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size} x "
            f"DP {p.data_parallel_size}"
            f"{f' x CP {p.context_parallel_size}' if p.context_parallel_size > 1 else ''}"
            f" ({p.data_parallel_sharding} sharding"
            f"{', sequence parallel' if p.sequence_parallel else ''}"
            f"{', ' + p.pipeline_schedule + ' schedule' if p.pipeline_model_parallel_size > 1 else ''}); "
            f"global batch {cfg.train.global_batch_size} = micro {cfg.train.micro_batch_size} x "
            f"{cfg.num_microbatches} micro-batches x DP {p.data_parallel_size}")


def main(argv=None) -> int:
    # before anything else: SIGUSR1 during start-up is kept (the run stops before its first step);
    # SIGTERM or SIGINT during start-up end the process at once, as nothing was trained yet
    signals = StopSignals().install()
    try:
        return _main(argv, signals)
    finally:
        signals.restore()


def _main(argv, signals: StopSignals) -> int:
    try:
        dry, argv = _split_dry_run_flags(argv)
        cfg = load_run_config(argv, world_size=dry.world_size)
        if dry.dry_run:
            return _dry_run(cfg, dry)
        prepare_output_paths(cfg)
        return _train(cfg, signals)
    except MellamaError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


def _train(cfg: Config, signals: StopSignals) -> int:
    from .training.loop import train
    from .training.run_control import TrainingStopped

    if os.environ.get("RANK", "0") == "0":
        print(describe(cfg), flush=True)
    try:
        train(cfg, signals=signals)
    except TrainingStopped as e:
        print(f"{PROG}: stopped: {e}", file=sys.stderr)
        return 1
    return 0


def _dry_run(cfg: Config, dry: argparse.Namespace) -> int:
    from .training.dry_run import dry_run, format_report

    print(describe(cfg), flush=True)
    try:
        traces = dry_run(cfg, dry.dry_run_ranks, progress=lambda line: print(line, flush=True))
    except ValueError as e:
        raise ConfigError(f"--dry-run-ranks: {e}") from None
    print(format_report(cfg, traces, dry.gpu_memory_gb), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
