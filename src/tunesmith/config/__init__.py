"""The typed config shared by every subcommand."""

from tunesmith.config.fields import Config
from tunesmith.config.loader import ConfigError, config_to_yaml, load_config

__all__ = ["Config", "ConfigError", "config_to_yaml", "load_config"]
