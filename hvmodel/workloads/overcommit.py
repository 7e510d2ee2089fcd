"""overcommit: unpinned VMs on a shared cpuset, the host scheduler migrating their vCPUs;
optionally VMs that are hypervisors themselves (nested guests). nested_kata is a preset of it.

One stream for the whole host: the scheduler's idle pCPUs and run queue are shared by all VMs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numba
import numpy as np

from hvmodel.errors import ConfigError
from hvmodel.host import Topology
from hvmodel.trace import PUT_HALT, PUT_PREEMPTED, ZAP_FLOOD, Ev, pack_nested_vmenter
from hvmodel.workloads import base
from hvmodel.workloads.base import (
    FIRST_WORKLOAD_OP,
    INLINE,
    JIT,
    MS,
    N_COUNTERS,
    NS,
    STREAM_FIELDS,
    US,
    VCPU_FIELDS,
    CompiledStream,
    HostCpus,
    Vm,
    VmFleet,
    VmLifecycle,
    Workload,
    at,
    borrow,
    check_share,
    current,
    emit,
    exp_ns,
    implements,
    ns,
    positive,
    stream_fields,
)


@dataclass(frozen=True)
class NestedGuests:
    """How a VM that is itself a hypervisor (L1) runs its guests (L2)."""

    l2_per_vm: int = 4  # distinct L2 guests (EPTP12 / VPID12) each L1 switches between
    transitions_per_s: float = 200.0  # nested VM-enter + VM-exit pairs per L1 VM, per s
    nested_ept: bool = True  # L1 uses EPT for L2 (shadow-EPT roots in guest_mmu), else TDP roots
    invept_prob: float = 0.05  # chance an L2 entry follows an L1 INVEPT of that EPTP12
    ept12_write_prob: float = 0.05  # chance L1 edited that L2's EPT12 (kvm_mmu_track_write zap)
    ept12_flood_prob: float = 0.1  # share of those writes that flood or are misaligned: the shadow root itself is zapped

    def __post_init__(self) -> None:
        if self.l2_per_vm < 1:
            raise ConfigError("workload.nested.l2_per_vm", f"must be >= 1, got {self.l2_per_vm}")
        positive("nested.transitions_per_s", self.transitions_per_s, allow_zero=False)
        check_share("nested.ept12_flood_prob", self.ept12_flood_prob)


class Overcommit(Workload):
    """Unpinned VMs on a shared cpuset: more vCPUs than pCPUs, and the host scheduler runs each
    vCPU for a slice wherever a pCPU is free, so vCPUs migrate. A waking vCPU goes back to its
    last pCPU if that is idle (wake affinity), else to any idle pCPU, else it queues."""

    name = "overcommit"

    def __init__(
        self,
        duration_s: float = 2.0,
        cpuset: str = "isolated",
        vms: int = 5,
        vm_vcpus: tuple[int, ...] = (2, 4),
        run_ms: float = 4.0,
        sleep_ms: float = 2.0,
        wake_affinity: float = 0.9,
        guest_flush_per_stint: float = 0.2,
        resched_us: float = 2.0,
        nested_fraction: float = 0.0,
        nested: dict | None = None,
        lifecycle: dict | None = None,
        chunk_events: int = 1 << 16,
        closed_loop: bool = False,
    ):
        super().__init__(duration_s, chunk_events, closed_loop)
        self.lifecycle = VmLifecycle(**(lifecycle or {}))
        self.lifecycle.validate()
        if cpuset not in ("isolated", "housekeeping", "all"):
            raise ConfigError("workload.cpuset", f"unknown {cpuset!r}; allowed: isolated, housekeeping, all")
        if vms < 1:
            raise ConfigError("workload.vms", f"must be >= 1, got {vms}")
        if not vm_vcpus or any(n < 1 for n in vm_vcpus):
            raise ConfigError("workload.vm_vcpus", f"each VM size must be >= 1, got {list(vm_vcpus)}")
        positive("run_ms", run_ms, allow_zero=False)
        positive("sleep_ms", sleep_ms, allow_zero=False)
        positive("resched_us", resched_us)
        for key, v in (
            ("wake_affinity", wake_affinity),
            ("guest_flush_per_stint", guest_flush_per_stint),
            ("nested_fraction", nested_fraction),
        ):
            check_share(key, v)
        self.cpuset, self.vms, self.vm_vcpus = cpuset, vms, tuple(vm_vcpus)
        self.run_ms, self.sleep_ms, self.wake_affinity = run_ms, sleep_ms, wake_affinity
        self.nested_fraction, self.guest_flush_per_stint, self.resched_us = nested_fraction, guest_flush_per_stint, resched_us
        self.nested = NestedGuests(**(nested or {}))

    def check(self, topo: Topology) -> None:
        if not self.pool(HostCpus(topo)):
            raise ConfigError("workload.cpuset", f"host {topo.name or topo.nr_cpus} has no {self.cpuset} CPUs besides the VMM CPUs")

    def pool(self, host: HostCpus) -> list[int]:
        """The cpuset, minus each node's VMM CPU (it runs the VMM and kernel threads that
        issue zaps and memslot changes, so no vCPU may be in guest mode there)."""
        iso = [c for cpus in host.isolated for c in cpus]
        hk = [c for cpus in host.housekeeping for c in cpus]
        cpus = {"isolated": iso, "housekeeping": hk, "all": iso + hk}[self.cpuset]
        return sorted(set(cpus) - set(host.vmm_cpu))

    def fleet(self, host: HostCpus, rng: np.random.Generator, cpus: list[int], first_vm: int) -> SharedCpuset:
        """This workload's VMs on `cpus`, numbered from `first_vm`: one stream."""
        return SharedCpuset(self, host, rng, cpus, first_vm)

    def streams(self, host: HostCpus, seed: int, nodes: list[int]) -> list[VmFleet]:
        # One stream for the whole host: not node-local unless the host has one node, so `nodes`
        # is every node, or (one node) possibly none.
        return [self.fleet(host, self.rng(seed), self.pool(host), 1)] if nodes else []


