"""Deterministic trace generators: who runs where and when, and what KVM is asked to do.

Each generator is a small discrete-event simulation of the *host's* behaviour (VM lifecycle,
the scheduler, mmu-notifier zaps, firmware SMM, nested guests); it never looks at KVM's flush
state, so the trace depends on the workload parameters and the seed only (open loop). Events
come out in time order, in chunks, so a long trace for a big host never sits in memory whole.
Every parameter is documented, with its unit, in conf/workload/*.yaml.
"""

from __future__ import annotations

import heapq
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from hvmodel.errors import ConfigError
from hvmodel.host import Topology
from hvmodel.trace import EVENT_DTYPE, Ev, Trace, TraceError, load, pack_nested_vmenter, pack_vm_create

NS = 1_000_000_000
US = 1_000


class _Sim:
    """A heap of callbacks; each emits events at its own time, so output is time-sorted."""

    def __init__(self, rng: np.random.Generator, duration_ns: int, chunk: int):
        self.rng, self.duration_ns, self.chunk = rng, duration_ns, chunk
        self.heap: list = []
        self.seq = 0
        self.buf: list[tuple] = []

    def at(self, t: int, fn: Callable, *args) -> None:
        if t < self.duration_ns:
            heapq.heappush(self.heap, (int(t), self.seq, fn, args))
            self.seq += 1

    def emit(self, t: int, kind: Ev, vm: int = -1, vcpu: int = -1, pcpu: int = -1, arg: int = 0) -> None:
        self.buf.append((t, int(kind), vm, vcpu, pcpu, arg))

    def exp_ns(self, mean_s: float) -> int:
        return max(1, int(self.rng.exponential(mean_s) * NS))

    def run(self) -> Iterator[np.ndarray]:
        while self.heap:
            t, _, fn, args = heapq.heappop(self.heap)
            fn(t, *args)
            if len(self.buf) >= self.chunk:
                yield np.array(self.buf, dtype=EVENT_DTYPE)
                self.buf = []
        if self.buf:
            yield np.array(self.buf, dtype=EVENT_DTYPE)
            self.buf = []


def _positive(key: str, value: float, allow_zero: bool = True) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"workload.{key}", f"must be {'>=' if allow_zero else '>'} 0, got {value}")


@dataclass(frozen=True)
class VmLifecycle:
    """Boot, reboot and teardown parameters shared by the generators."""

    tdp_level: int = 4  # 4, or 5 for guests with MAXPHYADDR > 48 on a 5-level EPT host
    boot_smm_transitions: int = 4  # SMM enter/exit pairs by the firmware during boot (OVMF)
    boot_memslot_deletes: int = 2  # memslot deletes/moves during boot (PCI BAR mapping)
    boot_s: float = 0.2  # boot phase length, s
    zap_per_s: float = 1.0  # mmu-notifier zaps per VM per s (THP/NUMA migration, reclaim)
    lifetime_s: float = 30.0  # mean VM lifetime before it reboots or is replaced, s
    reboot_fraction: float = 0.5  # share of lifetime ends that are a guest reboot (same VM)
    respawn_s: float = 0.05  # gap between destroying a VM and creating its replacement, s

    def validate(self) -> None:
        if self.tdp_level not in (4, 5):
            raise ConfigError("workload.lifecycle.tdp_level", f"must be 4 or 5, got {self.tdp_level}")
        for key in ("boot_smm_transitions", "boot_memslot_deletes", "boot_s", "zap_per_s", "respawn_s"):
            _positive(f"lifecycle.{key}", getattr(self, key))
        _positive("lifecycle.lifetime_s", self.lifetime_s, allow_zero=False)
        if not 0 <= self.reboot_fraction <= 1:
            raise ConfigError("workload.lifecycle.reboot_fraction", f"must be in [0, 1], got {self.reboot_fraction}")


