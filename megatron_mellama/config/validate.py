"""Checks a resolved Config before any work starts; each failure is one line naming the flag.

Validation only reads: every value that follows from others is set before, by `resolve`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math

import torch

from .errors import ConfigError
from .sections import Config

# the first torch whose zero-bubble schedule computes weight gradients through custom autograd
# functions (2.11 and 2.12 fail in `stage_backward_weight` on their `_input_metadata`)
ZERO_BUBBLE_TORCH = "2.13"
WANDB_MISSING = '--wandb-project needs the wandb package: pip install -e ".[wandb]"'


def torch_at_least(release: str) -> bool:
    return torch.torch_version.TorchVersion(torch.__version__) >= release


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(value, flag: str, *, allow_none: bool = False) -> None:
    if value is None:
        _require(allow_none, f"{flag} is required (or choose a preset with --model)")
        return
    _require(value > 0, f"{flag} must be positive, got {value}")


def validate_finite(cfg: Config) -> None:
    """Every number given must be finite: `inf` and `nan` parse as floats, and then pass (or fail
    with a misleading message) range checks such as `x > 0`."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(values):
            continue
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
                raise ConfigError(f"{flag} {value}: expected a finite number")


def validate_model(cfg: Config) -> None:
    m = cfg.model
    for flag, value in (("--num-layers", m.num_layers), ("--hidden-size", m.hidden_size),
                        ("--num-attention-heads", m.num_attention_heads)):
        _positive(value, flag)
    _require(m.hidden_size % m.num_attention_heads == 0,
             f"--hidden-size {m.hidden_size} must be divisible by --num-attention-heads {m.num_attention_heads}")
    _require(m.head_dim % 2 == 0, f"--hidden-size / --num-attention-heads = {m.head_dim}: rotary embeddings "
                                  "need an even head dimension")
    if m.group_query_attention:
        _require(m.num_query_groups is not None, "--group-query-attention needs --num-query-groups")
        _positive(m.num_query_groups, "--num-query-groups")
        _require(m.num_attention_heads % m.num_query_groups == 0,
                 f"--num-attention-heads {m.num_attention_heads} must be divisible by "
                 f"--num-query-groups {m.num_query_groups}")
    else:
        _require(m.num_query_groups is None or m.num_query_groups == m.num_attention_heads,
                 "--num-query-groups needs --group-query-attention")
    _positive(m.ffn_hidden_size, "--ffn-hidden-size", allow_none=True)
    _positive(m.max_position_embeddings, "--max-position-embeddings (or --seq-length)")
    _positive(m.vocab_size, "--vocab-size (or --tokenizer-model)")
    _positive(m.make_vocab_size_divisible_by, "--make-vocab-size-divisible-by")
    _require(m.norm_epsilon > 0, f"--norm-epsilon must be positive, got {m.norm_epsilon}")
    _require(m.rotary_base > 0, f"--rotary-base must be positive, got {m.rotary_base}")
    _require(m.init_method_std > 0, f"--init-method-std must be positive, got {m.init_method_std}")
    validate_rope_scaling(cfg)


def validate_rope_scaling(cfg: Config) -> None:
    """At most one RoPE scaling, and its values in the range its formula is defined on."""
    m = cfg.model
    chosen = [flag for flag, on in (("--position-embedding-type yarn", m.position_embedding_type == "yarn"),
                                    ("--use-rope-scaling", m.use_rope_scaling),
                                    ("--rotary-seq-len-interpolation-factor",
                                     m.rotary_seq_len_interpolation_factor is not None)) if on]
    _require(len(chosen) <= 1, f"{' and '.join(chosen)}: choose one RoPE scaling")
    if m.rotary_seq_len_interpolation_factor is not None:
        _positive(m.rotary_seq_len_interpolation_factor, "--rotary-seq-len-interpolation-factor")
    if m.use_rope_scaling:
        _positive(m.rope_scaling_factor, "--rope-scaling-factor")
        _positive(m.rope_scaling_low_freq_factor, "--rope-scaling-low-freq-factor")
        _positive(m.rope_scaling_original_max_position_embeddings, "--rope-scaling-original-max-position-embeddings")
        # the ramp between the two wavelengths divides by their factors' difference
        _require(m.rope_scaling_high_freq_factor > m.rope_scaling_low_freq_factor,
                 f"--rope-scaling-high-freq-factor {m.rope_scaling_high_freq_factor} must exceed "
                 f"--rope-scaling-low-freq-factor {m.rope_scaling_low_freq_factor}")
    if m.position_embedding_type == "yarn":
        _require(m.yarn_rotary_scaling_factor is not None,
                 "--position-embedding-type yarn needs --yarn-rotary-scaling-factor")
        _positive(m.yarn_rotary_scaling_factor, "--yarn-rotary-scaling-factor")
        _positive(m.yarn_original_max_position_embeddings, "--yarn-original-max-position-embeddings")
        # both are rotation counts inside a logarithm
        _positive(m.yarn_beta_fast, "--yarn-beta-fast")
        _positive(m.yarn_beta_slow, "--yarn-beta-slow")