class SharedCpuset(VmFleet):
    """The VMs of one overcommitted cpuset and the host scheduler running their vCPU threads;
    the reference stream."""

    def __init__(self, workload: Overcommit, host: HostCpus, rng: np.random.Generator, cpus: list[int], first_vm: int):
        super().__init__(rng, workload.duration_ns, workload.lifecycle, first_vm)
        self.workload = workload
        self.cpuset = cpus
        self.nodes = host.topo.numa_nodes
        self.vmm_cpu = host.vmm_cpu
        self.idle = _IdleCpus(cpus)
        self.queue: list[tuple[Vm, int]] = []  # runnable vCPUs waiting for a pCPU, FIFO
        self.last_cpu: dict[tuple[int, int], int] = {}  # (vm id, vcpu) -> the pCPU it last ran on
        self.l1: dict[tuple[int, int], int] = {}  # (vm id, vcpu) -> the L2 it is running, for nested VMs

    def start(self) -> None:
        for k in range(self.workload.vms):
            self.sim.at(int(self.rng.uniform(0, self.lifecycle.boot_s) * NS), self.boot_one, k)

    def boot_one(self, t: int, slot: int) -> None:
        n = int(self.rng.choice(self.workload.vm_vcpus))
        node = int(self.rng.integers(self.nodes))
        self.boot(t, slot, node, self.vmm_cpu[node], [-1] * n)

    def replace(self, t: int, vm: Vm, slot: int) -> None:
        self.sim.at(t, self.boot_one, slot)

    def slice_ns(self, mean_ms: float) -> int:
        return max(1, int(self.rng.exponential(mean_ms) * MS))

    # -- the scheduler ----------------------------------------------------------------------
    def place_vcpu(self, t: int, vm: Vm, i: int) -> None:
        """The vCPU becomes runnable: last pCPU if idle (wake affinity), any idle one, or queue."""
        if vm.running[i] or (vm, i) in self.queue:
            return
        last = self.last_cpu.get((vm.id, i), -1)
        stay = moved_by_load = False
        if last in self.idle:
            u = self.rng.random()
            stay = u < self.affinity(t)
            moved_by_load = not stay and u < self.workload.wake_affinity  # the open loop would have stayed
        if stay:
            cpu = last
        elif len(self.idle):
            cpu = self.idle.pick(self.rng)
            if moved_by_load and cpu != last:
                self.loop.extra_migrations += 1
        else:
            self.queue.append((vm, i))
            return
        self.idle.remove(cpu)
        self.dispatch(t, cpu, vm, i)

    def affinity(self, t: int) -> float:
        """The chance a waking vCPU stays on its idle last pCPU: `wake_affinity`; in the closed
        loop scaled by 1 - the host's flush load (ClosedLoop.load: the share of all pCPUs'
        time charged to flush work in the last scheduler tick). A modelling assumption, not a
        measured law: a host busy with flush work (its pCPUs trapping to L0 for INVEPT, taking
        IPIs, refilling) looks loaded to the scheduler's wake-up and balancing paths, so fewer
        wake-ups find their previous CPU the cheap choice."""
        if self.loop is None:
            return self.workload.wake_affinity
        return self.workload.wake_affinity * (1.0 - self.loop.load(t))

    def dispatch(self, t: int, cpu: int, vm: Vm, i: int) -> None:
        self.last_cpu[(vm.id, i)] = cpu
        vm.running[i] = True
        vm.cpus[i] = cpu
        self.sim.emit(t, Ev.VCPU_LOAD, vm.id, i, cpu)
        self.sim.emit(t, Ev.VM_ENTRY, vm.id, i)
        if not vm.booting:
            self.sim.at(t + self.slice_ns(self.workload.run_ms), self.slice_end, vm, i, cpu, vm.gen)

    def release(self, t: int, cpu: int) -> None:
        while self.queue:
            vm, i = self.queue.pop(0)
            if vm.alive:
                self.dispatch(t, cpu, vm, i)
                return
        self.idle.add(cpu)

    def leave_l2(self, t: int, vm: Vm, i: int) -> None:
        if self.l1.pop((vm.id, i), None):
            self.sim.emit(t, Ev.NESTED_VMEXIT, vm.id, i)

    def stop_vcpu(self, t: int, vm: Vm, i: int, reason: int = 0) -> None:
        if (vm, i) in self.queue:
            self.queue.remove((vm, i))
        if vm.running[i]:
            self.end_stint(t, vm, i, reason, self.workload.guest_flush_per_stint)
            self.leave_l2(t, vm, i)
            vm.running[i] = False
            self.sim.emit(t, Ev.VCPU_PUT, vm.id, i, arg=reason)
            self.release(t, vm.cpus[i])

    def vcpus_running(self, t: int, vm: Vm) -> None:
        for i in range(len(vm.cpus)):
            if vm.running[i]:
                self.sim.at(t + self.slice_ns(self.workload.run_ms), self.slice_end, vm, i, vm.cpus[i], vm.gen)
        if self.workload.nested_fraction and self.rng.random() < self.workload.nested_fraction:
            self.sim.at(t, self.nested_step, vm, vm.gen)

    def slice_end(self, t: int, vm: Vm, i: int, cpu: int, gen: int) -> None:
        """The slice ends: the vCPU halts (sleeps) or, if others wait, is preempted."""
        if not vm.current(gen) or not vm.running[i] or vm.cpus[i] != cpu:
            return
        if self.rng.random() < 0.5 or self.queue:
            if self.queue and self.rng.random() < 0.5:  # preempted: runnable again at once
                self.sim.emit(t, Ev.NEED_RESCHED, vm.id, i)
                self.sim.at(t + int(self.workload.resched_us * US), self.preempt, vm, i, cpu, gen)
            else:
                self.halt(t, vm, i, cpu, gen)
        else:
            self.sim.at(t + self.slice_ns(self.workload.run_ms), self.slice_end, vm, i, cpu, gen)

    def halt(self, t: int, vm: Vm, i: int, cpu: int, gen: int) -> None:
        """The guest has done its work and runs HLT: the vCPU thread sleeps. Closed loop: the
        flush time charged to it since it last halted did none of that work, so the HLT comes
        that much later. A preemption does not wait: the scheduler's slice is wall time, flush
        work included, and the debt waits for the vCPU's next HLT."""
        if not vm.current(gen) or not vm.running[i] or vm.cpus[i] != cpu:
            return  # closed loop: the vCPU was stopped while its HLT was pushed back
        if self.stint_slipped(t, vm, i, self.halt, vm, i, cpu, gen):
            return
        self.stop_vcpu(t, vm, i, PUT_HALT)
        self.sim.at(t + self.slice_ns(self.workload.sleep_ms), self.wake, vm, i, gen)

    def preempt(self, t: int, vm: Vm, i: int, cpu: int, gen: int) -> None:
        """resched_us after the scheduler set TIF_NEED_RESCHED (a wakeup or the tick), the
        vCPU thread is out of guest mode (the reschedule IPI) and schedules: a flush IPI in
        between finds need_resched, and the kicked vCPU does not re-enter (Ev.NEED_RESCHED)."""
        if vm.current(gen) and vm.running[i] and vm.cpus[i] == cpu:
            self.stop_vcpu(t, vm, i, PUT_PREEMPTED)
            self.place_vcpu(t, vm, i)

    def wake(self, t: int, vm: Vm, i: int, gen: int) -> None:
        if vm.current(gen):
            self.place_vcpu(t, vm, i)

    # -- nested guests ------------------------------------------------------------------------
    def nested_step(self, t: int, vm: Vm, gen: int) -> None:
        """A VM that runs its own guests (L2): its vCPUs enter and leave L2s, and L1
        invalidates their EPT (INVEPT) when it changes their mappings or tears them down."""
        if not vm.current(gen):
            return
        ng, sim = self.workload.nested, self.sim
        i = int(self.rng.integers(len(vm.cpus)))
        if vm.running[i]:
            key = (vm.id, i)
            if key in self.l1:
                sim.emit(t, Ev.NESTED_VMEXIT, vm.id, i)
                sim.emit(t, Ev.VM_ENTRY, vm.id, i)
                del self.l1[key]
            else:
                l2 = 1 + int(self.rng.integers(ng.l2_per_vm))
                if self.rng.random() < ng.invept_prob:
                    sim.emit(t, Ev.L1_INVEPT, vm.id, i, arg=l2 if ng.nested_ept else 0)
                if ng.nested_ept and self.rng.random() < ng.ept12_write_prob:
                    flood = ZAP_FLOOD if self.rng.random() < ng.ept12_flood_prob else 0
                    sim.emit(t, Ev.VM_EXIT, vm.id, i)  # L1's write to EPT12 traps
                    sim.emit(t, Ev.ZAP, vm.id, pcpu=vm.cpus[i], arg=l2 | flood)
                sim.emit(t, Ev.NESTED_VMENTER, vm.id, i, arg=pack_nested_vmenter(l2, ng.nested_ept))
                sim.emit(t, Ev.VM_ENTRY, vm.id, i)
                self.l1[key] = l2
        sim.at(t + sim.exp_ns(1 / ng.transitions_per_s), self.nested_step, vm, gen)

    def compiled(self) -> CompiledStream:
        w, ng = self.workload, self.workload.nested
        max_vcpus = max(w.vm_vcpus)
        pending = w.vms * (max_vcpus + self.lifecycle.boot_steps + 4)  # a first guess; the heap grows
        fields = stream_fields(self, w.vms, max_vcpus, SCHED_VCPU, N_SCHED_COUNTERS, pending)
        fields["n"][IDLE_N], fields["n"][RUNQ_HEAD], fields["n"][RUNQ_TAIL] = len(self.cpuset), -1, -1
        vcpus = fields["vcpus"]
        vcpus["last_cpu"], vcpus["runq_next"], vcpus["runq_prev"] = -1, -1, -1
        state = SchedState(
            **fields,
            idle=np.array(self.cpuset, np.int64),
            idle_pos=_idle_positions(self.cpuset),
            vmm_cpu=np.array(self.vmm_cpu, np.int64),
            vm_vcpus=np.array(w.vm_vcpus, np.int64),
            boot_s=float(self.lifecycle.boot_s),
            run_ms=float(w.run_ms),
            sleep_ms=float(w.sleep_ms),
            wake_affinity=float(w.wake_affinity),
            guest_flush_per_stint=float(w.guest_flush_per_stint),
            resched_ns=int(w.resched_us * US),
            nested_fraction=float(w.nested_fraction),
            l2_per_vm=ng.l2_per_vm,
            transitions_per_s=float(ng.transitions_per_s),
            nested_ept=bool(ng.nested_ept),
            invept_prob=float(ng.invept_prob),
            ept12_write_prob=float(ng.ept12_write_prob),
            ept12_flood_prob=float(ng.ept12_flood_prob),
        )
        return CompiledStream(state, self.rng, _start, max_vcpus, self.lifecycle)