class _Vm:
    __slots__ = ("id", "node", "hk", "cpus", "alive", "running", "booting", "gen")

    def __init__(self, vm_id: int, node: int, hk: int, cpus: list[int]):
        self.id, self.node, self.hk, self.cpus = vm_id, node, hk, cpus
        self.alive = True
        self.running = [False] * len(cpus)  # loaded (between vcpu_load and vcpu_put)
        self.booting = True
        self.gen = 0  # bumped at each (re)boot: callbacks of an earlier boot are dropped

    def current(self, gen: int) -> bool:
        return self.alive and not self.booting and gen == self.gen


class _Host:
    """What the generators need to know about the host."""

    def __init__(self, topo: Topology):
        self.topo = topo
        rt = topo.rt_mask()
        node = topo.node_of()
        self.isolated = [np.flatnonzero(rt & (node == n)).tolist() for n in range(topo.numa_nodes)]
        self.housekeeping = [np.flatnonzero(~rt & (node == n)).tolist() for n in range(topo.numa_nodes)]
        # a node with no housekeeping CPU borrows CPU 0's node's first one
        fallback = next((h[0] for h in self.housekeeping if h), 0)
        self.vmm_cpu = [h[0] if h else fallback for h in self.housekeeping]


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


class Workload:
    """Base: a generator of traces for a host and a seed."""

    name = "workload"

    def __init__(self, duration_s: float = 2.0, chunk_events: int = 1 << 16):
        _positive("duration_s", duration_s, allow_zero=False)
        self.duration_s = duration_s
        self.duration_ns: int | None = int(duration_s * NS)  # None when only the trace knows
        self.chunk_events = chunk_events

    def trace(self, topo: Topology, seed: int) -> Trace:
        duration_ns = self.duration_ns

        def chunks() -> Iterator[np.ndarray]:
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(sum(map(ord, self.name)),)))
            sim = _Sim(rng, duration_ns, self.chunk_events)
            self.start(sim, _Host(topo))
            return sim.run()

        return Trace(chunks, duration_ns, {"workload": self.name, "seed": seed, "host": topo.name})

    def start(self, sim: _Sim, host: _Host) -> None:
        raise NotImplementedError

    def check(self, topo: Topology) -> None:
        """Raise ConfigError if this workload cannot run on `topo` (before any trace is made)."""


