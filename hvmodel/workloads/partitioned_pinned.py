"""partitioned_pinned: many small VMs, each vCPU pinned 1:1 to an RT-isolated pCPU.

Each NUMA node is its own stream (its own DES and RNG): its partitions, boots, halts and zaps
never depend on another node's, and its VM ids are 1 + node + numa_nodes * k for the k-th VM
created on it, so a shard can generate just its own nodes.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

from hvmodel.errors import ConfigError
from hvmodel.host import Topology
from hvmodel.trace import PUT_HALT, Ev
from hvmodel.workloads import base
from hvmodel.workloads.base import (
    FIRST_WORKLOAD_OP,
    INLINE,
    JIT,
    N_COUNTERS,
    NS,
    STREAM_FIELDS,
    US,
    VCPU_FIELDS,
    VM_ID_LIMIT,
    CompiledStream,
    HostCpus,
    Vm,
    VmFleet,
    VmLifecycle,
    Workload,
    at,
    check_share,
    current,
    emit,
    exp_ns,
    implements,
    ns,
    positive,
    stream_fields,
)


class PartitionedPinned(Workload):
    """Many small VMs, each vCPU pinned 1:1 to an RT-isolated pCPU of one NUMA node; the
    VMM threads run on the node's housekeeping CPUs. A pinned vCPU never migrates, but it
    halts and wakes on its own pCPU, and its VM boots, reboots or is replaced on the same
    partition."""

    name = "partitioned_pinned"

    def __init__(
        self,
        duration_s: float = 2.0,
        vm_vcpus: tuple[int, ...] = (1, 2, 4),
        fill: float = 1.0,
        halt_per_s: float = 30000.0,
        halt_us: float = 1500.0,
        guest_flush_per_stint: float = 0.033,
        lifecycle: dict | None = None,
        chunk_events: int = 1 << 16,
        closed_loop: bool = False,
    ):
        super().__init__(duration_s, chunk_events, closed_loop)
        self.lifecycle = VmLifecycle(**(lifecycle or {}))
        self.lifecycle.validate()
        if not vm_vcpus or any(not 1 <= n <= 1024 for n in vm_vcpus):
            raise ConfigError("workload.vm_vcpus", f"each VM size must be in 1..1024, got {list(vm_vcpus)}")
        if not 0 < fill <= 1:
            raise ConfigError("workload.fill", f"must be in (0, 1], got {fill}")
        positive("halt_per_s", halt_per_s)
        positive("halt_us", halt_us)
        check_share("guest_flush_per_stint", guest_flush_per_stint)
        self.vm_vcpus, self.fill, self.halt_per_s, self.halt_us = tuple(vm_vcpus), fill, halt_per_s, halt_us
        self.guest_flush_per_stint = guest_flush_per_stint

    def check(self, topo: Topology) -> None:
        per_node = max(len(c) for c in HostCpus(topo).isolated)
        if max(self.vm_vcpus) > per_node:
            raise ConfigError(
                "workload.vm_vcpus",
                f"a pinned VM of {max(self.vm_vcpus)} vCPUs does not fit in the {per_node} isolated CPUs"
                f" of a NUMA node of host {topo.name or topo.nr_cpus}",
            )

    def usable(self, cpus: list[int]) -> list[int]:
        """The share (`fill`) of a node's isolated CPUs given to VMs."""
        return cpus[: int(len(cpus) * self.fill)]

    def node_local(self, topo: Topology) -> bool:
        """Every VM lives on its partition's node; so does its VMM CPU unless the node has no
        housekeeping CPU of its own (it then borrows another node's)."""
        host = HostCpus(topo)
        return all(host.housekeeping[n] or len(self.usable(host.isolated[n])) < min(self.vm_vcpus) for n in range(topo.numa_nodes))

    def partitions(self, rng: np.random.Generator, cpus: list[int]) -> list[list[int]]:
        """Split a node's usable isolated CPUs into VM-sized partitions, sizes drawn uniformly
        among those that still fit."""
        usable = self.usable(cpus)
        parts = []
        k = 0
        while k < len(usable):
            fits = [n for n in self.vm_vcpus if n <= len(usable) - k]
            if not fits:
                break
            n = int(rng.choice(fits))
            parts.append(usable[k : k + n])
            k += n
        return parts

    def node_stream(self, host: HostCpus, rng: np.random.Generator, node: int, vm_id_limit: int) -> PinnedNode:
        """The stream of one node's partitions (also rt_mixed's RT side); its VM ids must stay
        below vm_id_limit."""
        return PinnedNode(self, host, rng, node, vm_id_limit)

    def streams(self, host: HostCpus, seed: int, nodes: list[int]) -> list[VmFleet]:
        return [self.node_stream(host, self.rng(seed, node), node, VM_ID_LIMIT) for node in nodes]


