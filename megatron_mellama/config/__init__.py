"""Configuration: dataclasses, presets, Megatron-LM flags and YAML, resolution, validation."""

from .cli import build_parser, parse_config, read_given
from .errors import ConfigError
from .presets import PRESETS
from .resolve import as_given, resolve
from .sections import (CheckpointConfig, Config, DataConfig, LoggingConfig, ModelConfig, OptimizerConfig,
                       ParallelConfig, TrainingConfig)
from .validate import parse_data_path, parse_split, validate

__all__ = ["build_parser", "parse_config", "read_given", "ConfigError", "PRESETS", "as_given", "resolve", "Config",
           "ModelConfig", "ParallelConfig", "DataConfig", "OptimizerConfig", "TrainingConfig", "CheckpointConfig",
           "LoggingConfig", "parse_data_path", "parse_split", "validate"]