class _IdleCpus:
    """Idle pCPUs with O(1) add, remove and uniform random pick."""

    def __init__(self, cpus: list[int]):
        self.cpus = list(cpus)
        self.pos = {c: k for k, c in enumerate(self.cpus)}

    def __len__(self) -> int:
        return len(self.cpus)

    def __contains__(self, cpu: int) -> bool:
        return cpu in self.pos

    def add(self, cpu: int) -> None:
        self.pos[cpu] = len(self.cpus)
        self.cpus.append(cpu)

    def remove(self, cpu: int) -> None:
        k = self.pos.pop(cpu)
        last = self.cpus.pop()
        if last != cpu:
            self.cpus[k] = last
            self.pos[last] = k

    def pick(self, rng: np.random.Generator) -> int:
        return self.cpus[int(rng.integers(len(self.cpus)))]


def _idle_positions(cpus: list[int]) -> np.ndarray:
    pos = np.full(max(cpus, default=0) + 1, -1, np.int64)
    pos[cpus] = np.arange(len(cpus))
    return pos


# --- the compiled twin of SharedCpuset -----------------------------------------------------------
BOOT_ONE, SLICE_END, WAKE, NESTED_STEP, PREEMPT = range(FIRST_WORKLOAD_OP, FIRST_WORKLOAD_OP + 5)
IDLE_N, RUNQ_HEAD, RUNQ_TAIL, RUNQ_LEN = range(N_COUNTERS, N_COUNTERS + 4)
N_SCHED_COUNTERS = N_COUNTERS + 4
# The run queue is a doubly linked FIFO through the vCPU records, a vCPU named by
# slot * max_vcpus + vcpu: O(1) append, remove, pop and membership, as the list's order.
SCHED_VCPU = np.dtype(
    [
        *VCPU_FIELDS,
        ("last_cpu", "<i8"),  # last_cpu[(vm id, vcpu)], -1: none yet
        ("l2", "<i8"),  # l1[(vm id, vcpu)], 0: running L1
        ("runq_next", "<i8"),
        ("runq_prev", "<i8"),
        ("queued", "?"),  # (vm, vcpu) in queue
    ],
    align=True,
)
# `idle` and `idle_pos` are _IdleCpus.cpus and .pos (-1: not idle)
SchedState = NamedTuple(
    "SchedState",
    [
        *STREAM_FIELDS,
        ("idle", np.ndarray),
        ("idle_pos", np.ndarray),
        ("vmm_cpu", np.ndarray),
        ("vm_vcpus", np.ndarray),
        ("boot_s", float),
        ("run_ms", float),
        ("sleep_ms", float),
        ("wake_affinity", float),
        ("guest_flush_per_stint", float),
        ("resched_ns", int),
        ("nested_fraction", float),
        ("l2_per_vm", int),
        ("transitions_per_s", float),
        ("nested_ept", bool),
        ("invept_prob", float),
        ("ept12_write_prob", float),
        ("ept12_flood_prob", float),
    ],
)
_PARAMS = len(STREAM_FIELDS) + 4  # where SchedState's scalar parameters begin
_pack_nested_vmenter = numba.njit(**JIT)(pack_nested_vmenter)