class _VmFleet(Workload):
    """VMs with a boot / run / reboot-or-replace lifecycle; subclasses decide placement and
    how vCPUs are scheduled once booted."""

    def __init__(self, duration_s: float = 2.0, lifecycle: dict | None = None, chunk_events: int = 1 << 16):
        super().__init__(duration_s, chunk_events)
        self.lifecycle = VmLifecycle(**(lifecycle or {}))
        self.lifecycle.validate()
        self.next_vm = 1

    # -- lifecycle ------------------------------------------------------------------------
    def boot(self, t: int, sim: _Sim, slot, node: int, hk: int, cpus: list[int]) -> None:
        lc = self.lifecycle
        vm = _Vm(self.next_vm, node, hk, cpus)
        self.next_vm += 1
        sim.emit(t, Ev.VM_CREATE, vm.id, pcpu=hk, arg=pack_vm_create(len(cpus), lc.tdp_level, node))
        self.start_life(t, sim, vm, slot)
        if lc.zap_per_s > 0:
            sim.at(t + sim.exp_ns(1 / lc.zap_per_s), self.zap, sim, vm)

    def start_life(self, t: int, sim: _Sim, vm: _Vm, slot) -> None:
        """(Re)boot: the firmware runs, the other vCPUs come up, and a lifetime starts."""
        self.firmware(t, sim, vm)
        sim.at(t + int(self.lifecycle.boot_s * NS), self.booted, sim, vm, slot)
        sim.at(t + sim.exp_ns(self.lifecycle.lifetime_s), self.end_of_life, sim, vm, slot)

    def firmware(self, t: int, sim: _Sim, vm: _Vm) -> None:
        """Boot: vCPU 0 runs the firmware (SMM transitions), the VMM remaps memslots."""
        lc = self.lifecycle
        vm.booting = True
        vm.gen += 1
        self.place_vcpu(t, sim, vm, 0)
        n = lc.boot_smm_transitions + lc.boot_memslot_deletes
        step = int(lc.boot_s * NS) // (n + 1)
        order = ["smm"] * lc.boot_smm_transitions + ["memslot"] * lc.boot_memslot_deletes
        sim.rng.shuffle(order)
        for k, what in enumerate(order, 1):
            sim.at(t + k * step, self.boot_step, sim, vm, what)

    def boot_step(self, t: int, sim: _Sim, vm: _Vm, what: str) -> None:
        if not vm.alive:
            return
        if what == "memslot":
            sim.emit(t, Ev.MEMSLOT_DELETE, vm.id, pcpu=vm.hk)
        elif vm.running[0]:
            self.leave_l2(t, sim, vm, 0)
            for kind in (Ev.SMM_ENTER, Ev.VM_ENTRY, Ev.SMM_EXIT, Ev.VM_ENTRY):
                sim.emit(t, kind, vm.id, 0)

    def booted(self, t: int, sim: _Sim, vm: _Vm, slot) -> None:
        if not vm.alive:
            return
        vm.booting = False
        for i in range(1, len(vm.cpus)):  # secondary vCPUs come up after the firmware (INIT-SIPI)
            self.place_vcpu(t, sim, vm, i)
        self.vcpus_running(t, sim, vm)

    def zap(self, t: int, sim: _Sim, vm: _Vm) -> None:
        if vm.alive:
            sim.emit(t, Ev.ZAP, vm.id, pcpu=vm.hk)
            sim.at(t + sim.exp_ns(1 / self.lifecycle.zap_per_s), self.zap, sim, vm)

    def end_of_life(self, t: int, sim: _Sim, vm: _Vm, slot) -> None:
        if not vm.alive:
            return
        lc = self.lifecycle
        if sim.rng.random() < lc.reboot_fraction:  # guest reboot: firmware again, same VM
            for i in range(1, len(vm.cpus)):
                self.stop_vcpu(t, sim, vm, i)
            self.start_life(t, sim, vm, slot)
            return
        for i in range(len(vm.cpus)):
            self.stop_vcpu(t, sim, vm, i)
        vm.alive = False
        sim.emit(t, Ev.VM_DESTROY, vm.id, pcpu=vm.hk)
        self.replace(t + int(lc.respawn_s * NS), sim, vm, slot)

    # -- scheduling hooks -----------------------------------------------------------------
    def place_vcpu(self, t: int, sim: _Sim, vm: _Vm, i: int) -> None:
        raise NotImplementedError

    def stop_vcpu(self, t: int, sim: _Sim, vm: _Vm, i: int) -> None:
        raise NotImplementedError

    def vcpus_running(self, t: int, sim: _Sim, vm: _Vm) -> None:
        """All vCPUs are up: start their run/halt behaviour."""

    def leave_l2(self, t: int, sim: _Sim, vm: _Vm, i: int) -> None:
        """Before a firmware reboot step: the vCPU returns to L1 if it was running an L2."""

    def replace(self, t: int, sim: _Sim, vm: _Vm, slot) -> None:
        raise NotImplementedError


