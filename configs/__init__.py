"""The shipped YAML configs, installed as package data `neco.configs` (see `neco.config.resolve_config_path`)."""