@implements(base.borrowed, SchedState)
def _borrowed(st):
    return SchedState(
        *base.borrowed_stream(st),
        borrow(st.idle),
        borrow(st.idle_pos),
        borrow(st.vmm_cpu),
        borrow(st.vm_vcpus),
        *st[_PARAMS:],
    )


@numba.njit(**JIT)
def _start(st, rng) -> None:
    """SharedCpuset.start."""
    for k in range(len(st.vms)):
        at(st, ns(rng.uniform(0.0, st.boot_s) * NS), BOOT_ONE, k)


@numba.njit(**JIT)
def _slice_ns(rng, mean_ms: float) -> int:
    """SharedCpuset.slice_ns."""
    return max(1, ns(rng.exponential(mean_ms) * MS))


@numba.njit(**JIT)
def _idle_add(st, cpu: int) -> None:
    """_IdleCpus.add."""
    k = st.n[IDLE_N]
    st.idle[k] = cpu
    st.idle_pos[cpu] = k
    st.n[IDLE_N] = k + 1


@numba.njit(**JIT)
def _idle_remove(st, cpu: int) -> None:
    """_IdleCpus.remove."""
    k = st.idle_pos[cpu]
    st.idle_pos[cpu] = -1
    last = st.idle[st.n[IDLE_N] - 1]
    st.n[IDLE_N] -= 1
    if last != cpu:
        st.idle[k] = last
        st.idle_pos[last] = k


