"""From a composed Hydra config to the emulator's objects, with one-line errors for bad input.

Everything is instantiated from `_target_`; this module never dispatches on names.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from hvmodel.cost import CostModel
from hvmodel.errors import ConfigError
from hvmodel.host import Topology
from hvmodel.metrics import NoiseBudget
from hvmodel.trace import Trace
from hvmodel.workloads.base import Workload

GROUPS = ("host", "workload", "strategy", "cost", "noise", "cluster", "tracking")


@dataclass
class Scenario:
    """Everything one shard needs; small and picklable (it goes through Ray's object store)."""

    topo: Topology
    workload: Workload
    strategy: object
    cost: CostModel
    noise: NoiseBudget
    seed: int
    ept_ad: bool = True
    max_examples: int = 10

    def make_trace(self) -> Trace:
        return self.workload.trace(self.topo, self.seed)


def instantiate_group(cfg: DictConfig, group: str):
    """instantiate(cfg[group]), turning any failure into a ConfigError naming the key."""
    node = cfg[group]
    try:
        return instantiate(node)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        if isinstance(cause, TypeError) and "unexpected keyword argument" in str(cause):
            bad = str(cause).rsplit("'", 2)[-2]
            params = [p for p in inspect.signature(get_class(node._target_)).parameters if p != "self"]
            raise ConfigError(f"{group}.{bad}", f"unknown key; allowed: {', '.join(f'{group}.{p}' for p in params)}") from None
        raise ConfigError(group, f"cannot build {node.get('_target_')}: {cause or e}") from None


def build_scenario(cfg: DictConfig) -> Scenario:
    """Instantiate host, workload, strategy, cost and noise, then cross-check them."""
    topo = instantiate_group(cfg, "host")
    strategy = instantiate_group(cfg, "strategy")
    if topo.env not in strategy.environments:
        raise ConfigError(
            "host.env", f"strategy {strategy.name} runs only with host.env in {list(strategy.environments)}, got {topo.env!r}"
        )
    workload = instantiate_group(cfg, "workload")
    workload.check(topo)
    if not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ConfigError("seed", f"must be an integer >= 0, got {cfg.seed!r}")
    if not isinstance(cfg.shards, int) or cfg.shards < 1:
        raise ConfigError("shards", f"must be an integer >= 1, got {cfg.shards!r}")
    return Scenario(
        topo=topo,
        workload=workload,
        strategy=strategy,
        cost=instantiate_group(cfg, "cost"),
        noise=instantiate_group(cfg, "noise"),
        seed=cfg.seed,
        ept_ad=bool(cfg.engine.ept_ad),
        max_examples=int(cfg.engine.max_examples),
    )