class PartitionedPinned(_VmFleet):
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
        halt_per_s: float = 50.0,
        halt_us: float = 500.0,
        lifecycle: dict | None = None,
        chunk_events: int = 1 << 16,
    ):
        super().__init__(duration_s, lifecycle, chunk_events)
        if not vm_vcpus or any(not 1 <= n <= 1024 for n in vm_vcpus):
            raise ConfigError("workload.vm_vcpus", f"each VM size must be in 1..1024, got {list(vm_vcpus)}")
        if not 0 < fill <= 1:
            raise ConfigError("workload.fill", f"must be in (0, 1], got {fill}")
        _positive("halt_per_s", halt_per_s)
        _positive("halt_us", halt_us)
        self.vm_vcpus, self.fill, self.halt_per_s, self.halt_us = tuple(vm_vcpus), fill, halt_per_s, halt_us

    def check(self, topo: Topology) -> None:
        per_node = max(len(c) for c in _Host(topo).isolated)
        if max(self.vm_vcpus) > per_node:
            raise ConfigError(
                "workload.vm_vcpus",
                f"a pinned VM of {max(self.vm_vcpus)} vCPUs does not fit in the {per_node} isolated CPUs"
                f" of a NUMA node of host {topo.name or topo.nr_cpus}",
            )

    def partitions(self, sim: _Sim, host: _Host) -> list[tuple[int, list[int]]]:
        """Split each node's isolated CPUs into VM-sized partitions: (node, cpus)."""
        parts = []
        for node, cpus in enumerate(host.isolated):
            usable = cpus[: int(len(cpus) * self.fill)]
            k = 0
            while k < len(usable):
                fits = [n for n in self.vm_vcpus if n <= len(usable) - k]
                if not fits:
                    break
                n = int(sim.rng.choice(fits))
                parts.append((node, usable[k : k + n]))
                k += n
        return parts

    def start(self, sim: _Sim, host: _Host) -> None:
        self.start_partitions(sim, host, self.partitions(sim, host))

    def start_partitions(self, sim: _Sim, host: _Host, parts: list[tuple[int, list[int]]]) -> None:
        self.next_vm = 1
        for node, cpus in parts:
            start = int(sim.rng.uniform(0, self.lifecycle.boot_s) * NS)  # boots are staggered
            sim.at(start, self.boot, sim, (node, cpus), node, host.vmm_cpu[node], cpus)

    def place_vcpu(self, t, sim, vm, i):
        if not vm.running[i]:
            vm.running[i] = True
            sim.emit(t, Ev.VCPU_LOAD, vm.id, i, vm.cpus[i])
            sim.emit(t, Ev.VM_ENTRY, vm.id, i)

    def stop_vcpu(self, t, sim, vm, i):
        if vm.running[i]:
            vm.running[i] = False
            sim.emit(t, Ev.VCPU_PUT, vm.id, i)

    def vcpus_running(self, t, sim, vm):
        if self.halt_per_s > 0:
            for i in range(len(vm.cpus)):
                sim.at(t + sim.exp_ns(1 / self.halt_per_s), self.halt, sim, vm, i, vm.gen)

    def halt(self, t, sim, vm, i, gen):
        """HLT: the vCPU thread blocks (vcpu_put) and wakes later on its own pCPU."""
        if vm.current(gen) and vm.running[i]:
            self.stop_vcpu(t, sim, vm, i)
            sim.at(t + max(1, int(sim.rng.exponential(self.halt_us) * US)), self.wake, sim, vm, i, gen)

    def wake(self, t, sim, vm, i, gen):
        if vm.current(gen) and not vm.running[i]:
            self.place_vcpu(t, sim, vm, i)
            sim.at(t + sim.exp_ns(1 / self.halt_per_s), self.halt, sim, vm, i, gen)

    def replace(self, t, sim, vm, slot):
        node, cpus = slot
        sim.at(t, self.boot, sim, slot, node, vm.hk, cpus)