@numba.njit(**JIT)
def _runq_append(st, p: int, i: int) -> None:
    """SharedCpuset.queue.append((vm, i)): vCPU i of slot p joins the tail of the run queue."""
    n, width = st.n, st.vcpus.shape[1]
    q, tail = p * width + i, n[RUNQ_TAIL]
    v = st.vcpus[p, i]
    v.queued, v.runq_next, v.runq_prev = True, -1, tail
    if tail >= 0:
        st.vcpus[tail // width, tail % width].runq_next = q
    else:
        n[RUNQ_HEAD] = q
    n[RUNQ_TAIL] = q
    n[RUNQ_LEN] += 1


@numba.njit(**JIT)
def _runq_remove(st, p: int, i: int) -> None:
    """SharedCpuset.queue.remove((vm, i)), or the pop(0) of its head."""
    n, width = st.n, st.vcpus.shape[1]
    v = st.vcpus[p, i]
    v.queued = False
    prev, nxt = v.runq_prev, v.runq_next
    if prev >= 0:
        st.vcpus[prev // width, prev % width].runq_next = nxt
    else:
        n[RUNQ_HEAD] = nxt
    if nxt >= 0:
        st.vcpus[nxt // width, nxt % width].runq_prev = prev
    else:
        n[RUNQ_TAIL] = prev
    n[RUNQ_LEN] -= 1


@numba.njit(**JIT)
def _dispatch(st, rng, t: int, cpu: int, p: int, i: int) -> None:
    """SharedCpuset.dispatch."""
    v, vm = st.vcpus[p, i], st.vms[p]
    v.last_cpu = cpu
    v.running = True
    v.cpu = cpu
    emit(st, t, Ev.VCPU_LOAD, vm.id, i, cpu)
    emit(st, t, Ev.VM_ENTRY, vm.id, i)
    if not vm.booting:
        at(st, t + _slice_ns(rng, st.run_ms), SLICE_END, p, i, cpu, vm.life)


@numba.njit(**JIT)
def _release(st, rng, t: int, cpu: int) -> None:
    """SharedCpuset.release."""
    width = st.vcpus.shape[1]
    while st.n[RUNQ_LEN] > 0:
        q = st.n[RUNQ_HEAD]
        p, i = q // width, q % width
        _runq_remove(st, p, i)
        if st.vms[p].alive:
            _dispatch(st, rng, t, cpu, p, i)
            return
    _idle_add(st, cpu)


@implements(base.place_vcpu, SchedState)
def _place_vcpu(st, rng, t, p, i):
    v = st.vcpus[p, i]
    if v.running or v.queued:
        return
    last = v.last_cpu
    if last >= 0 and st.idle_pos[last] >= 0 and rng.random() < st.wake_affinity:
        cpu = last
    elif st.n[IDLE_N] > 0:
        cpu = st.idle[rng.integers(0, st.n[IDLE_N])]
    else:
        _runq_append(st, p, i)
        return
    _idle_remove(st, cpu)
    _dispatch(st, rng, t, cpu, p, i)


@implements(base.leave_l2, SchedState)
def _leave_l2(st, rng, t, p, i):
    v = st.vcpus[p, i]
    if v.l2:
        v.l2 = 0
        emit(st, t, Ev.NESTED_VMEXIT, st.vms[p].id, i)


@implements(base.stop_vcpu, SchedState)
def _stop_vcpu(st, rng, t, p, i, reason):
    v = st.vcpus[p, i]
    if v.queued:
        _runq_remove(st, p, i)
    if v.running:
        base.end_stint(st, rng, t, p, i, reason)
        base.leave_l2(st, rng, t, p, i)
        v.running = False
        emit(st, t, Ev.VCPU_PUT, st.vms[p].id, i, -1, reason)
        _release(st, rng, t, v.cpu)


@implements(base.vcpus_running, SchedState)
def _vcpus_running(st, rng, t, p):
    vm = st.vms[p]
    for i in range(vm.vcpus):
        if st.vcpus[p, i].running:
            at(st, t + _slice_ns(rng, st.run_ms), SLICE_END, p, i, st.vcpus[p, i].cpu, vm.life)
    if st.nested_fraction != 0 and rng.random() < st.nested_fraction:
        at(st, t, NESTED_STEP, p, vm.life)


@implements(base.replace, SchedState)
def _replace(st, rng, t, p):
    at(st, t, BOOT_ONE, p)


@numba.njit(**JIT)
def _boot_one(st, rng, t: int, p: int) -> None:
    """SharedCpuset.boot_one."""
    vm = st.vms[p]
    vm.vcpus = st.vm_vcpus[rng.integers(0, len(st.vm_vcpus))]
    node = rng.integers(0, len(st.vmm_cpu))
    vm.node, vm.hk = node, st.vmm_cpu[node]
    for i in range(st.vcpus.shape[1]):  # a new VM: none of its vCPUs has run anywhere or is in L2
        v = st.vcpus[p, i]
        v.cpu, v.last_cpu, v.l2 = -1, -1, 0
    base.boot(st, rng, t, p)


@numba.njit(**INLINE)
def _slice_end(st, rng, t: int, p: int, i: int, cpu: int, life: int) -> None:
    """SharedCpuset.slice_end."""
    v = st.vcpus[p, i]
    if not current(st, p, life) or not v.running or v.cpu != cpu:
        return
    if rng.random() < 0.5 or st.n[RUNQ_LEN] > 0:
        if st.n[RUNQ_LEN] > 0 and rng.random() < 0.5:
            emit(st, t, Ev.NEED_RESCHED, st.vms[p].id, i)
            at(st, t + st.resched_ns, PREEMPT, p, i, cpu, life)
        else:
            base.stop_vcpu(st, rng, t, p, i, PUT_HALT)
            at(st, t + _slice_ns(rng, st.sleep_ms), WAKE, p, i, life)
    else:
        at(st, t + _slice_ns(rng, st.run_ms), SLICE_END, p, i, cpu, life)


@numba.njit(**INLINE)
def _preempt(st, rng, t: int, p: int, i: int, cpu: int, life: int) -> None:
    """SharedCpuset.preempt."""
    v = st.vcpus[p, i]
    if current(st, p, life) and v.running and v.cpu == cpu:
        base.stop_vcpu(st, rng, t, p, i, PUT_PREEMPTED)
        base.place_vcpu(st, rng, t, p, i)


@numba.njit(**INLINE)
def _wake(st, rng, t: int, p: int, i: int, life: int) -> None:
    """SharedCpuset.wake."""
    if current(st, p, life):
        base.place_vcpu(st, rng, t, p, i)


@numba.njit(**INLINE)
def _nested_step(st, rng, t: int, p: int, life: int) -> None:
    """SharedCpuset.nested_step."""
    if not current(st, p, life):
        return
    vm = st.vms[p].id
    i = rng.integers(0, st.vms[p].vcpus)
    v = st.vcpus[p, i]
    if v.running:
        if v.l2:
            emit(st, t, Ev.NESTED_VMEXIT, vm, i)
            emit(st, t, Ev.VM_ENTRY, vm, i)
            v.l2 = 0
        else:
            l2 = 1 + rng.integers(0, st.l2_per_vm)
            if rng.random() < st.invept_prob:
                emit(st, t, Ev.L1_INVEPT, vm, i, -1, l2 if st.nested_ept else 0)
            if st.nested_ept and rng.random() < st.ept12_write_prob:
                flood = ZAP_FLOOD if rng.random() < st.ept12_flood_prob else 0
                emit(st, t, Ev.VM_EXIT, vm, i)  # L1's write to EPT12 traps
                emit(st, t, Ev.ZAP, vm, -1, v.cpu, l2 | flood)
            emit(st, t, Ev.NESTED_VMENTER, vm, i, -1, _pack_nested_vmenter(l2, st.nested_ept))
            emit(st, t, Ev.VM_ENTRY, vm, i)
            v.l2 = l2
    at(st, t + exp_ns(rng, 1 / st.transitions_per_s), NESTED_STEP, p, life)


# on_callback and the callbacks it dispatches to are inlined into run_until's loop
@implements(base.on_callback, SchedState, inline="always")
def _on_callback(st, rng, t, op, a, b, c, d):
    if op == BOOT_ONE:
        _boot_one(st, rng, t, a)
    elif op == SLICE_END:  # (slot, vcpu, pCPU, life)
        _slice_end(st, rng, t, a, b, c, d)
    elif op == WAKE:  # (slot, vcpu, life)
        _wake(st, rng, t, a, b, c)
    elif op == NESTED_STEP:  # (slot, life)
        _nested_step(st, rng, t, a, b)
    elif op == PREEMPT:  # (slot, vcpu, pCPU, life)
        _preempt(st, rng, t, a, b, c, d)
