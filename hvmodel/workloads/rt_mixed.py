"""rt_mixed: pinned RT VMs beside overcommitted best-effort VMs on the same host.

The composition of the other two generators: the RT side is partitioned_pinned's per-node
streams (0 .. numa_nodes-1), the best-effort side one overcommit stream (number numa_nodes)
floating over every CPU the RT side left free.
"""

from __future__ import annotations

import inspect

from hvmodel.errors import ConfigError
from hvmodel.host import Topology
from hvmodel.workloads.base import HostCpus, VmFleet, Workload
from hvmodel.workloads.overcommit import Overcommit
from hvmodel.workloads.partitioned_pinned import PartitionedPinned

BEST_EFFORT_VM_BASE = 1 << 20  # best-effort VM ids start here; RT VMs count up from 1 below it


class RtMixed(Workload):
    """Pinned RT VMs beside overcommitted best-effort VMs on the same host: RT partitions are
    pinned on the isolated CPUs (as partitioned_pinned, `rt.fill` of them), best-effort VMs
    float over every other CPU: the housekeeping ones and the isolated ones the RT side left
    free (as overcommit; size that side with host.housekeeping_per_node or rt.fill). The RT
    CPUs then see whatever the best-effort side's flushes send them."""

    name = "rt_mixed"

    def __init__(
        self,
        duration_s: float = 2.0,
        rt: dict | None = None,
        best_effort: dict | None = None,
        chunk_events: int = 1 << 16,
        closed_loop: bool = False,
    ):
        # closed_loop is the whole host's (one loop drives both halves' streams), not a half's
        super().__init__(duration_s, chunk_events, closed_loop)
        self.rt = PartitionedPinned(duration_s, chunk_events=chunk_events, **_part(rt, PartitionedPinned, "rt", None))
        self.best_effort = Overcommit(duration_s, chunk_events=chunk_events, **_part(best_effort, Overcommit, "best_effort", "cpuset"))

    def check(self, topo: Topology) -> None:
        self.rt.check(topo)
        host = HostCpus(topo)
        spare = sum(len(h) for h in host.housekeeping) - len(set(host.vmm_cpu))
        if spare <= 0 and self.rt.fill == 1:
            raise ConfigError(
                "workload.rt.fill", "leaves no CPU for the best-effort VMs: lower rt.fill or raise host.housekeeping_per_node"
            )

    def streams(self, host: HostCpus, seed: int, nodes: list[int]) -> list[VmFleet]:
        rt = [self.rt.node_stream(host, self.rng(seed, node), node, BEST_EFFORT_VM_BASE) for node in nodes]
        if len(nodes) < host.topo.numa_nodes:  # a one-node host's subset without its node
            return rt
        taken = {c for stream in rt for cpus in stream.parts for c in cpus} | set(host.vmm_cpu)
        free = [c for c in range(host.topo.nr_cpus) if c not in taken]
        numa_nodes = host.topo.numa_nodes
        return [*rt, self.best_effort.fleet(host, self.rng(seed, numa_nodes), free, BEST_EFFORT_VM_BASE)]


def _part(params: dict | None, cls: type, where: str, owned_key: str | None) -> dict:
    """Parameters of one half of rt_mixed, checked against that generator's own keys."""
    params = dict(params or {})
    allowed = [p for p in inspect.signature(cls).parameters if p not in ("duration_s", "chunk_events", "closed_loop", owned_key)]
    for key in params:
        if key not in allowed:
            raise ConfigError(f"workload.{where}.{key}", f"unknown key; allowed: {', '.join(allowed)}")
    return params
