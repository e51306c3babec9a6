"""Given settings -> the Config a run uses: every value that follows from others is set here, once.

The inputs: the settings the flags and the `--config` YAML file give (`cli.read_given`), the world
size, the tokenizer's vocabulary size and the model values recorded by the checkpoint the run loads
(found by the caller: the checkpoint is read by a layer above this one). Precedence, lowest first:
dataclass defaults, the `--model` preset, the YAML file, flags on the command line; then the values
derived from those where they were not given; then, for values that change what a checkpoint's
weights compute, the checkpoint's where the run did not set them. `validate` only reads the result.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

from . import compat
from .errors import ConfigError
from .fields import field_index
from .presets import PRESETS
from .sections import Config, DataConfig, ModelConfig

# what the same weights compute depends on these too; a run that does not set them (by flag or
# YAML; a preset's value is a default) takes the checkpoint's, where the shapes must match anyway
RECORDED_VALUES = (("norm_epsilon", "--norm-epsilon"), ("rotary_base", "--rotary-base"))


def as_given(given: Mapping[str, object]) -> Config:
    """The defaults, the preset and the given values, nothing derived: enough to find the checkpoint
    a run loads (`--load`, `--save`, `--finetune`) before it is resolved.

    `given` maps 'section.field' and 'compat.name' to values, and 'preset' to a preset's name."""
    cfg = Config()
    cfg.preset = given.get("preset")
    if cfg.preset:
        index = field_index()
        for name, value in PRESETS[cfg.preset].items():
            setattr(getattr(cfg, index[name][0]), name, value)
    for key, value in given.items():
        if key == "preset":
            continue
        section, name = key.split(".")
        if section == "compat":
            compat.check_compat_value(name, value)
        else:
            setattr(getattr(cfg, section), name, value)
    return cfg


def resolve(given: Mapping[str, object], *, world_size: int = 1,
            vocab_size_of: Optional[Callable[[DataConfig], int]] = None,
            recorded_model: Optional[Mapping[str, object]] = None) -> tuple[Config, list[str]]:
    """The Config of a run of `world_size` processes, every derived value set (not yet validated),
    and a line per value taken from `recorded_model`.

    `vocab_size_of(data_config)` gives the tokenizer's vocabulary size; it is used unless the
    vocabulary size was given. `recorded_model` is the model section of the configuration the
    checkpoint to load recorded (empty or None without one)."""
    cfg = as_given(given)
    p, d, m = cfg.parallel, cfg.data, cfg.model
    if p.use_distributed_optimizer and "parallel.data_parallel_sharding" not in given:
        p.data_parallel_sharding = "optimizer"
    if d.seq_length is None:
        d.seq_length = m.max_position_embeddings
    if m.max_position_embeddings is None:
        m.max_position_embeddings = d.seq_length
    if p.tensor_model_parallel_size == 1:
        p.sequence_parallel = False  # as Megatron-LM: nothing to shard
    if p.num_layers_per_virtual_pipeline_stage and "parallel.pipeline_schedule" not in given:
        p.pipeline_schedule = "interleaved-1f1b"
    if d.tokenizer_model and vocab_size_of and "model.vocab_size" not in given:
        try:
            m.vocab_size = vocab_size_of(d)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--tokenizer-model {d.tokenizer_model}: {e}") from None
    p.world_size = world_size
    resolve_gradient_reduction(cfg)
    _default_global_batch(cfg)
    if d.sft:
        # conversations are packed: each must see only itself
        d.reset_position_ids = d.reset_attention_mask = True
    return cfg, _take_recorded(m, given, recorded_model or {})


def resolve_gradient_reduction(cfg: Config) -> None:
    """--reduce-grads-once-per-step unless given: on for ZeRO-2 (`optimizer`), off otherwise.

    ZeRO-2 reduce-scattering every micro-batch sends the step's fp32 gradients once per micro-batch
    (the dry run of the 13B recipe: 388 GiB per GPU per step over 32 micro-batches, against 12 once
    per step) to save 4 bytes per parameter of the rank (11.8 GiB there), the memory Megatron-LM's
    distributed optimizer spends too. ZeRO-3 (`full`) is chosen to save memory and all-gathers the
    weights every micro-batch anyway: whole gradients would cost more than it saves and only halve
    its traffic."""
    p = cfg.parallel
    if p.reduce_grads_once_per_step is None:
        p.reduce_grads_once_per_step = p.data_parallel_sharding == "optimizer"


def _default_global_batch(cfg: Config) -> None:
    """--global-batch-size unless given: one micro-batch per data-parallel rank. Sizes that
    validation refuses (no data-parallel size follows from them) leave it unset."""
    t, p = cfg.train, cfg.parallel
    sizes = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size)
    if t.global_batch_size is None and all(isinstance(s, int) and s > 0 for s in sizes):
        t.global_batch_size = t.micro_batch_size * p.data_parallel_size


def _take_recorded(m: ModelConfig, given: Mapping[str, object], recorded: Mapping[str, object]) -> list[str]:
    lines = []
    for name, flag in RECORDED_VALUES:
        value = recorded.get(name)
        if f"model.{name}" in given or value is None or value == getattr(m, name):
            continue
        lines.append(f"{flag} {value}: the checkpoint's value (this run did not set {flag}; "
                     f"it would have used {getattr(m, name)})")
        setattr(m, name, value)
    return lines
