"""Errors a user can cause (bad configuration, bad trace), as opposed to model bugs."""


class ConfigError(ValueError):
    """A configuration value out of range. `key` is the dotted config key, e.g. 'host.nr_cpus'."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


class ShardingError(RuntimeError):
    """A shard that replays only its own nodes' VMs saw an effect on another shard's pCPUs that
    is not an on_each_cpu broadcast: the trace is not node-local, so it cannot be split."""