def validate_parallel(cfg: Config) -> None:
    p, m = cfg.parallel, cfg.model
    world_size = p.world_size
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    _positive(tp, "--tensor-model-parallel-size")
    _positive(pp, "--pipeline-model-parallel-size")
    _require(m.num_attention_heads % tp == 0,
             f"--tensor-model-parallel-size {tp} must divide --num-attention-heads {m.num_attention_heads}")
    _require(m.kv_heads % tp == 0,
             f"--tensor-model-parallel-size {tp} must divide the {m.kv_heads} key/value heads "
             "(--num-query-groups)")
    _require(m.padded_vocab_size % tp == 0,
             f"--tensor-model-parallel-size {tp} must divide the vocabulary size {m.padded_vocab_size} "
             "(pad it with --make-vocab-size-divisible-by)")
    _require(m.num_layers % pp == 0,
             f"--pipeline-model-parallel-size {pp} must divide --num-layers {m.num_layers}")
    if p.num_layers_per_virtual_pipeline_stage is not None:
        v = p.num_layers_per_virtual_pipeline_stage
        _positive(v, "--num-layers-per-virtual-pipeline-stage")
        _require(pp > 1, "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
        _require(m.num_layers % (pp * v) == 0,
                 f"--num-layers {m.num_layers} must be divisible by --pipeline-model-parallel-size {pp} x "
                 f"--num-layers-per-virtual-pipeline-stage {v}")
    if p.pipeline_schedule == "interleaved-1f1b":
        _require(p.num_layers_per_virtual_pipeline_stage is not None,
                 "--pipeline-schedule interleaved-1f1b needs --num-layers-per-virtual-pipeline-stage")
    cp = p.context_parallel_size
    _positive(cp, "--context-parallel-size")
    if cp > 1:
        _require(cfg.data.seq_length % (2 * cp) == 0,
                 f"--context-parallel-size {cp}: --seq-length {cfg.data.seq_length} must be divisible by 2 x {cp} "
                 "(each rank holds two of the 2 x CP chunks)")
    if p.sequence_parallel:
        _require(cfg.data.seq_length % (tp * cp) == 0,
                 f"--sequence-parallel: --seq-length {cfg.data.seq_length} must be divisible by "
                 f"--tensor-model-parallel-size {tp}" + (f" x --context-parallel-size {cp}" if cp > 1 else ""))
    _require(world_size % (tp * pp * cp) == 0,
             f"the world size {world_size} (WORLD_SIZE / --nproc-per-node) must be a multiple of "
             f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp}"
             + (f" x --context-parallel-size {cp}" if cp > 1 else ""))
    _require(p.distributed_timeout_minutes > 0,
             f"--distributed-timeout-minutes must be positive, got {p.distributed_timeout_minutes}")
    _positive(p.distributed_timeout_seconds_after_init, "--distributed-timeout-seconds-after-init", allow_none=True)
    _require(p.flight_recorder_trace_buffer_size >= 0, f"--flight-recorder-trace-buffer-size must not be negative, "
                                                        f"got {p.flight_recorder_trace_buffer_size}")
    dp = p.data_parallel_size
    _positive(p.data_parallel_replicate_size, "--data-parallel-replicate-size")
    _require(dp % p.data_parallel_replicate_size == 0,
             f"--data-parallel-replicate-size {p.data_parallel_replicate_size} must divide the "
             f"data-parallel size {dp}")
    _require(not p.reduce_grads_once_per_step or p.data_parallel_sharding != "none",
             "--reduce-grads-once-per-step is for --data-parallel-sharding optimizer or full (none, DDP, "
             "always reduces once per step)")
    if p.data_parallel_replicate_size > 1:
        _require(p.data_parallel_sharding == "full",
                 "--data-parallel-replicate-size > 1 (HSDP) needs --data-parallel-sharding full")


