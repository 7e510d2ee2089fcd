"""Errors a user can cause (bad configuration, bad trace), as opposed to model bugs."""


class ConfigError(ValueError):
    """A configuration value out of range. `key` is the dotted config key, e.g. 'host.nr_cpus'."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
