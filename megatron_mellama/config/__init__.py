"""Configuration: dataclasses, presets, Megatron-LM flags and YAML, validation."""

from .cli import build_parser, parse_config
from .errors import ConfigError
from .presets import PRESETS
from .sections import (CheckpointConfig, Config, DataConfig, LoggingConfig, ModelConfig, OptimizerConfig,
                       ParallelConfig, TrainingConfig)
from .validate import parse_data_path, parse_split, validate

__all__ = ["build_parser", "parse_config", "ConfigError", "PRESETS", "Config", "ModelConfig", "ParallelConfig",
           "DataConfig", "OptimizerConfig", "TrainingConfig", "CheckpointConfig", "LoggingConfig",
           "parse_data_path", "parse_split", "validate"]