def validate_training(cfg: Config) -> None:
    t, d, o = cfg.train, cfg.data, cfg.optim
    _positive(d.seq_length, "--seq-length")
    _require(d.seq_length <= cfg.model.max_position_embeddings,
             f"--seq-length {d.seq_length} exceeds --max-position-embeddings {cfg.model.max_position_embeddings}")
    _positive(t.micro_batch_size, "--micro-batch-size")
    _require(not cfg.checkpoint.extend_context or cfg.checkpoint.finetune or cfg.checkpoint.pretrained_checkpoint,
             "--extend-context is for a new run from a checkpoint's weights: it needs --finetune or "
             "--pretrained-checkpoint (a resume continues the positions it was trained with)")
    _require(not (cfg.checkpoint.finetune and cfg.checkpoint.pretrained_checkpoint),
             "--finetune and --pretrained-checkpoint: give one (--pretrained-checkpoint starts from its weights "
             "as --finetune does, and resumes --load once that holds a checkpoint)")
    dp = cfg.parallel.data_parallel_size
    _positive(t.global_batch_size, "--global-batch-size")
    _require(t.global_batch_size % (t.micro_batch_size * dp) == 0,
             f"--global-batch-size {t.global_batch_size} must be a multiple of --micro-batch-size "
             f"{t.micro_batch_size} x data-parallel size {dp}")
    p = cfg.parallel
    micro = t.global_batch_size // (t.micro_batch_size * dp)
    if p.pipeline_model_parallel_size > 1:
        pp = p.pipeline_model_parallel_size
        _require(micro >= pp, f"--global-batch-size {t.global_batch_size} gives {micro} micro-batches per pipeline, "
                              f"fewer than --pipeline-model-parallel-size {pp}: the pipeline could never fill")
        if p.pipeline_schedule != "1f1b":
            _require(micro % pp == 0, f"--pipeline-schedule {p.pipeline_schedule}: the {micro} micro-batches per "
                                      f"step (--global-batch-size) must be a multiple of "
                                      f"--pipeline-model-parallel-size {pp}")
        _require(not (t.compile and p.pipeline_schedule == "zero-bubble"),
                 "--compile does not work with --pipeline-schedule zero-bubble (torch refuses compiled stages)")
        if p.pipeline_schedule == "zero-bubble":
            _require(torch_at_least(ZERO_BUBBLE_TORCH),
                     f"--pipeline-schedule zero-bubble needs torch {ZERO_BUBBLE_TORCH} or newer, not "
                     f"{torch.__version__}: its weight-gradient pass fails on the custom autograd functions of "
                     "the fused loss and kernels (use 1f1b or interleaved-1f1b)")
    _require(not (t.bf16 and t.fp16), "--bf16 and --fp16 exclude each other")
    _require(not (t.train_iters is not None and t.train_samples is not None),
             "give --train-iters or --train-samples, not both")
    _positive(t.train_iters, "--train-iters", allow_none=True)
    _positive(t.train_samples, "--train-samples", allow_none=True)
    if t.train_samples is not None:
        _require(t.train_samples >= t.global_batch_size,
                 f"--train-samples {t.train_samples} is less than one global batch (--global-batch-size "
                 f"{t.global_batch_size}): the run would train zero iterations")
    _positive(t.eval_interval, "--eval-interval")
    _require(t.eval_iters >= 0, f"--eval-iters must not be negative, got {t.eval_iters}")
    _positive(t.eval_tasks_limit, "--eval-tasks-limit", allow_none=True)
    # the task files themselves are read and checked first thing in training (evaluation/in_training.py)
    _require(not t.eval_tasks or cfg.data.tokenizer_model is not None,
             "--eval-tasks needs the run's tokenizer (--tokenizer-model) to encode the questions")
    _positive(t.exit_interval, "--exit-interval", allow_none=True)
    _positive(t.check_weight_hash_across_dp_replicas_interval, "--check-weight-hash-across-dp-replicas-interval",
              allow_none=True)
    _require(t.manual_gc_interval >= 0, f"--manual-gc-interval must not be negative, got {t.manual_gc_interval}")
    _require(t.max_skipped_steps >= 0, f"--max-skipped-steps must not be negative (0: never stop), "
                                        f"got {t.max_skipped_steps}")
    _require(t.spiky_loss_factor > 1, f"--spiky-loss-factor must be above 1, got {t.spiky_loss_factor}")
    _require(t.spike_zscore_threshold >= 0, f"--spike-zscore-threshold must not be negative (0: off), "
                                             f"got {t.spike_zscore_threshold}")
    _require(t.spike_window >= 2, f"--spike-window must be at least 2, got {t.spike_window}")
    _positive(t.spike_rollback_window, "--spike-rollback-window")
    _require(t.max_rollbacks >= 0, f"--max-rollbacks must not be negative, got {t.max_rollbacks}")
    _require(t.spike_action != "rollback" or cfg.checkpoint.save,
             "--spike-action rollback needs --save: it rolls back to the newest checkpoint there")
    for it in t.iterations_to_skip or []:
        _require(str(it).isdigit() and int(it) >= 1, f"--iterations-to-skip {it}: expected iteration numbers, "
                                                     "1 or more")
    _positive(cfg.logging.log_interval, "--log-interval")
    _positive(cfg.logging.straggler_minmax_count, "--straggler-minmax-count")

    _require(o.lr > 0, f"--lr must be positive, got {o.lr}")
    _require(0 <= o.min_lr <= o.lr, f"--min-lr {o.min_lr} must lie between 0 and --lr {o.lr}")
    if o.lr_warmup_fraction is not None:
        _require(0 <= o.lr_warmup_fraction <= 1,
                 f"--lr-warmup-fraction must lie between 0 and 1, got {o.lr_warmup_fraction}")
        _require(o.lr_warmup_iters == 0 and o.lr_warmup_samples == 0,
                 "--lr-warmup-fraction excludes --lr-warmup-iters and --lr-warmup-samples")
    _require(o.lr_warmup_iters >= 0, f"--lr-warmup-iters must not be negative, got {o.lr_warmup_iters}")
    decay_iters = o.lr_decay_iters or t.train_iters
    if o.lr_warmup_iters and decay_iters:
        _require(o.lr_warmup_iters < decay_iters,
                 f"--lr-warmup-iters {o.lr_warmup_iters} must be shorter than the decay span of {decay_iters} "
                 "iterations (--lr-decay-iters or --train-iters)")
    decay_samples = o.lr_decay_samples or t.train_samples
    if o.lr_warmup_samples and decay_samples:
        _require(o.lr_warmup_samples < decay_samples,
                 f"--lr-warmup-samples {o.lr_warmup_samples} must be shorter than the decay span of {decay_samples} "
                 "samples (--lr-decay-samples or --train-samples)")
    if o.lr_warmup_fraction is not None:
        _require(o.lr_warmup_fraction < 1,
                 "--lr-warmup-fraction must be below 1: warmup must end before the decay span")
    if o.lr_decay_style == "WSD":
        _require(o.lr_wsd_decay_iters is not None, "--lr-decay-style WSD needs --lr-wsd-decay-iters")
    # Megatron-LM's rule: the schedule counts in the unit the run length is given in
    if t.train_samples is not None:
        for flag, given in (("--lr-decay-iters", o.lr_decay_iters is not None),
                            ("--lr-warmup-iters", o.lr_warmup_iters)):
            _require(not given, f"{flag} with --train-samples: the schedule counts samples here "
                                f"(use {flag.replace('iters', 'samples')})")
    elif t.train_iters is not None:
        for flag, given in (("--lr-decay-samples", o.lr_decay_samples is not None),
                            ("--lr-warmup-samples", o.lr_warmup_samples)):
            _require(not given, f"{flag} with --train-iters: the schedule counts iterations here "
                                f"(use {flag.replace('samples', 'iters')})")
    _require(o.weight_decay >= 0, f"--weight-decay must not be negative, got {o.weight_decay}")
    for flag, beta in (("--adam-beta1", o.adam_beta1), ("--adam-beta2", o.adam_beta2)):
        _require(0 <= beta < 1, f"{flag} must lie in [0, 1), got {beta}")
    _require(o.adam_eps > 0, f"--adam-eps must be positive, got {o.adam_eps}")
    _require(o.clip_grad >= 0, f"--clip-grad must not be negative, got {o.clip_grad}")
    _require(not (o.override_opt_param_scheduler and o.use_checkpoint_opt_param_scheduler),
             "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude each other")