class PinnedNode(VmFleet):
    """One NUMA node's partitions, with the node's own RNG; the reference stream."""

    def __init__(self, workload: PartitionedPinned, host: HostCpus, rng: np.random.Generator, node: int, vm_id_limit: int):
        nodes = host.topo.numa_nodes
        super().__init__(rng, workload.duration_ns, workload.lifecycle, 1 + node, nodes, vm_id_limit)
        self.workload, self.node, self.hk = workload, node, host.vmm_cpu[node]
        self.parts = workload.partitions(rng, host.isolated[node])

    def start(self) -> None:
        for p, cpus in enumerate(self.parts):
            start = int(self.rng.uniform(0, self.lifecycle.boot_s) * NS)  # boots are staggered
            self.sim.at(start, self.boot, p, self.node, self.hk, cpus)

    def place_vcpu(self, t: int, vm: Vm, i: int) -> None:
        if not vm.running[i]:
            vm.running[i] = True
            self.sim.emit(t, Ev.VCPU_LOAD, vm.id, i, vm.cpus[i])
            self.sim.emit(t, Ev.VM_ENTRY, vm.id, i)

    def stop_vcpu(self, t: int, vm: Vm, i: int, reason: int = 0) -> None:
        if vm.running[i]:
            self.end_stint(t, vm, i, reason, self.workload.guest_flush_per_stint)
            vm.running[i] = False
            self.sim.emit(t, Ev.VCPU_PUT, vm.id, i, arg=reason)

    def vcpus_running(self, t: int, vm: Vm) -> None:
        halt_per_s = self.workload.halt_per_s
        if halt_per_s > 0:
            for i in range(len(vm.cpus)):
                self.sim.at(t + self.sim.exp_ns(1 / halt_per_s), self.halt, vm, i, vm.gen)

    def halt(self, t: int, vm: Vm, i: int, gen: int) -> None:
        """HLT: the vCPU thread blocks (vcpu_put) and wakes later on its own pCPU."""
        if vm.current(gen) and vm.running[i]:
            if self.stint_slipped(t, vm, i, self.halt, vm, i, gen):
                return
            self.stop_vcpu(t, vm, i, PUT_HALT)
            self.sim.at(t + max(1, int(self.rng.exponential(self.workload.halt_us) * US)), self.wake, vm, i, gen)

    def wake(self, t: int, vm: Vm, i: int, gen: int) -> None:
        if vm.current(gen) and not vm.running[i]:
            self.place_vcpu(t, vm, i)
            self.sim.at(t + self.sim.exp_ns(1 / self.workload.halt_per_s), self.halt, vm, i, gen)

    def replace(self, t: int, vm: Vm, slot: int) -> None:
        self.sim.at(t, self.boot, slot, self.node, self.hk, self.parts[slot])

    def compiled(self) -> CompiledStream:
        parts = self.parts
        max_vcpus = max((len(c) for c in parts), default=1)
        pending = len(parts) * (max_vcpus + self.lifecycle.boot_steps + 4)  # a first guess; the heap grows
        fields = stream_fields(self, len(parts), max_vcpus, PINNED_VCPU, N_COUNTERS, pending)
        vms, vcpus = fields["vms"], fields["vcpus"]
        vms["node"], vms["hk"] = self.node, self.hk
        for p, cpus in enumerate(parts):  # a slot is a partition: its VMs' vCPUs never move
            vms["vcpus"][p] = len(cpus)
            vcpus["cpu"][p, : len(cpus)] = cpus
        w = self.workload
        state = PinnedState(
            **fields,
            boot_s=float(self.lifecycle.boot_s),
            halt_per_s=float(w.halt_per_s),
            halt_us=float(w.halt_us),
            guest_flush_per_stint=float(w.guest_flush_per_stint),
        )
        return CompiledStream(state, self.rng, _start, max_vcpus, self.lifecycle)