class Overcommit(_VmFleet):
    """Unpinned VMs on a shared cpuset: more vCPUs than pCPUs, and the host scheduler runs each
    vCPU for a slice wherever a pCPU is free, so vCPUs migrate. A waking vCPU goes back to its
    last pCPU if that is idle (wake affinity), else to any idle pCPU, else it queues."""

    name = "overcommit"

    def __init__(
        self,
        duration_s: float = 2.0,
        cpuset: str = "isolated",
        vms: int = 8,
        vm_vcpus: tuple[int, ...] = (2, 4),
        run_ms: float = 4.0,
        sleep_ms: float = 2.0,
        wake_affinity: float = 0.5,
        nested_fraction: float = 0.0,
        nested: dict | None = None,
        lifecycle: dict | None = None,
        chunk_events: int = 1 << 16,
    ):
        super().__init__(duration_s, lifecycle, chunk_events)
        if cpuset not in ("isolated", "housekeeping", "all"):
            raise ConfigError("workload.cpuset", f"unknown {cpuset!r}; allowed: isolated, housekeeping, all")
        if vms < 1:
            raise ConfigError("workload.vms", f"must be >= 1, got {vms}")
        if not vm_vcpus or any(n < 1 for n in vm_vcpus):
            raise ConfigError("workload.vm_vcpus", f"each VM size must be >= 1, got {list(vm_vcpus)}")
        _positive("run_ms", run_ms, allow_zero=False)
        _positive("sleep_ms", sleep_ms, allow_zero=False)
        for key, v in (("wake_affinity", wake_affinity), ("nested_fraction", nested_fraction)):
            if not 0 <= v <= 1:
                raise ConfigError(f"workload.{key}", f"must be in [0, 1], got {v}")
        self.cpuset, self.vms, self.vm_vcpus = cpuset, vms, tuple(vm_vcpus)
        self.run_ms, self.sleep_ms, self.wake_affinity = run_ms, sleep_ms, wake_affinity
        self.nested_fraction = nested_fraction
        self.nested = NestedGuests(**(nested or {}))

    def check(self, topo: Topology) -> None:
        if not self.pool(_Host(topo)):
            raise ConfigError("workload.cpuset", f"host {topo.name or topo.nr_cpus} has no {self.cpuset} CPUs besides the VMM CPUs")

    def pool(self, host: _Host) -> list[int]:
        """The cpuset, minus each node's VMM CPU (it runs the VMM and kernel threads that
        issue zaps and memslot changes, so no vCPU may be in guest mode there)."""
        iso = [c for cpus in host.isolated for c in cpus]
        hk = [c for cpus in host.housekeeping for c in cpus]
        cpus = {"isolated": iso, "housekeeping": hk, "all": iso + hk}[self.cpuset]
        return sorted(set(cpus) - set(host.vmm_cpu))

    def start(self, sim: _Sim, host: _Host) -> None:
        self.start_on(sim, host, self.pool(host), first_vm=1)

    def start_on(self, sim: _Sim, host: _Host, cpus: list[int], first_vm: int) -> None:
        """Run this fleet on `cpus`, numbering its VMs from `first_vm`."""
        self.next_vm = first_vm
        self.nodes = host.topo.numa_nodes
        self.vmm_cpu = host.vmm_cpu
        self.idle = _IdleCpus(cpus)
        self.queue: list = []  # runnable (vm, vcpu) waiting for a pCPU, FIFO
        self.last_cpu: dict[tuple, int] = {}
        self.l1: dict[tuple, int] = {}  # (vm id, vcpu) -> L2 it is running, for nested VMs
        for k in range(self.vms):
            sim.at(int(sim.rng.uniform(0, self.lifecycle.boot_s) * NS), self.boot_one, sim, k)

    def boot_one(self, t, sim, slot):
        n = int(sim.rng.choice(self.vm_vcpus))
        node = int(sim.rng.integers(self.nodes))
        self.boot(t, sim, slot, node, self.vmm_cpu[node], [-1] * n)

    def replace(self, t, sim, vm, slot):
        sim.at(t, self.boot_one, sim, slot)

    def slice_ns(self, sim: _Sim, mean_ms: float) -> int:
        return max(1, int(sim.rng.exponential(mean_ms) * 1_000_000))

    # -- the scheduler ----------------------------------------------------------------------
    def place_vcpu(self, t, sim, vm, i):
        """The vCPU becomes runnable: last pCPU if idle (wake affinity), any idle one, or queue."""
        if vm.running[i] or (vm, i) in self.queue:
            return
        last = self.last_cpu.get((vm.id, i), -1)
        if last in self.idle and sim.rng.random() < self.wake_affinity:
            cpu = last
        elif len(self.idle):
            cpu = self.idle.pick(sim.rng)
        else:
            self.queue.append((vm, i))
            return
        self.idle.remove(cpu)
        self.dispatch(t, sim, cpu, vm, i)

    def dispatch(self, t, sim, cpu, vm, i):
        self.last_cpu[(vm.id, i)] = cpu
        vm.running[i] = True
        vm.cpus[i] = cpu
        sim.emit(t, Ev.VCPU_LOAD, vm.id, i, cpu)
        sim.emit(t, Ev.VM_ENTRY, vm.id, i)
        if not vm.booting:
            sim.at(t + self.slice_ns(sim, self.run_ms), self.slice_end, sim, vm, i, cpu, vm.gen)

    def release(self, t, sim, cpu):
        while self.queue:
            vm, i = self.queue.pop(0)
            if vm.alive:
                self.dispatch(t, sim, cpu, vm, i)
                return
        self.idle.add(cpu)

    def leave_l2(self, t, sim, vm, i):
        if self.l1.pop((vm.id, i), None):
            sim.emit(t, Ev.NESTED_VMEXIT, vm.id, i)

    def stop_vcpu(self, t, sim, vm, i):
        if (vm, i) in self.queue:
            self.queue.remove((vm, i))
        if vm.running[i]:
            self.leave_l2(t, sim, vm, i)
            vm.running[i] = False
            sim.emit(t, Ev.VCPU_PUT, vm.id, i)
            self.release(t, sim, vm.cpus[i])

    def vcpus_running(self, t, sim, vm):
        for i in range(len(vm.cpus)):
            if vm.running[i]:
                sim.at(t + self.slice_ns(sim, self.run_ms), self.slice_end, sim, vm, i, vm.cpus[i], vm.gen)
        if self.nested_fraction and sim.rng.random() < self.nested_fraction:
            sim.at(t, self.nested_step, sim, vm, vm.gen)

    def slice_end(self, t, sim, vm, i, cpu, gen):
        """The slice ends: the vCPU halts (sleeps) or, if others wait, is preempted."""
        if not vm.current(gen) or not vm.running[i] or vm.cpus[i] != cpu:
            return
        if sim.rng.random() < 0.5 or self.queue:
            self.stop_vcpu(t, sim, vm, i)
            if self.queue and sim.rng.random() < 0.5:  # preempted: runnable again at once
                self.place_vcpu(t, sim, vm, i)
            else:
                sim.at(t + self.slice_ns(sim, self.sleep_ms), self.wake, sim, vm, i, gen)
        else:
            sim.at(t + self.slice_ns(sim, self.run_ms), self.slice_end, sim, vm, i, cpu, gen)

    def wake(self, t, sim, vm, i, gen):
        if vm.current(gen):
            self.place_vcpu(t, sim, vm, i)

    # -- nested guests ------------------------------------------------------------------------
    def nested_step(self, t, sim, vm, gen):
        """A VM that runs its own guests (L2): its vCPUs enter and leave L2s, and L1
        invalidates their EPT (INVEPT) when it changes their mappings or tears them down."""
        if not vm.current(gen):
            return
        ng = self.nested
        i = int(sim.rng.integers(len(vm.cpus)))
        if vm.running[i]:
            key = (vm.id, i)
            if key in self.l1:
                sim.emit(t, Ev.NESTED_VMEXIT, vm.id, i)
                sim.emit(t, Ev.VM_ENTRY, vm.id, i)
                del self.l1[key]
            else:
                l2 = 1 + int(sim.rng.integers(ng.l2_per_vm))
                if sim.rng.random() < ng.invept_prob:
                    sim.emit(t, Ev.L1_INVEPT, vm.id, i, arg=l2 if ng.nested_ept else 0)
                if ng.nested_ept and sim.rng.random() < ng.ept12_write_prob:
                    sim.emit(t, Ev.VM_EXIT, vm.id, i)  # L1's write to EPT12 traps
                    sim.emit(t, Ev.ZAP, vm.id, pcpu=vm.cpus[i], arg=l2)
                sim.emit(t, Ev.NESTED_VMENTER, vm.id, i, arg=pack_nested_vmenter(l2, ng.nested_ept))
                sim.emit(t, Ev.VM_ENTRY, vm.id, i)
                self.l1[key] = l2
        sim.at(t + sim.exp_ns(1 / ng.transitions_per_s), self.nested_step, sim, vm, gen)