def validate_data(cfg: Config) -> None:
    d = cfg.data
    if d.data_path:
        parse_data_path(d.data_path)
    parse_split(d.split)
    if d.data_path and not d.mock_data:
        _require(d.tokenizer_model is not None, f"--tokenizer-type {d.tokenizer_type} needs --tokenizer-model")
    _require(not (d.sft and d.mock_data), "--sft trains on the conversations of --data-path, not on --mock-data")
    # documents are told apart by their restarting positions (the loader knows no EOD id)
    _require(not d.reset_attention_mask or d.reset_position_ids,
             "--reset-attention-mask needs --reset-position-ids (documents are found where positions restart)")


def parse_data_path(tokens: list) -> list:
    """`--data-path` as [(weight, prefix)]: one prefix alone, or weight/prefix pairs."""
    if len(tokens) == 1:
        return [(1.0, tokens[0])]
    _require(len(tokens) % 2 == 0, f"--data-path {' '.join(tokens)}: expected WEIGHT PREFIX pairs "
                                   "(e.g. 15 bio 1 clin 4 gen) or a single PREFIX")
    pairs = []
    for weight, prefix in zip(tokens[::2], tokens[1::2]):
        try:
            w = float(weight)
        except ValueError:
            raise ConfigError(f"--data-path: '{weight}' (before '{prefix}') is not a weight") from None
        _require(math.isfinite(w), f"--data-path: weight {weight} of '{prefix}' is not a finite number")
        _require(w >= 0, f"--data-path: weight {weight} of '{prefix}' is negative")
        pairs.append((w, prefix))
    _require(sum(w for w, _ in pairs) > 0, "--data-path: the weights add up to zero")
    return pairs