# --- the compiled twin of PinnedNode -----------------------------------------------------------
BOOT, HALT, WAKE = range(FIRST_WORKLOAD_OP, FIRST_WORKLOAD_OP + 3)
PINNED_VCPU = np.dtype(VCPU_FIELDS, align=True)
PinnedState = NamedTuple(
    "PinnedState", [*STREAM_FIELDS, ("boot_s", float), ("halt_per_s", float), ("halt_us", float), ("guest_flush_per_stint", float)]
)


@numba.njit(**JIT)
def _start(st: PinnedState, rng) -> None:
    """PinnedNode.start."""
    for p in range(len(st.vms)):
        at(st, ns(rng.uniform(0.0, st.boot_s) * NS), BOOT, p)


@implements(base.borrowed, PinnedState)
def _borrowed(st):
    return PinnedState(*base.borrowed_stream(st), st.boot_s, st.halt_per_s, st.halt_us, st.guest_flush_per_stint)


@implements(base.place_vcpu, PinnedState)
def _place_vcpu(st, rng, t, p, i):
    c = st.vcpus[p, i]
    if not c.running:
        c.running = True
        emit(st, t, Ev.VCPU_LOAD, st.vms[p].id, i, c.cpu)
        emit(st, t, Ev.VM_ENTRY, st.vms[p].id, i)


@implements(base.stop_vcpu, PinnedState)
def _stop_vcpu(st, rng, t, p, i, reason):
    c = st.vcpus[p, i]
    if c.running:
        base.end_stint(st, rng, t, p, i, reason)
        c.running = False
        emit(st, t, Ev.VCPU_PUT, st.vms[p].id, i, -1, reason)


@implements(base.vcpus_running, PinnedState)
def _vcpus_running(st, rng, t, p):
    if st.halt_per_s > 0:
        for i in range(st.vms[p].vcpus):
            at(st, t + exp_ns(rng, 1 / st.halt_per_s), HALT, p, i, st.vms[p].life)


@implements(base.leave_l2, PinnedState)
def _leave_l2(st, rng, t, p, i):
    pass  # pinned VMs run no L2 guests


@implements(base.replace, PinnedState)
def _replace(st, rng, t, p):
    at(st, t, BOOT, p)


@numba.njit(**INLINE)
def _halt(st, rng, t: int, p: int, i: int, life: int) -> None:
    """PinnedNode.halt."""
    if current(st, p, life) and st.vcpus[p, i].running:
        base.stop_vcpu(st, rng, t, p, i, PUT_HALT)
        at(st, t + max(1, ns(rng.exponential(st.halt_us) * US)), WAKE, p, i, life)


@numba.njit(**INLINE)
def _wake(st, rng, t: int, p: int, i: int, life: int) -> None:
    """PinnedNode.wake."""
    if current(st, p, life) and not st.vcpus[p, i].running:
        base.place_vcpu(st, rng, t, p, i)
        at(st, t + exp_ns(rng, 1 / st.halt_per_s), HALT, p, i, life)


# on_callback and the callbacks it dispatches to are inlined into run_until's loop
@implements(base.on_callback, PinnedState, inline="always")
def _on_callback(st, rng, t, op, a, b, c, d):
    if op == BOOT:  # (slot)
        base.boot(st, rng, t, a)
    elif op == HALT:  # (slot, vcpu, life)
        _halt(st, rng, t, a, b, c)
    elif op == WAKE:  # (slot, vcpu, life)
        _wake(st, rng, t, a, b, c)
