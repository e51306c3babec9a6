"""The configuration dataclasses, one per concern.

Every field is a command-line flag with Megatron-LM's name (the field name with dashes, unless
`flag` says otherwise) and a key of the same name in a `--config` YAML file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

LR_DECAY_STYLES = ("cosine", "linear", "constant", "WSD", "inverse-square-root")
TOKENIZER_TYPES = ("Llama2Tokenizer", "HuggingFaceTokenizer", "SentencePieceTokenizer")
DP_SHARDING = ("none", "optimizer", "full")
PIPELINE_SCHEDULES = ("1f1b", "interleaved-1f1b", "zero-bubble")
KERNEL_BACKENDS = ("auto", "torch", "triton", "te", "apex")
POSITION_EMBEDDING_TYPES = ("rope", "yarn")


def opt(default, help, *, flag=None, choices=None, metavar=None):
    """A configuration field: its default, its --help text and, if not derived from the name, its flag."""
    return field(default=default, metadata=dict(help=help, flag=flag, choices=choices, metavar=metavar))


@dataclass
class ModelConfig:
    num_layers: Optional[int] = opt(None, "number of transformer blocks")
    hidden_size: Optional[int] = opt(None, "model width")
    num_attention_heads: Optional[int] = opt(None, "number of query heads")
    group_query_attention: bool = opt(False, "use grouped-query attention (set --num-query-groups)")
    num_query_groups: Optional[int] = opt(None, "number of key/value heads when --group-query-attention is set")
    ffn_hidden_size: Optional[int] = opt(
        None, "SwiGLU inner width; default LLaMA's rule: 8/3 x hidden rounded up to a multiple of 256")
    max_position_embeddings: Optional[int] = opt(None, "longest sequence the rotary tables cover")
    norm_epsilon: float = opt(1e-5, "RMSNorm epsilon")
    rotary_base: float = opt(10000.0, "RoPE base (theta)")
    # RoPE scaling for contexts past the pretraining length: at most one kind (model/rope.py)
    position_embedding_type: str = opt(
        "rope", "rope, or yarn: YaRN scaling set by the --yarn-* flags", choices=POSITION_EMBEDDING_TYPES)
    rotary_seq_len_interpolation_factor: Optional[float] = opt(
        None, "linear position interpolation: positions divided by this factor (Hugging Face's rope_type linear)")
    use_rope_scaling: bool = opt(False, "LLaMA-3 frequency scaling (Hugging Face's rope_type llama3)")
    rope_scaling_factor: float = opt(8.0, "--use-rope-scaling: factor dividing the low frequencies")
    rope_scaling_low_freq_factor: float = opt(
        1.0, "--use-rope-scaling: wavelengths above original length / this are divided by the factor")
    rope_scaling_high_freq_factor: float = opt(
        4.0, "--use-rope-scaling: wavelengths below original length / this are kept")
    rope_scaling_original_max_position_embeddings: int = opt(
        8192, "--use-rope-scaling: the context length the frequencies were trained for")
    yarn_rotary_scaling_factor: Optional[float] = opt(
        None, "--position-embedding-type yarn: context extension factor (required with yarn)")
    yarn_original_max_position_embeddings: int = opt(
        4096, "--position-embedding-type yarn: the context length the model was pretrained with")
    yarn_beta_fast: float = opt(32.0, "--position-embedding-type yarn: rotations above which a frequency is kept")
    yarn_beta_slow: float = opt(
        1.0, "--position-embedding-type yarn: rotations below which a frequency is divided by the factor")
    yarn_mscale: float = opt(1.0, "--position-embedding-type yarn: attention scale numerator's log coefficient")
    yarn_mscale_all_dim: float = opt(
        0.0, "--position-embedding-type yarn: attention scale denominator's log coefficient (0: none)")
    vocab_size: Optional[int] = opt(None, "vocabulary size; default: the tokenizer's, else the preset's")
    make_vocab_size_divisible_by: int = opt(
        1, "pad the embedding rows to a multiple of this (must leave the padded size divisible by TP)")
    init_method_std: float = opt(0.02, "standard deviation of the normal weight initialisation")

    @property
    def kv_heads(self) -> int:
        return self.num_query_groups if self.group_query_attention else self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return 256 * math.ceil(8 * self.hidden_size / 3 / 256)

    @property
    def padded_vocab_size(self) -> int:
        multiple = self.make_vocab_size_divisible_by
        return multiple * math.ceil(self.vocab_size / multiple)


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = opt(1, "tensor-parallel size (TP)")
    pipeline_model_parallel_size: int = opt(1, "pipeline-parallel size (PP)")
    context_parallel_size: int = opt(
        1, "context-parallel size (CP): each sequence split over this many ranks, load-balanced for causal "
        "attention (rank i holds chunks i and 2 CP - 1 - i); keys and values all-gathered per layer")
    num_layers_per_virtual_pipeline_stage: Optional[int] = opt(
        None, "layers per virtual stage (interleaved 1F1B); default: one stage per PP rank")
    sequence_parallel: bool = opt(False, "shard norms and activations along the sequence under TP (ignored at TP 1)")
    pipeline_schedule: str = opt(
        "1f1b", "pipeline schedule; interleaved-1f1b is chosen when virtual stages are set",
        choices=PIPELINE_SCHEDULES)
    data_parallel_sharding: str = opt(
        "none", "data-parallel sharding: none (DDP), optimizer (ZeRO-2: grads and optimizer state "
        "sharded), full (ZeRO-3: parameters too)", choices=DP_SHARDING)
    data_parallel_replicate_size: int = opt(1, "HSDP: replicas across which fully sharded groups are copied")
    # None until resolved: on for `optimizer`, off for `full` (resolve.resolve_gradient_reduction)
    reduce_grads_once_per_step: Optional[bool] = opt(
        None, "optimizer/full sharding: keep whole fp32 gradients through the micro-batches and reduce-scatter "
        "once per step (Megatron-LM's distributed optimizer: 4 bytes per parameter more, a 1/micro-batches "
        "share of the gradient traffic); --no-reduce-grads-once-per-step reduce-scatters every micro-batch. "
        "Default: on with --data-parallel-sharding optimizer, off with full (which shards to save memory)")
    use_distributed_optimizer: bool = opt(False, "Megatron's name for --data-parallel-sharding optimizer")
    recompute_granularity: Optional[str] = opt(
        None, "activation checkpointing: full (whole blocks) or selective (attention core)",
        choices=("full", "selective"))
    distributed_backend: Optional[str] = opt(
        None, "nccl or gloo; default nccl on GPU (with gloo beside it for CPU objects), gloo on CPU",
        choices=("nccl", "gloo"))
    distributed_timeout_minutes: float = opt(
        30.0, "how long a collective (a barrier while rank 0 builds the data index, a checkpoint load) may "
        "wait before the job fails")
    # training/hang_watchdog.py, parallel/timeouts.py
    distributed_timeout_seconds_after_init: Optional[float] = opt(
        None, "after the first step, collectives time out after this many seconds (evaluations and saves keep "
        "--distributed-timeout-minutes), and a watchdog on every rank ends the job when a step makes no progress "
        "for that long: each rank writes its threads' stacks (and the flight recorder) under <--save>/debug/ and "
        "one line naming the ranks that did not arrive, then exits with code 1. Default: off")
    flight_recorder_trace_buffer_size: int = opt(
        0, "keep the last N collectives of each process group (torch's flight recorder: "
        "TORCH_NCCL_TRACE_BUFFER_SIZE), dumped on a collective timeout and by the hang watchdog; 0: off")
    flight_recorder_dump_path: Optional[str] = opt(
        None, "with --flight-recorder-trace-buffer-size: where NCCL writes the flight recorder on a collective "
        "timeout (a path prefix; the rank is appended: TORCH_FR_DUMP_TEMP_FILE)")
    # Set by resolve(): the world size this run was started with, and what follows from it.
    world_size: int = 1

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.model_parallel_size * self.context_parallel_size)


@dataclass
class DataConfig:
    data_path: Optional[list] = opt(
        None, "a prefix, or weights and prefixes: 15 bio 1 clin 4 gen", metavar="[WEIGHT] PREFIX")
    split: str = opt("969,30,1", "train,valid,test proportions of each dataset")
    data_cache_path: Optional[str] = opt(None, "where the sample index caches are written")
    mock_data: bool = opt(False, "train on random tokens (no --data-path needed)")
    seq_length: Optional[int] = opt(None, "training sequence length; default: --max-position-embeddings")
    tokenizer_type: str = opt("Llama2Tokenizer", "tokenizer kind", choices=TOKENIZER_TYPES)
    tokenizer_model: Optional[str] = opt(None, "SentencePiece .model file, or a Hugging Face tokenizer directory")
    num_workers: int = opt(2, "data-loader worker processes")
    # Megatron-LM's packed-sequence flags: a sample concatenates documents separated by EOD
    reset_position_ids: bool = opt(False, "positions restart at 0 after each EOD token (packed documents)")
    reset_attention_mask: bool = opt(
        False, "tokens attend only within their own document (the token after an EOD starts a new one); "
        "needs --reset-position-ids")
    eod_mask_loss: bool = opt(False, "no loss on EOD tokens")
    sft: bool = opt(
        False, "instruction tuning: --data-path names prefixes of tools/preprocess_sft.py (token and loss-mask "
        "pairs); whole conversations are packed per sample, loss on the answers only; implies "
        "--reset-position-ids and --reset-attention-mask")


@dataclass
class OptimizerConfig:
    lr: float = opt(3e-4, "peak learning rate")
    min_lr: float = opt(0.0, "learning rate at the end of decay")
    lr_decay_style: str = opt("cosine", "learning-rate decay shape", choices=LR_DECAY_STYLES)
    lr_decay_iters: Optional[int] = opt(None, "iterations to decay over; default --train-iters")
    lr_decay_samples: Optional[int] = opt(None, "samples to decay over; default --train-samples")
    lr_warmup_fraction: Optional[float] = opt(None, "warmup as a fraction of the decay span (e.g. 0.05)")
    lr_warmup_iters: int = opt(0, "warmup iterations")
    lr_warmup_samples: int = opt(0, "warmup samples")
    lr_wsd_decay_iters: Optional[int] = opt(None, "WSD: iterations of the final decay phase")
    weight_decay: float = opt(0.01, "AdamW weight decay (never applied to norms)")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    adam_eps: float = opt(1e-8, "AdamW epsilon")
    clip_grad: float = opt(1.0, "clip the global gradient norm to this (0 disables)")
    override_opt_param_scheduler: bool = opt(
        False, "on resume, use this run's learning-rate flags where they differ from the checkpoint's, from "
        "the checkpoint's position (e.g. decaying over a longer --train-iters)", flag="--override-opt_param-scheduler")
    use_checkpoint_opt_param_scheduler: bool = opt(
        False, "on resume, continue the checkpoint's learning-rate schedule, ignoring this run's flags",
        flag="--use-checkpoint-opt_param-scheduler")


@dataclass
class TrainingConfig:
    micro_batch_size: int = opt(1, "sequences per micro-batch on one DP rank")
    global_batch_size: Optional[int] = opt(None, "sequences per optimizer step; default micro-batch x DP")
    train_iters: Optional[int] = opt(None, "optimizer steps to train for")
    train_samples: Optional[int] = opt(None, "sequences to train on (instead of --train-iters)")
    bf16: bool = opt(False, "bf16 compute, fp32 master weights")
    fp16: bool = opt(False, "fp16 compute with dynamic loss scaling")
    loss_scale: Optional[float] = opt(None, "fp16: a static loss scale instead of the dynamic one")
    initial_loss_scale: float = opt(2.0 ** 32, "fp16: first dynamic loss scale")
    seed: int = opt(1234, "random seed for initialisation and data order")
    compile: bool = opt(False, "torch.compile each transformer block")
    kernel_backend: str = opt(
        "auto", "who runs the norm, rotary, SwiGLU, attention and loss kernels: auto (the fastest available "
        "on the device; torch on the CPU), or force one; a backend that cannot run here falls back to torch "
        "with a warning", choices=KERNEL_BACKENDS)
    exit_interval: Optional[int] = opt(None, "stop after an iteration divisible by this")
    exit_duration_in_mins: Optional[float] = opt(None, "stop after this many minutes")
    # Megatron-LM has no such limit: a run whose loss went NaN skips every step to the end, exits 0 and
    # keeps saving the broken weights. 10 is far above the odd skipped spike of a healthy run, and
    # stops a diverged one within minutes. fp16 overflows that the dynamic loss scaler still answers
    # by lowering the scale (finite loss, scale above its minimum) are its normal work and not counted.
    max_skipped_steps: int = opt(
        10, "stop (exit code 1, no checkpoint) after this many consecutive iterations skipped for inf/NaN loss "
        "or gradients; fp16 overflows the dynamic loss scale can still absorb are not counted; 0: never stop")
    # Loss spikes (training/spikes.py). Megatron-LM's rule flags a loss 10x the largest recent one
    # (an exponent gone wrong); the z-score rule is OLMo-core's stability monitor, with its defaults
    # (128 steps, 6 standard deviations: past the step-to-step noise and the loss's own descent).
    check_for_spiky_loss: bool = opt(
        False, "judge every step's loss (the global one, the same on every rank) against the recent ones: a spike "
        "is more than --spiky-loss-factor x the largest of the last --spike-window losses, or more than "
        "--spike-zscore-threshold standard deviations above their mean (once the window is full); "
        "--spike-action says what happens")
    spiky_loss_factor: float = opt(10.0, "with --check-for-spiky-loss: a loss above this many times the largest recent "
                                         "one is a spike (Megatron-LM's rule)")
    spike_zscore_threshold: float = opt(6.0, "with --check-for-spiky-loss: a loss this many standard deviations above "
                                             "the mean of the recent ones is a spike; 0: no z-score rule")
    spike_window: int = opt(128, "with --check-for-spiky-loss: how many recent applied (finite, not skipped) losses "
                                 "the rules compare with")
    spike_action: str = opt(
        "log", "with --check-for-spiky-loss, what a spike does: log (one line; the step is applied), skip (its "
        "update is not applied, as an inf/NaN step's), rollback (not applied; the run reloads its newest "
        "checkpoint, skips the --spike-rollback-window iterations that end at the spike, and trains on)",
        choices=("log", "skip", "rollback"))
    spike_rollback_window: int = opt(
        10, "with --spike-action rollback: the iterations skipped after a rollback, the spike's and those just "
        "before it (those before the checkpoint cannot be)")
    max_rollbacks: int = opt(3, "with --spike-action rollback: a spike after this many rollbacks of the run stops "
                                "it (exit code 1)")
    iterations_to_skip: Optional[list] = opt(
        None, "these iterations read their global batch without training on it (no forward, backward or update; "
        "the iteration and the consumed samples advance), as Megatron-LM's", metavar="ITERATION")
    eval_interval: int = opt(1000, "evaluate every this many iterations")
    eval_iters: int = opt(100, "validation batches per evaluation")
    eval_tasks: Optional[list] = opt(
        None, "multiple-choice tasks scored (acc, acc_norm) at every evaluation, on the run's tokenizer: NAME=FILE "
        "per task, FILE a JSONL task (the format of tools/evaluate_tasks.py)", metavar="NAME=PATH")
    eval_tasks_limit: Optional[int] = opt(None, "with --eval-tasks: score the first N items of each task (default all)")
    check_weight_hash_across_dp_replicas_interval: Optional[int] = opt(
        None, "every N iterations and before every save, the ranks that hold the same weights (data-parallel and "
        "context-parallel replicas) compare a checksum of them; a mismatch (a flipped bit) stops the run with exit "
        "code 1 before the save, naming the ranks")
    manual_gc: bool = opt(
        False, "turn Python's automatic garbage collector off and collect on every rank at the same iterations "
        "(--manual-gc-interval, and before evaluations and saves): no rank stalls the others with its own "
        "collection")
    manual_gc_interval: int = opt(0, "with --manual-gc: collect every N iterations; 0: only before evaluations "
                                     "and saves")
    inject_fault: Optional[list] = opt(
        None, "TESTING ONLY, one or more: inject a fault after the optimizer step of ITERATION on global RANK "
        "(default 0), to test what the run does with it; kinds: bitflip (one bit of one weight of that rank flips), "
        "loss-spike (that rank's loss in that step x1000, and its gradients), nan (its loss NaN, also when the step "
        "is recomputed), nan-transient (NaN in the first computation only), hang (that rank's main thread blocks for "
        "good), crash (that rank exits at once with code 1), slow (that rank sleeps 0.5 s in every step from that "
        "iteration on); hang and crash happen in a job's first attempt only, not again after a torchrun restart",
        metavar="KIND@ITERATION[:RANK]")


@dataclass
class CheckpointConfig:
    save: Optional[str] = opt(None, "directory to save checkpoints to")
    load: Optional[str] = opt(None, "directory to resume (or, with --finetune, start) from")
    save_interval: Optional[int] = opt(None, "save every this many iterations")
    finetune: bool = opt(False, "load weights only and start at iteration 0")
    pretrained_checkpoint: Optional[str] = opt(
        None, "start from this checkpoint's weights as --finetune does while --load (default --save) holds no "
        "checkpoint; once it holds one, resume it: one command line for the first launch and every requeue")
    overwrite_save: bool = opt(
        False, "let this run write into a --save directory that holds checkpoints it does not resume (a "
        "--finetune, a fresh run, another run's --load): its iterations replace theirs of the same number and "
        "'latest' moves to its own; without it such a run is refused before any work")
    extend_context: bool = opt(
        False, "with --finetune: the RoPE base, RoPE scaling and --max-position-embeddings may differ from the "
        "checkpoint's (continual pretraining to a longer context); the new values are saved and exported")
    allow_tokenizer_mismatch: bool = opt(
        False, "with --finetune: train with --tokenizer-model even though it is not the tokenizer the checkpoint "
        "records (another file of the same vocabulary)")
    keep_last: Optional[int] = opt(None, "keep only the newest N checkpoints")
    no_load_optim: bool = opt(False, "do not load the optimizer state")
    no_load_rng: bool = opt(False, "do not load the random-number-generator state")
    async_save: bool = opt(False, "write checkpoints in the background")


@dataclass
class LoggingConfig:
    log_interval: int = opt(100, "log every this many iterations")
    tensorboard_dir: Optional[str] = opt(None, "write TensorBoard events here")
    log_file: Optional[str] = opt(None, "append one JSON object per logged iteration and evaluation")
    # training/straggler.py: each rank's own time in its transformer blocks' forward, not its waits
    log_straggler: bool = opt(
        False, "at each log: gather every rank's own compute time (its transformer layers' forward, per layer call; "
        "waits for other ranks excluded) in one small collective, and name the slowest and fastest ranks with "
        "their host, device and ratio to the median")
    straggler_minmax_count: int = opt(1, "with --log-straggler: how many of the slowest and of the fastest ranks "
                                         "the report names")
    # training/grad_clip.py computes both with the gradient norm's reductions
    log_params_norm: bool = opt(
        False, "at each log: the L2 norm of all parameters, over every shard and pipeline stage (TensorBoard "
        "params-norm; one small collective per log)")
    log_num_zeros_in_grad: bool = opt(
        False, "at each log: the number of gradient elements equal to zero after clipping, over every shard and "
        "stage (TensorBoard num-zeros; counted every step, read with the step's loss)")
    log_throughput: bool = opt(
        False, "add TFLOP/s per device and MFU to the train log, TensorBoard (throughput, mfu) and the JSON log; "
        "tokens/s is always logged")
    # training/domain_loss.py
    log_loss_per_domain: bool = opt(
        False, "at each log: the training loss of each domain of the --data-path blend over the log window "
        "(token mean of the domain's samples in the applied steps' batches; TensorBoard lm loss/<domain>), summed "
        "on the device and reduced in one all-reduce per log")
    # training/timers.py
    timing_log_level: int = opt(
        0, "timers printed at each log: 0 none; 1 data-wait, forward-backward, optimizer, save-checkpoint, "
        "evaluation (ms per iteration over the log window); 2 also grads-clip (unscaling, the gradient norm's "
        "all-reduces, clipping). Host clock, CUDA events on a GPU: no host synchronisation per step",
        choices=(0, 1, 2))
    timing_log_option: str = opt(
        "minmax", "with --timing-log-level 1 or 2: each timer over the ranks, in one collective per log: max, "
        "minmax (min and max) or all (every rank's)", choices=("max", "minmax", "all"))
    # training/wandb_writer.py: the TensorBoard scalars, under the same tags, also to Weights & Biases
    wandb_project: Optional[str] = opt(
        None, "log the TensorBoard scalars to this Weights & Biases project as well (needs the wandb extra: "
        "pip install -e \".[wandb]\"); the run id is kept in checkpoints, so a resumed run continues the same W&B "
        "run; WANDB_MODE=offline writes the run under --wandb-save-dir only")
    wandb_exp_name: Optional[str] = opt(None, "with --wandb-project: the W&B run's display name")
    wandb_save_dir: Optional[str] = opt(
        None, "with --wandb-project: where W&B writes its local run files (default: <save>/wandb, else ./wandb)")
    wandb_entity: Optional[str] = opt(None, "with --wandb-project: the W&B user or team the project belongs to")
    # training/profiling.py
    profile: bool = opt(
        False, "trace iterations --profile-step-start to --profile-step-end with torch.profiler (shapes and memory "
        "recorded) on the --profile-ranks ranks: a Chrome trace JSON per rank that TensorBoard's profiler plugin "
        "also reads")
    profile_step_start: int = opt(10, "with --profile: the first iteration traced")
    profile_step_end: int = opt(12, "with --profile: the last iteration traced")
    profile_ranks: Optional[list] = opt(
        None, "with --profile or --record-memory-history: the global ranks traced (default: 0)", metavar="RANK")
    profile_dir: Optional[str] = opt(
        None, "with --profile: where the traces go (default: --tensorboard-dir, else <save>/profile, else ./profile)")
    record_memory_history: bool = opt(
        False, "CUDA only (skipped with one line on the CPU): record every allocation with its stack on the "
        "--profile-ranks ranks and dump a snapshot to --memory-snapshot-path at the end of training and on an "
        "out-of-memory error (open it at pytorch.org/memory_viz)")
    memory_snapshot_path: str = opt(
        "snapshot.pickle", "with --record-memory-history: the snapshot file (rank N of a job of several ranks "
        "writes NAME.rankN.pickle)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    preset: Optional[str] = None

    @property
    def seq_length(self) -> int:
        return self.data.seq_length

    @property
    def num_microbatches(self) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * self.parallel.data_parallel_size)


SECTIONS = ("model", "parallel", "data", "optim", "train", "checkpoint", "logging")