def parse_split(split: str) -> list:
    """`--split 949,50,1` (or 949/50/1, or fewer parts) as three non-negative numbers."""
    parts = split.replace("/", ",").split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--split {split}: expected up to three comma-separated numbers, e.g. 949,50,1") from None
    _require(len(values) <= 3 and all(math.isfinite(v) and v >= 0 for v in values) and sum(values) > 0,
             f"--split {split}: expected up to three non-negative numbers with a positive sum")
    _require(values[0] > 0, f"--split {split}: the first (training) part must be positive, or there is "
                            "nothing to train on")
    return values + [0.0] * (3 - len(values))


def validate_watching(cfg: Config) -> None:
    """W&B and the profiler (`training/wandb_writer.py`, `training/profiling.py`)."""
    g = cfg.logging
    if g.wandb_project:
        # checked here, on every rank, before any work: not as an ImportError on rank 0 after start-up
        _require(importlib.util.find_spec("wandb") is not None, WANDB_MISSING)
    else:
        for flag, value in (("--wandb-exp-name", g.wandb_exp_name), ("--wandb-save-dir", g.wandb_save_dir),
                            ("--wandb-entity", g.wandb_entity)):
            _require(value is None, f"{flag} needs --wandb-project")
    _require(g.profile_step_start >= 1, f"--profile-step-start must be 1 or more, got {g.profile_step_start}")
    _require(g.profile_step_end >= g.profile_step_start,
             f"--profile-step-end {g.profile_step_end} comes before --profile-step-start {g.profile_step_start}")
    world = cfg.parallel.world_size
    for rank in g.profile_ranks or []:
        _require(str(rank).isdigit() and int(rank) < world,
                 f"--profile-ranks {rank}: expected global rank numbers, 0 to {world - 1} in this job of {world}")


def validate(cfg: Config) -> None:
    """Raise ConfigError for the first value `cfg` (resolved by `resolve`) cannot run with."""
    validate_finite(cfg)
    validate_model(cfg)
    _positive(cfg.data.seq_length, "--seq-length (or --max-position-embeddings)")
    validate_parallel(cfg)
    validate_training(cfg)
    validate_data(cfg)
    validate_watching(cfg)