class RtMixed(Workload):
    """Pinned RT VMs beside overcommitted best-effort VMs on the same host: RT partitions are
    pinned on the isolated CPUs (as partitioned_pinned, `rt.fill` of them), best-effort VMs
    float over every other CPU: the housekeeping ones and the isolated ones the RT side left
    free (as overcommit; size that side with host.housekeeping_per_node or rt.fill). The RT
    CPUs then see whatever the best-effort side's flushes send them."""

    name = "rt_mixed"

    def __init__(self, duration_s: float = 2.0, rt: dict | None = None, best_effort: dict | None = None, chunk_events: int = 1 << 16):
        super().__init__(duration_s, chunk_events)
        self.rt = PartitionedPinned(duration_s, chunk_events=chunk_events, **_part(rt, PartitionedPinned, "rt", None))
        self.best_effort = Overcommit(duration_s, chunk_events=chunk_events, **_part(best_effort, Overcommit, "best_effort", "cpuset"))

    def check(self, topo: Topology) -> None:
        self.rt.check(topo)
        host = _Host(topo)
        spare = sum(len(h) for h in host.housekeeping) - len(set(host.vmm_cpu))
        if spare <= 0 and self.rt.fill == 1:
            raise ConfigError(
                "workload.rt.fill", "leaves no CPU for the best-effort VMs: lower rt.fill or raise host.housekeeping_per_node"
            )

    def start(self, sim: _Sim, host: _Host) -> None:
        parts = self.rt.partitions(sim, host)
        self.rt.start_partitions(sim, host, parts)
        taken = {c for _, cpus in parts for c in cpus} | set(host.vmm_cpu)
        free = [c for c in range(host.topo.nr_cpus) if c not in taken]
        self.best_effort.start_on(sim, host, free, first_vm=BEST_EFFORT_VM_BASE)


