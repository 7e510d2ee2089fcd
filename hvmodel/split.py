"""Splitting a trace by NUMA node, so that a shard replays only what its pCPUs need.

When every VM stays on one node (its vCPUs, the VMM threads that create, zap and destroy it,
and the page pool its roots come from), VM-level state never crosses nodes: a shard that owns
whole nodes can replay just the events of its own VMs. The one effect that crosses shards is an
on_each_cpu broadcast (strategy B), which every shard's pCPUs receive: a shard first replays its
VMs without any pCPU of its own (VM level only, which is exact: VM-level state never depends on
per-pCPU state), recording each broadcast and the position of its event in the whole trace, and
then replays them again with every other shard's broadcasts delivered at their positions. A
kick of a vCPU in guest mode by another shard's broadcast changes nothing at VM level (in-guest
vCPUs have no pending requests between events), which is why the first pass needs none of them.

Positions are order keys: the event's index in the whole trace, or (time, node) for traces made
node by node (hvmodel.workloads), which are merged in that order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from hvmodel.errors import ShardingError
from hvmodel.host import Topology
from hvmodel.trace import Ev, Trace, unpack_vm_create


class VmNodes:
    """The NUMA node of each VM, learnt from its vm_create events as the trace streams by. VM ids
    are small (they count VMs), so they index an array; a larger id takes the slow path."""

    DENSE = 1 << 20  # VM ids below this are looked up in the array (2 MiB at most)

    def __init__(self) -> None:
        self.node: dict[int, int] = {}
        self.dense = np.full(0, -1, np.int16)

    def of(self, chunk: np.ndarray) -> np.ndarray:
        """The node of each event's VM (-1 for a VM not created yet)."""
        creates = chunk["kind"] == Ev.VM_CREATE
        for vm, arg in zip(chunk["vm"][creates].tolist(), chunk["arg"][creates].tolist()):
            node = unpack_vm_create(arg)[2]
            if self.node.setdefault(vm, node) != node:
                raise ShardingError(f"VM {vm} is created again on another node")
            if 0 <= vm < self.DENSE:
                if vm >= len(self.dense):  # grow by doubling
                    grown = np.full(min(max(vm + 1, 2 * len(self.dense)), self.DENSE), -1, np.int16)
                    grown[: len(self.dense)] = self.dense
                    self.dense = grown
                self.dense[vm] = node
        vm = chunk["vm"]
        if len(vm) and vm.min() >= 0 and vm.max() < len(self.dense):
            return self.dense[vm].astype(np.int64)
        ids, at = np.unique(vm, return_inverse=True)
        return np.array([self.node.get(v, -1) for v in ids.tolist()], np.int64)[at]


def foreign_pcpus(chunk: np.ndarray, node: np.ndarray, topo: Topology) -> np.ndarray:
    """The events that run on a pCPU outside their VM's node (or on no known node)."""
    pcpu = chunk["pcpu"].astype(np.int64)
    on = pcpu >= 0
    cpu_node = topo.node_of()
    bad = on & ((pcpu >= topo.nr_cpus) | (node < 0))
    ok = on & ~bad
    bad[ok] |= cpu_node[pcpu[ok]] != node[ok]
    return bad


def node_local(trace: Trace, topo: Topology) -> bool:
    """Whether every event of every VM runs on that VM's node (one pass over the trace); a trace
    with events of VMs that do not exist is not (the unsplit replay says where it fails)."""
    vms = VmNodes()
    try:
        for chunk in trace:
            node = vms.of(chunk)
            if (node < 0).any() or foreign_pcpus(chunk, node, topo).any():
                return False
    except ShardingError:
        return False
    return True


def by_node(trace: Iterable[np.ndarray], topo: Topology) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A trace made node by node for some nodes (Workload.trace(nodes=)), chunk by chunk, with
    each event's order key, (time, node) as one integer, and its index in this trace."""
    vms, start = VmNodes(), 0
    for chunk in trace:
        node = vms.of(chunk)
        yield chunk, chunk["time_ns"] * topo.numa_nodes + node, start + np.arange(len(chunk))
        start += len(chunk)


def local_chunks(trace: Iterable[np.ndarray], topo: Topology, nodes: Iterable[int]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The events of the VMs of `nodes` in a whole trace, chunk by chunk, each with its order key
    and its index in the trace, which are the same."""
    vms, start, mine = VmNodes(), 0, np.isin(np.arange(topo.numa_nodes), list(nodes))
    for chunk in trace:
        node = vms.of(chunk)
        if (node < 0).any():
            raise ShardingError("an event of a VM that was never created: the trace cannot be split")
        keep = mine[node]
        if (foreign_pcpus(chunk, node, topo) & keep).any():
            raise ShardingError("a VM of this shard runs on another shard's pCPUs: the trace is not node-local")
        index = start + np.flatnonzero(keep)
        yield chunk[keep], index, index
        start += len(chunk)
