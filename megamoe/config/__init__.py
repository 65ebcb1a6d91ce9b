"""Typed configuration: sections, YAML loading with inheritance, overrides, docs."""

from megamoe.config.data_schema import DataConfig, SimilarityConfig
from megamoe.config.loader import (
    build_config,
    config_to_dict,
    config_to_yaml,
    load_config,
    parse_override,
    save_config,
)
from megamoe.config.schema import (
    Config,
    LoggingConfig,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    WandbConfig,
)

__all__ = [
    "Config",
    "DataConfig",
    "LoggingConfig",
    "MoEConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "SimilarityConfig",
    "TrainConfig",
    "WandbConfig",
    "build_config",
    "config_to_dict",
    "config_to_yaml",
    "load_config",
    "parse_override",
    "save_config",
]
