"""From a composed Hydra config to the emulator's objects, with one-line errors for bad input.

Everything is instantiated from `_target_`; this module never dispatches on names.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from hvmodel import closed_loop
from hvmodel.cost import CostModel
from hvmodel.errors import ConfigError
from hvmodel.fast.engine import FastEngine
from hvmodel.host import Topology
from hvmodel.metrics import NoiseBudget
from hvmodel.split import by_node, local_chunks
from hvmodel.strategies.base import check_environment
from hvmodel.trace import Trace
from hvmodel.workloads.base import Workload

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = str(REPO / "conf")
EXPERIMENTS_DIR = str(REPO / "experiments")  # one primary config per question: hvbench -cn NAME -m
GROUPS = ("host", "workload", "strategy", "cost", "noise", "cluster", "tracking", "engine")


@dataclass
class Scenario:
    """Everything one shard needs; small and picklable (it goes through Ray's object store)."""

    topo: Topology
    workload: Workload
    strategy: object
    cost: CostModel
    noise: NoiseBudget
    seed: int
    engine: Callable = FastEngine  # called (topo, strategy, cost, noise, owned_nodes=...)
    max_examples: int = 10

    def make_trace(self) -> Trace:
        """A fresh trace, from a copy of the workload: generators keep their running state on it.
        Closed loop: the trace this job's strategy and cost make (hvmodel/closed_loop.py), each
        iteration running the loop against a fresh engine (what `trace.save` writes)."""
        if self.workload.closed_loop:
            return closed_loop.trace(self.workload, self.topo, self.seed, self.make_engine, self.closed_loop_meta())
        return copy.deepcopy(self.workload).trace(self.topo, self.seed)

    def make_loop(self, engine) -> closed_loop.ClosedLoop:
        """The closed loop of this job driving `engine` (a fresh one owning every pCPU)."""
        return closed_loop.ClosedLoop(self.workload, self.topo, self.seed, engine, self.closed_loop_meta())

    def closed_loop_meta(self) -> dict:
        """What a closed-loop trace depends on besides the workload, host and seed."""
        return {"strategy": self.strategy.name, "cost": dataclasses.asdict(self.cost)}

    def make_engine(self, owned_nodes=None, local_nodes=None):
        """An engine for the pCPUs of `owned_nodes` (all if None), replaying only the VMs of
        `local_nodes` if given (a split shard), with its own copy of the strategy: the
        reference's strategies keep state and are attached to one host."""
        strategy = copy.deepcopy(self.strategy)
        return self.engine(self.topo, strategy, self.cost, self.noise, owned_nodes=owned_nodes, local_nodes=local_nodes)

    def node_local(self) -> bool:
        """Whether every VM stays on one NUMA node, so shards can split the VMs (hvmodel.split)."""
        return self.workload.node_local(self.topo)

    def local_chunks(self, nodes: list[int]):
        """The events of the VMs of `nodes`: (chunk, order keys, indices in the trace) triples,
        and the trace the indices are of (for error messages)."""
        if self.workload.generates_by_node:
            trace = copy.deepcopy(self.workload).trace(self.topo, self.seed, nodes=nodes)
            return by_node(trace, self.topo), trace
        trace = self.make_trace()
        return local_chunks(trace, self.topo, nodes), trace


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
    check_environment(strategy, topo.env)
    workload = instantiate_group(cfg, "workload")
    workload.check(topo)
    if not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ConfigError("seed", f"must be an integer >= 0, got {cfg.seed!r}")
    if not isinstance(cfg.shrink_s, int | float) or cfg.shrink_s < 0:
        raise ConfigError("shrink_s", f"must be a number of seconds >= 0, got {cfg.shrink_s!r}")
    if not isinstance(cfg.shards, int) or cfg.shards < 1:
        raise ConfigError("shards", f"must be an integer >= 1, got {cfg.shards!r}")
    if workload.closed_loop and cfg.shards > 1:
        raise ConfigError("workload.closed_loop", f"runs in one shard (generator and engine in lockstep); got shards={cfg.shards}")
    return Scenario(
        topo=topo,
        workload=workload,
        strategy=strategy,
        cost=instantiate_group(cfg, "cost"),
        noise=instantiate_group(cfg, "noise"),
        seed=cfg.seed,
        engine=instantiate_group(cfg, "engine"),
        max_examples=int(cfg.engine.max_examples),
    )
