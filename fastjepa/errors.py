"""Errors shared across the layers (the config and the data pipelines both raise them)."""


class ConfigError(ValueError):
    """A config key is unknown, of the wrong type or out of range."""