BEST_EFFORT_VM_BASE = 1 << 20  # rt_mixed: best-effort VM ids start here, RT VMs at 1


def _part(params: dict | None, cls: type, where: str, owned_key: str | None) -> dict:
    """Parameters of one half of rt_mixed, checked against that generator's own keys."""
    params = dict(params or {})
    allowed = [p for p in inspect.signature(cls).parameters if p not in ("duration_s", "chunk_events", owned_key)]
    for key in params:
        if key not in allowed:
            raise ConfigError(f"workload.{where}.{key}", f"unknown key; allowed: {', '.join(allowed)}")
    return params


@dataclass(frozen=True)
class NestedGuests:
    """How a VM that is itself a hypervisor (L1) runs its guests (L2)."""

    l2_per_vm: int = 4  # distinct L2 guests (EPTP12 / VPID12) each L1 switches between
    transitions_per_s: float = 200.0  # nested VM-enter + VM-exit pairs per L1 VM, per s
    nested_ept: bool = True  # L1 uses EPT for L2 (shadow-EPT roots in guest_mmu), else TDP roots
    invept_prob: float = 0.05  # chance an L2 entry follows an L1 INVEPT of that EPTP12
    ept12_write_prob: float = 0.05  # chance L1 edited that L2's EPT12 (kvm_mmu_track_write zap)

    def __post_init__(self) -> None:
        if self.l2_per_vm < 1:
            raise ConfigError("workload.nested.l2_per_vm", f"must be >= 1, got {self.l2_per_vm}")
        _positive("nested.transitions_per_s", self.transitions_per_s, allow_zero=False)


class TraceFile(Workload):
    """Replay a saved trace (binary, or the JSON Lines text format of docs/trace-format.md)."""

    name = "trace"

    def __init__(self, path: str | None = None):
        if not path:
            raise ConfigError("workload.path", "workload=trace needs workload.path=FILE")
        self.path = path
        self.duration_ns = None

    def check(self, topo: Topology) -> None:
        """Parse the file now, so a bad line is reported before anything runs."""
        self.trace(topo, 0)

    def trace(self, topo: Topology, seed: int) -> Trace:
        try:
            return load(self.path)
        except (FileNotFoundError, IsADirectoryError):
            raise ConfigError("workload.path", f"no such file: {self.path}") from None
        except TraceError as e:
            raise ConfigError("workload.path", f"{self.path}: {e}") from None
