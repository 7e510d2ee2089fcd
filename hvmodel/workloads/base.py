"""What every trace generator shares: the DES core, the VM lifecycle, the host helpers, merging.

A generator is a small discrete-event simulation (DES) of the *host's* behaviour: VM lifecycle,
the scheduler, mmu-notifier zaps, firmware SMM, nested guests. It never looks at KVM's flush
state, so a trace depends on the workload parameters and the seed only (open loop). The one
exception is `workload.closed_loop=true` (hvmodel/closed_loop.py): the reference streams then run
in lockstep with an engine, which they ask (through `VmFleet.loop`) how much flush time it
charged to a vCPU, and the trace depends on the strategy and cost model too. With `loop` None,
the default, none of that code runs and every draw and push is the open loop's.

A trace is the merge of one or more *streams*. A stream is one DES with its own heap and its own
RNG, running one fleet of VMs (`VmFleet`): one NUMA node's pinned partitions, or every VM of an
overcommitted cpuset. Events come out ordered by (time_ns, stream number), each stream keeping
its own order, so a stream's events never depend on another stream's: a shard that owns some
NUMA nodes can generate just their streams (`Workload.trace(..., nodes=)`).

Every stream exists twice, and the two must emit byte-identical events:
- the reference, readable Python (`Sim`, `VmFleet` and its subclasses): the specification;
- a numba-compiled twin (`stream_fields`, `run_until`), used by default. It makes the same RNG
  calls in the same order (numba's `np.random.Generator` shares NumPy's stream bit for bit),
  keeps the same state on preallocated arrays, and reaches the workload's own code through the
  hooks below, which each workload implements with `numba.extending.overload` for its state.
tests/test_workloads_compiled.py compares the two over many seeds and configurations.

Every parameter is documented, with its unit, in conf/workload/*.yaml.
"""

from __future__ import annotations

import functools
import heapq
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from operator import itemgetter
from typing import NamedTuple

import numba
import numpy as np
from numba.core import cgutils, types
from numba.extending import intrinsic, overload

import hvmodel.workloads.compile_cache  # noqa: F401  (sets numba's cache directory before any @njit(cache=True) below)
from hvmodel.errors import ConfigError
from hvmodel.host import Topology
from hvmodel.trace import EVENT_DTYPE, Ev, Trace, pack_vm_create

# Bump when a change alters any generated trace (same workload, host and seed, different bytes);
# recorded in Trace.meta. tests/test_generator_version.py pins the digests of version 3.
GENERATOR_VERSION = 3

NS = 1_000_000_000
US = 1_000
MS = 1_000_000
VM_ID_LIMIT = 1 << 31  # the trace's `vm` field is int32


def check_share(key: str, v: float) -> None:
    if not 0 <= v <= 1:
        raise ConfigError(f"workload.{key}", f"must be in [0, 1], got {v}")


def positive(key: str, value: float, allow_zero: bool = True) -> None:
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
            positive(f"lifecycle.{key}", getattr(self, key))
        positive("lifecycle.lifetime_s", self.lifetime_s, allow_zero=False)
        if not 0 <= self.reboot_fraction <= 1:
            raise ConfigError("workload.lifecycle.reboot_fraction", f"must be in [0, 1], got {self.reboot_fraction}")

    @property
    def boot_steps(self) -> int:
        return self.boot_smm_transitions + self.boot_memslot_deletes


class HostCpus:
    """What the generators need to know about the host, per NUMA node."""

    def __init__(self, topo: Topology):
        self.topo = topo
        rt = topo.rt_mask()
        node = topo.node_of()
        self.isolated = [np.flatnonzero(rt & (node == n)).tolist() for n in range(topo.numa_nodes)]
        self.housekeeping = [np.flatnonzero(~rt & (node == n)).tolist() for n in range(topo.numa_nodes)]
        # Each node's first housekeeping CPU runs its VMMs and the kernel threads that zap and
        # change memslots; a node with none borrows the first node's that has one.
        fallback = next((h[0] for h in self.housekeeping if h), 0)
        self.vmm_cpu = [h[0] if h else fallback for h in self.housekeeping]


# =============================================================================================
# The reference: a heapq DES of Python callbacks
# =============================================================================================
class Sim:
    """A heap of callbacks keyed (time, push order); each emits events at its own time, so the
    output is time-sorted, and callbacks due at the same time run in the order they were pushed."""

    def __init__(self, rng: np.random.Generator, duration_ns: int):
        self.rng, self.duration_ns = rng, duration_ns
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

    def events(self) -> Iterator[tuple]:
        while self.heap:
            t, _, fn, args = heapq.heappop(self.heap)
            fn(t, *args)
            yield from self.buf
            self.buf.clear()


class Vm:
    __slots__ = ("id", "node", "hk", "cpus", "alive", "running", "booting", "gen", "lag", "boot_t")

    def __init__(self, vm_id: int, node: int, hk: int, cpus: list[int]):
        self.id, self.node, self.hk, self.cpus = vm_id, node, hk, cpus
        self.alive = True
        self.running = [False] * len(cpus)  # loaded (between vcpu_load and vcpu_put)
        self.booting = True
        self.gen = 0  # bumped at each (re)boot: callbacks of an earlier boot are dropped
        # closed loop only (always 0 in the open loop): ns the VM's boot timeline has slipped
        # by vCPU 0's flush time, and when the current boot began
        self.lag = 0
        self.boot_t = 0

    def current(self, gen: int) -> bool:
        return self.alive and not self.booting and gen == self.gen


class VmFleet:
    """One stream: VMs with a boot / run / reboot-or-replace lifecycle, in one DES with one RNG.

    A *slot* is where a VM and, after it is destroyed, its replacements live (a pinned partition,
    or one of overcommit's `vms`). Subclasses place and schedule the vCPUs (the hooks at the end)
    and build the compiled twin of the stream (`compiled`).
    """

    def __init__(
        self,
        rng: np.random.Generator,
        duration_ns: int,
        lifecycle: VmLifecycle,
        first_vm: int = 1,
        vm_id_stride: int = 1,
        vm_id_limit: int = VM_ID_LIMIT,
    ):
        self.rng = rng
        self.sim = Sim(rng, duration_ns)
        self.lifecycle = lifecycle
        self.loop = None  # the closed loop (hvmodel.closed_loop.ClosedLoop) driving this stream, if any
        # VM ids: first_vm, first_vm + stride, ...; they must stay below vm_id_limit, where
        # another stream's ids (or the int32 field's end) begin.
        self.next_vm, self.vm_id_stride, self.vm_id_limit = first_vm, vm_id_stride, vm_id_limit

    def events(self) -> Iterator[tuple]:
        """Run the reference DES: the stream's events as (time_ns, kind, vm, vcpu, pcpu, arg)."""
        self.start()
        return self.sim.events()

    def start(self) -> None:
        """Push the first callbacks (the staggered first boots)."""
        raise NotImplementedError

    def compiled(self) -> CompiledStream:
        """The compiled twin of this stream, started (first callbacks pushed), drawing from the
        same RNG; use it or `events`, not both."""
        raise NotImplementedError

    # -- lifecycle ------------------------------------------------------------------------
    def boot(self, t: int, slot: int, node: int, hk: int, cpus: list[int]) -> None:
        lc, sim = self.lifecycle, self.sim
        assert self.next_vm < self.vm_id_limit, f"VM id {self.next_vm} would collide with ids from {self.vm_id_limit}"
        vm = Vm(self.next_vm, node, hk, cpus)
        self.next_vm += self.vm_id_stride
        sim.emit(t, Ev.VM_CREATE, vm.id, pcpu=hk, arg=pack_vm_create(len(cpus), lc.tdp_level, node))
        self.start_life(t, vm, slot)
        if lc.zap_per_s > 0:
            sim.at(t + sim.exp_ns(1 / lc.zap_per_s), self.zap, vm)

    def start_life(self, t: int, vm: Vm, slot: int) -> None:
        """(Re)boot: the firmware runs, the other vCPUs come up, and a lifetime starts."""
        self.firmware(t, vm)
        self.sim.at(t + int(self.lifecycle.boot_s * NS), self.booted, vm, slot, vm.lag)
        self.sim.at(t + self.sim.exp_ns(self.lifecycle.lifetime_s), self.end_of_life, vm, slot, vm.lag)

    def firmware(self, t: int, vm: Vm) -> None:
        """Boot: vCPU 0 runs the firmware (SMM transitions), the VMM remaps memslots."""
        lc = self.lifecycle
        vm.booting = True
        vm.gen += 1
        vm.boot_t = t
        self.place_vcpu(t, vm, 0)
        step = int(lc.boot_s * NS) // (lc.boot_steps + 1)
        order = ["smm"] * lc.boot_smm_transitions + ["memslot"] * lc.boot_memslot_deletes
        self.rng.shuffle(order)
        for k, what in enumerate(order, 1):
            self.sim.at(t + k * step, self.boot_step, vm, what, vm.lag)

    def boot_step(self, t: int, vm: Vm, what: str, lag: int) -> None:
        # Only `alive` is checked: a step of an earlier boot of this VM still runs (see booted).
        if not vm.alive or self.boot_slipped(t, vm, lag, self.boot_step, vm, what):
            return
        if what == "memslot":
            self.sim.emit(t, Ev.MEMSLOT_DELETE, vm.id, pcpu=vm.hk)
        elif vm.running[0]:
            self.leave_l2(t, vm, 0)
            for kind in (Ev.SMM_ENTER, Ev.VM_ENTRY, Ev.SMM_EXIT, Ev.VM_ENTRY):
                self.sim.emit(t, kind, vm.id, 0)

    def booted(self, t: int, vm: Vm, slot: int, lag: int) -> None:
        # Only `alive` is checked, not the boot generation: when a lifetime ends (in a reboot)
        # before its boot did, that earlier boot's `booted` still brings the vCPUs up.
        if not vm.alive or self.boot_slipped(t, vm, lag, self.booted, vm, slot):
            return
        if self.loop is not None:
            self.loop.booted(t - vm.boot_t)
        vm.booting = False
        for i in range(1, len(vm.cpus)):  # secondary vCPUs come up after the firmware (INIT-SIPI)
            self.place_vcpu(t, vm, i)
        self.vcpus_running(t, vm)

    def zap(self, t: int, vm: Vm) -> None:
        if vm.alive:
            self.sim.emit(t, Ev.ZAP, vm.id, pcpu=vm.hk)
            self.sim.at(t + self.sim.exp_ns(1 / self.lifecycle.zap_per_s), self.zap, vm)

    def end_of_life(self, t: int, vm: Vm, slot: int, lag: int) -> None:
        if not vm.alive or self.boot_slipped(t, vm, lag, self.end_of_life, vm, slot):
            return
        lc = self.lifecycle
        if self.rng.random() < lc.reboot_fraction:  # guest reboot: firmware again, same VM
            for i in range(1, len(vm.cpus)):
                self.stop_vcpu(t, vm, i)
            self.start_life(t, vm, slot)
            return
        for i in range(len(vm.cpus)):
            self.stop_vcpu(t, vm, i)
        vm.alive = False
        self.sim.emit(t, Ev.VM_DESTROY, vm.id, pcpu=vm.hk)
        self.replace(t + int(lc.respawn_s * NS), vm, slot)

    # -- the closed loop (no-ops while `loop` is None) ------------------------------------
    def boot_slipped(self, t: int, vm: Vm, lag: int, fn: Callable, *args) -> bool:
        """Closed loop: the firmware's work is vCPU 0's, so the flush time charged to vCPU 0
        while the VM boots adds to the VM's lag, and every callback of this boot's timeline
        (boot steps, booted, the end of its lifetime: a sandbox's lifetime runs on from a late
        boot) comes that much later. A callback pushed when the lag was `lag` is pushed again
        at t + (vm.lag - lag); True if it was."""
        if self.loop is None:
            return False
        if vm.booting:
            vm.lag += self.loop.take_debt(vm.id, 0)
        if vm.lag <= lag:
            return False
        self.sim.at(t + vm.lag - lag, fn, *args, vm.lag)
        return True

    def stint_slipped(self, t: int, vm: Vm, i: int, fn: Callable, *args) -> bool:
        """Closed loop: a HLT (fn(t, *args)) ends the guest's work of a run stint; the flush
        time charged to the vCPU's pCPU since it last looked did none of that work, so the HLT
        comes that much later (and is asked again then: more may accrue meanwhile). True if it
        was pushed back."""
        if self.loop is None:
            return False
        delay = self.loop.take_debt(vm.id, i)
        if delay <= 0:
            return False
        self.sim.at(t + delay, fn, *args)
        return True

    # -- scheduling hooks -----------------------------------------------------------------
    def place_vcpu(self, t: int, vm: Vm, i: int) -> None:
        raise NotImplementedError

    def stop_vcpu(self, t: int, vm: Vm, i: int, reason: int = 0) -> None:
        """vcpu_put, with why (trace.PUT_REASONS: 0 for a teardown)."""
        raise NotImplementedError

    def end_stint(self, t: int, vm: Vm, i: int, reason: int, flush_share: float) -> None:
        """A run stint ends (reason: a halt or a preemption, not a teardown): with probability
        `flush_share` the guest asked for a TLB flush during it (KVM_REQ_TLB_FLUSH_GUEST: an
        INVPCID, a PV flush), written here, at the stint's end. No draw for a share of 0."""
        if reason and flush_share and self.rng.random() < flush_share:
            self.sim.emit(t, Ev.GUEST_TLB_FLUSH, vm.id, i)
            self.sim.emit(t, Ev.VM_ENTRY, vm.id, i)

    def vcpus_running(self, t: int, vm: Vm) -> None:
        """All vCPUs are up: start their run/halt behaviour."""

    def leave_l2(self, t: int, vm: Vm, i: int) -> None:
        """Before a firmware boot step: the vCPU returns to L1 if it was running an L2."""

    def replace(self, t: int, vm: Vm, slot: int) -> None:
        raise NotImplementedError


# =============================================================================================
# The compiled twin: the same DES on preallocated arrays
# =============================================================================================
# A stream's compiled state is one flat NamedTuple: STREAM_FIELDS, then the workload's own.
# numba hands it to every callback, and each array it holds costs reference counting at a call
# boundary, so a VM's fields are one record (VM_DTYPE) and a vCPU's one record (the workload's
# vCPU dtype, VCPU_FIELDS and its own), not one array per field.
JIT = {"cache": True, "nogil": True}  # never fastmath: results must be bit-identical to Python
INLINE = {**JIT, "inline": "always"}

T, SEQ, SLOT = range(3)  # the rows of `heap`
OP, A, B, C, D = range(5)  # the columns of `calls`
HEAP_N, NEXT_SEQ, OUT_N, NEXT_VM = range(4)  # counters in `n`; a workload numbers its own from N_COUNTERS
N_COUNTERS = 4
EXHAUSTED, WINDOW_DONE, NEED_ROOM = range(3)  # run_until's verdicts
BOOT_STEP, BOOTED, ZAP, END_OF_LIFE = range(1, 5)  # the lifecycle's callbacks
FIRST_WORKLOAD_OP = 8  # a workload numbers its callbacks from here
SMM_STEP, MEMSLOT_STEP = 0, 1  # the `what` of a boot step
NEVER = 1 << 62  # a float time beyond this saturates (Python's int never overflows; int64 would)

# A slot's latest VM: `id` names it (a destroyed VM's callbacks find another id, or alive False);
# `life` counts the slot's (re)boots, so (slot, life) names one boot of one VM, the compiled
# (Vm, Vm.gen).
VM_DTYPE = np.dtype(
    [("id", "<i8"), ("life", "<i8"), ("vcpus", "<i8"), ("node", "<i8"), ("hk", "<i8"), ("alive", "?"), ("booting", "?")], align=True
)
VCPU_FIELDS = [("cpu", "<i8"), ("running", "?")]  # Vm.cpus[i] (-1 before its first load), Vm.running[i]


class Lifecycle(NamedTuple):
    """VmLifecycle (times in ns) and the VM id sequence, for the compiled lifecycle."""

    vm_id_stride: int
    vm_id_limit: int
    tdp_level: int
    boot_smm_transitions: int
    boot_memslot_deletes: int
    boot_ns: int
    zap_per_s: float
    lifetime_s: float
    reboot_fraction: float
    respawn_ns: int


STREAM_FIELDS = [
    # The pending callbacks: `heap` is a binary min-heap on (T, SEQ) of (T, SEQ, SLOT) columns,
    # SLOT naming the `calls` row that holds the callback (OP, A, B, C, D); a heap entry moves
    # three words, not eight. Columns past the heap's end hold the free `calls` rows.
    ("heap", np.ndarray),  # int64 [3, capacity]
    ("calls", np.ndarray),  # int64 [capacity, 5]
    ("n", np.ndarray),  # int64: HEAP_N, NEXT_SEQ, OUT_N, NEXT_VM, then the workload's counters
    ("out", np.ndarray),  # EVENT_DTYPE: the events of the current window
    ("vms", np.ndarray),  # VM_DTYPE [slots]
    ("vcpus", np.ndarray),  # the workload's vCPU dtype [slots, max vCPUs per VM]
    ("lc", Lifecycle),
    ("duration_ns", int),
]


OUT_EVENTS = 1 << 14  # first size of a stream's output buffer


def callback_room(max_vcpus: int, lifecycle: VmLifecycle) -> int:
    """An upper bound on the heap rows one callback pushes and the events it emits: a VM's
    teardown puts each vCPU, takes it out of L2 and hands its pCPU to a queued vCPU (4 events per
    vCPU); a (re)boot pushes its boot steps."""
    return 4 * max_vcpus + lifecycle.boot_steps + 16


def stream_fields(fleet: VmFleet, slots: int, max_vcpus: int, vcpu_dtype: np.dtype, counters: int, heap_rows: int) -> dict:
    """The STREAM_FIELDS of `fleet`'s compiled twin, no VM created yet; `heap_rows` is a first
    guess at the pending callbacks. The heap and the output buffer grow when needed
    (CompiledStream.advance)."""
    lc = fleet.lifecycle
    room = callback_room(max_vcpus, lc)
    n = np.zeros(counters, np.int64)
    n[NEXT_VM] = fleet.next_vm
    vcpus = np.zeros((slots, max_vcpus), vcpu_dtype)
    vcpus["cpu"] = -1
    heap = np.zeros((3, heap_rows + room), np.int64)
    heap[SLOT] = np.arange(heap.shape[1])
    return {
        "heap": heap,
        "calls": np.zeros((heap.shape[1], 5), np.int64),
        "n": n,
        "out": np.zeros(max(OUT_EVENTS, 2 * room), EVENT_DTYPE),
        "vms": np.zeros(slots, VM_DTYPE),
        "vcpus": vcpus,
        "lc": Lifecycle(
            vm_id_stride=fleet.vm_id_stride,
            vm_id_limit=fleet.vm_id_limit,
            tdp_level=lc.tdp_level,
            boot_smm_transitions=lc.boot_smm_transitions,
            boot_memslot_deletes=lc.boot_memslot_deletes,
            boot_ns=int(lc.boot_s * NS),
            zap_per_s=float(lc.zap_per_s),
            lifetime_s=float(lc.lifetime_s),
            reboot_fraction=float(lc.reboot_fraction),
            respawn_ns=int(lc.respawn_s * NS),
        ),
        "duration_ns": fleet.sim.duration_ns,
    }


def implements(hook: Callable, state_cls: type, inline: str = "never") -> Callable:
    """Decorator: the function is the compiled `hook` for stream states of `state_cls`, as a
    VmFleet subclass's method overrides the hook of the same name. inline="always" suits a pure
    dispatch (on_callback: inlined into run_until's loop, one call less per event); numba's
    inlining of helpers that call further inlined helpers miscompiled traces here, so nothing
    deeper is inlined (tests/test_workloads_compiled.py would show it)."""

    def register(impl: Callable) -> Callable:
        @functools.wraps(impl)  # numba checks the typing function's signature against impl's
        def typer(st, *args):
            if isinstance(st, types.BaseNamedTuple) and st.instance_class is state_cls:
                return impl
            return None

        overload(hook, jit_options=JIT, inline=inline)(typer)
        return impl

    return register


_pack_vm_create = numba.njit(**JIT)(pack_vm_create)


@intrinsic
def _as_pointer(typingctx, address):
    """An integer address as a void pointer (for numba.carray)."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


@numba.njit(**JIT)
def borrow(a: np.ndarray) -> np.ndarray:
    """A view of `a` that numba does not reference-count. numba increments and decrements the
    count of every array a function receives, an atomic operation each, which at a few per
    callback doubled the cost of an event; the caller keeps the real arrays alive instead."""
    return numba.carray(_as_pointer(a.ctypes.data), a.shape, a.dtype)


def borrowed(st):
    """The state `st` with every array borrowed (see `borrow`); each workload implements it."""
    raise NotImplementedError


@numba.njit(**JIT)
def borrowed_stream(st) -> tuple:
    """The STREAM_FIELDS of `st`, its arrays borrowed: the head of a workload's `borrowed`."""
    return borrow(st.heap), borrow(st.calls), borrow(st.n), borrow(st.out), borrow(st.vms), borrow(st.vcpus), st.lc, st.duration_ns


@numba.njit(**JIT)
def ns(x: float) -> int:
    """int(x) of a non-negative float time, saturating at NEVER."""
    return np.int64(x) if x < NEVER else np.int64(NEVER)


@numba.njit(**JIT)
def exp_ns(rng, mean_s: float) -> int:
    return max(1, ns(rng.exponential(mean_s) * NS))


@numba.njit(**JIT)
def _push(heap, calls, n, duration_ns: int, t: int, op: int, a: int, b: int, c: int, d: int) -> None:
    if t >= duration_ns:
        return
    seq = n[NEXT_SEQ]
    n[NEXT_SEQ] = seq + 1
    k = n[HEAP_N]
    n[HEAP_N] = k + 1
    slot = heap[SLOT, k]  # a free calls row
    calls[slot, OP], calls[slot, A], calls[slot, B], calls[slot, C], calls[slot, D] = op, a, b, c, d
    while k > 0:  # sift up
        parent = (k - 1) >> 1
        if heap[T, parent] < t or (heap[T, parent] == t and heap[SEQ, parent] < seq):
            break
        heap[T, k], heap[SEQ, k], heap[SLOT, k] = heap[T, parent], heap[SEQ, parent], heap[SLOT, parent]
        k = parent
    heap[T, k], heap[SEQ, k], heap[SLOT, k] = t, seq, slot


@numba.njit(**INLINE)  # a leaf wrapper: the call goes to _push with three arrays, not the whole state
def at(st, t: int, op: int, a: int = 0, b: int = 0, c: int = 0, d: int = 0) -> None:
    """Sim.at: push a callback, unless it falls after the end of the trace."""
    # plain int64s: one compiled _push, not one per literal callback number or omitted argument
    i64 = np.int64
    _push(st.heap, st.calls, st.n, st.duration_ns, i64(t), i64(op), i64(a), i64(b), i64(c), i64(d))


@numba.njit(**JIT)
def _pop(heap, n) -> None:
    """Remove the root (the caller has read its callback). Floyd's way: move the hole down to a
    leaf along the smaller children (one branch-free comparison per level), then sift the last
    entry up from there; the root's calls row is parked, free, where the last entry was."""
    last = n[HEAP_N] - 1
    n[HEAP_N] = last
    freed = heap[SLOT, 0]
    k = 0
    while True:
        child = 2 * k + 1
        if child + 1 < last:
            right_first = (heap[T, child + 1] < heap[T, child]) | (
                (heap[T, child + 1] == heap[T, child]) & (heap[SEQ, child + 1] < heap[SEQ, child])
            )
            child += np.int64(right_first)
        elif child >= last:
            break
        heap[T, k], heap[SEQ, k], heap[SLOT, k] = heap[T, child], heap[SEQ, child], heap[SLOT, child]
        k = child
    t, seq, slot = heap[T, last], heap[SEQ, last], heap[SLOT, last]
    while k > 0:
        parent = (k - 1) >> 1
        if heap[T, parent] < t or (heap[T, parent] == t and heap[SEQ, parent] < seq):
            break
        heap[T, k], heap[SEQ, k], heap[SLOT, k] = heap[T, parent], heap[SEQ, parent], heap[SLOT, parent]
        k = parent
    heap[T, k], heap[SEQ, k], heap[SLOT, k] = t, seq, slot
    heap[SLOT, last] = freed


@numba.njit(**JIT)
def _emit(out, n, t: int, kind: int, vm: int, vcpu: int, pcpu: int, arg: int) -> None:
    k = n[OUT_N]
    n[OUT_N] = k + 1
    r = out[k]
    r.time_ns, r.kind, r.vm, r.vcpu, r.pcpu, r.arg = t, kind, vm, vcpu, pcpu, arg


@numba.njit(**INLINE)  # as `at`
def emit(st, t: int, kind: int, vm: int, vcpu: int = -1, pcpu: int = -1, arg: int = 0) -> None:
    """Sim.emit."""
    i64 = np.int64
    _emit(st.out, st.n, i64(t), i64(kind), i64(vm), i64(vcpu), i64(pcpu), i64(arg))


# -- hooks: each workload implements them for its state type (see `implements`) -------------
def place_vcpu(st, rng, t, p, i):
    """VmFleet.place_vcpu for vCPU i of slot p's VM."""
    raise NotImplementedError


def stop_vcpu(st, rng, t, p, i, reason):
    """VmFleet.stop_vcpu."""
    raise NotImplementedError


def vcpus_running(st, rng, t, p):
    """VmFleet.vcpus_running."""
    raise NotImplementedError


def leave_l2(st, rng, t, p, i):
    """VmFleet.leave_l2."""
    raise NotImplementedError


def replace(st, rng, t, p):
    """VmFleet.replace: the slot's VM was destroyed; schedule its replacement at t."""
    raise NotImplementedError


def on_callback(st, rng, t, op, a, b, c, d):
    """Run a workload callback (op >= FIRST_WORKLOAD_OP) popped at time t."""
    raise NotImplementedError


@numba.njit(**JIT)
def end_stint(st, rng, t: int, p: int, i: int, reason: int) -> None:
    """VmFleet.end_stint, with the stream state's `guest_flush_per_stint`."""
    if reason != 0 and st.guest_flush_per_stint != 0 and rng.random() < st.guest_flush_per_stint:
        emit(st, t, Ev.GUEST_TLB_FLUSH, st.vms[p].id, i)
        emit(st, t, Ev.VM_ENTRY, st.vms[p].id, i)


# -- the lifecycle, compiled (VmFleet's methods of the same names) ---------------------------
@numba.njit(**JIT)
def alive(st, p: int, vm: int) -> bool:
    """`vm.alive` for VM `vm` of slot p."""
    return st.vms[p].alive and st.vms[p].id == vm


@numba.njit(**JIT)
def current(st, p: int, life: int) -> bool:
    """`vm.current(gen)` for boot `life` of slot p."""
    v = st.vms[p]
    return v.alive and not v.booting and v.life == life


@numba.njit(**JIT)
def boot(st, rng, t: int, p: int) -> None:
    """VmFleet.boot of a new VM on slot p; the caller has set the slot's vcpus, node and hk."""
    v, lc = st.vms[p], st.lc
    vm = st.n[NEXT_VM]
    assert vm < lc.vm_id_limit, "VM ids would collide with another stream's"
    st.n[NEXT_VM] = vm + lc.vm_id_stride
    v.id = vm
    v.alive = True
    for i in range(st.vcpus.shape[1]):
        st.vcpus[p, i].running = False
    emit(st, t, Ev.VM_CREATE, vm, -1, v.hk, _pack_vm_create(v.vcpus, lc.tdp_level, v.node))
    start_life(st, rng, t, p)
    if lc.zap_per_s > 0:
        at(st, t + exp_ns(rng, 1 / lc.zap_per_s), ZAP, p, vm)


@numba.njit(**JIT)
def start_life(st, rng, t: int, p: int) -> None:
    firmware(st, rng, t, p)
    at(st, t + st.lc.boot_ns, BOOTED, p, st.vms[p].id)
    at(st, t + exp_ns(rng, st.lc.lifetime_s), END_OF_LIFE, p, st.vms[p].id)


@numba.njit(**JIT)
def firmware(st, rng, t: int, p: int) -> None:
    v, lc = st.vms[p], st.lc
    v.booting = True
    v.life += 1
    place_vcpu(st, rng, t, p, 0)
    n = lc.boot_smm_transitions + lc.boot_memslot_deletes
    step = lc.boot_ns // (n + 1)
    order = np.full(n, MEMSLOT_STEP, np.int64)
    order[: lc.boot_smm_transitions] = SMM_STEP
    rng.shuffle(order)
    for k in range(n):
        at(st, t + (k + 1) * step, BOOT_STEP, p, v.id, order[k])


@numba.njit(**JIT)
def boot_step(st, rng, t: int, p: int, vm: int, what: int) -> None:
    if not alive(st, p, vm):
        return
    if what == MEMSLOT_STEP:
        emit(st, t, Ev.MEMSLOT_DELETE, vm, -1, st.vms[p].hk)
    elif st.vcpus[p, 0].running:
        leave_l2(st, rng, t, p, 0)
        emit(st, t, Ev.SMM_ENTER, vm, 0)
        emit(st, t, Ev.VM_ENTRY, vm, 0)
        emit(st, t, Ev.SMM_EXIT, vm, 0)
        emit(st, t, Ev.VM_ENTRY, vm, 0)


@numba.njit(**JIT)
def booted(st, rng, t: int, p: int, vm: int) -> None:
    if not alive(st, p, vm):
        return
    st.vms[p].booting = False
    for i in range(1, st.vms[p].vcpus):
        place_vcpu(st, rng, t, p, i)
    vcpus_running(st, rng, t, p)


@numba.njit(**JIT)
def zap(st, rng, t: int, p: int, vm: int) -> None:
    if alive(st, p, vm):
        emit(st, t, Ev.ZAP, vm, -1, st.vms[p].hk)
        at(st, t + exp_ns(rng, 1 / st.lc.zap_per_s), ZAP, p, vm)


@numba.njit(**JIT)
def end_of_life(st, rng, t: int, p: int, vm: int) -> None:
    if not alive(st, p, vm):
        return
    v = st.vms[p]
    if rng.random() < st.lc.reboot_fraction:
        for i in range(1, v.vcpus):
            stop_vcpu(st, rng, t, p, i, 0)
        start_life(st, rng, t, p)
        return
    for i in range(v.vcpus):
        stop_vcpu(st, rng, t, p, i, 0)
    v.alive = False
    emit(st, t, Ev.VM_DESTROY, vm, -1, v.hk)
    replace(st, rng, t + st.lc.respawn_ns, p)


@numba.njit(**JIT)
def run_until(st, rng, t_end: int, room: int) -> int:
    """Sim.events, compiled: run the callbacks due before t_end. Stops early (NEED_ROOM) when
    the heap or the output buffer has fewer than `room` free rows (callback_room)."""
    return _run_until(borrowed(st), rng, t_end, room)


@numba.njit(**JIT)
def _run_until(st, rng, t_end: int, room: int) -> int:
    heap, calls, n = st.heap, st.calls, st.n
    while n[HEAP_N] > 0:
        if heap[T, 0] >= t_end:
            return WINDOW_DONE
        if n[HEAP_N] + room > heap.shape[1] or n[OUT_N] + room > st.out.shape[0]:
            return NEED_ROOM
        t, slot = heap[T, 0], heap[SLOT, 0]
        op, a, b, c, d = calls[slot, OP], calls[slot, A], calls[slot, B], calls[slot, C], calls[slot, D]
        _pop(heap, n)
        if op == BOOT_STEP:
            boot_step(st, rng, t, a, b, c)
        elif op == BOOTED:
            booted(st, rng, t, a, b)
        elif op == ZAP:
            zap(st, rng, t, a, b)
        elif op == END_OF_LIFE:
            end_of_life(st, rng, t, a, b)
        else:
            on_callback(st, rng, t, op, a, b, c, d)
    return EXHAUSTED


class CompiledStream:
    """Drives one compiled stream: `state` is the workload's NamedTuple (STREAM_FIELDS first),
    `start` its compiled VmFleet.start."""

    def __init__(self, state: NamedTuple, rng: np.random.Generator, start: Callable, max_vcpus: int, lifecycle: VmLifecycle):
        self.state, self.rng, self.room = state, rng, callback_room(max_vcpus, lifecycle)
        start(state, rng)

    def advance(self, t_end: int) -> np.ndarray:
        """Run every callback due before t_end. Returns their events, in order: a view of the
        output buffer, valid until the next call."""
        st = self.state
        st.n[OUT_N] = 0
        while run_until(st, self.rng, t_end, self.room) == NEED_ROOM:
            # a full heap or output buffer: double it (a window holds a bounded number of events)
            if st.n[HEAP_N] + self.room > st.heap.shape[1]:
                cap = st.heap.shape[1]
                heap = np.concatenate([st.heap, np.zeros_like(st.heap)], axis=1)
                heap[SLOT, cap:] = np.arange(cap, 2 * cap)  # the new calls rows, free
                st = st._replace(heap=heap, calls=np.concatenate([st.calls, np.zeros_like(st.calls)]))
            if st.n[OUT_N] + self.room > len(st.out):
                st = st._replace(out=np.concatenate([st.out, np.zeros_like(st.out)]))
            self.state = st
        return st.out[: st.n[OUT_N]]


# =============================================================================================
# Merging streams into one trace, in chunks
# =============================================================================================
def reference_chunks(streams: list[Iterator[tuple]], chunk_events: int) -> Iterator[np.ndarray]:
    """Merge the streams' events by (time_ns, stream): heapq.merge keeps equal keys in the order
    of its inputs. Chunks of exactly chunk_events (the last one shorter)."""
    events = heapq.merge(*streams, key=itemgetter(0)) if len(streams) > 1 else iter(streams[0] if streams else ())
    while batch := list(islice(events, chunk_events)):
        yield np.array(batch, dtype=EVENT_DTYPE)


FIRST_WINDOW_NS = 1_000_000
WINDOW_EVENTS = 1 << 16  # aim for this many events per window (at least chunk_events)


def compiled_chunks(streams: list[CompiledStream], duration_ns: int, chunk_events: int) -> Iterator[np.ndarray]:
    """Advance every stream through the same window of time, merge the window's events by
    (time_ns, stream), cut them into chunks of exactly chunk_events. A window's length adapts so
    that it holds about max(chunk_events, WINDOW_EVENTS) events: memory stays bounded."""
    target = max(chunk_events, WINDOW_EVENTS)
    left = np.empty(0, EVENT_DTYPE)  # merged events not yet in a chunk: all earlier than the window
    t, window = 0, FIRST_WINDOW_NS
    while t < duration_ns:
        t_end = min(t + window, duration_ns)
        events = merge_runs(left, [s.advance(t_end) for s in streams])
        full = len(events) - len(events) % chunk_events
        for k in range(0, full, chunk_events):
            yield events[k : k + chunk_events]
        left = events[full:]
        window = max(1, int(window * min(4.0, max(0.25, target / max(len(events) - len(left), 1)))))
        t = t_end
    if len(left):
        yield left


def merge_runs(left: np.ndarray, runs: list[np.ndarray]) -> np.ndarray:
    """`left` (events earlier than any in `runs`), then the time-sorted runs merged by
    (time_ns, run), each run keeping its own order; a new array. That is a stable sort by time of
    the concatenation: numpy's stable argsort of int64 is timsort, which finds the runs already
    sorted and only merges them (on a contiguous copy of the times: 3x faster than sorting
    packed (time, position) keys, and 6x faster than argsorting the records' strided field)."""
    # as bytes: numpy copies packed records one field at a time, 20 times slower than memcpy
    events = np.concatenate([r.view(np.uint8) for r in (left, *runs)]).view(EVENT_DTYPE)
    if sum(1 for r in runs if len(r)) < 2:
        return events
    return _gather(events, np.argsort(np.ascontiguousarray(events["time_ns"]), kind="stable"))


@numba.njit(**JIT)
def _gather(events: np.ndarray, order: np.ndarray) -> np.ndarray:
    out = np.empty(len(order), events.dtype)
    for j in range(len(order)):
        out[j] = events[order[j]]
    return out


# =============================================================================================
# The workload
# =============================================================================================
class Workload:
    """Base: a generator of traces for a host and a seed. Holds parameters only; every trace
    iteration builds its streams afresh, so a Trace can be replayed, even concurrently."""

    name = "workload"
    generates_by_node = True  # trace(nodes=) makes a node-local workload's nodes alone
    closed_loop = False  # hvmodel/closed_loop.py: the trace depends on the strategy (one shard)

    def __init__(self, duration_s: float = 2.0, chunk_events: int = 1 << 16, closed_loop: bool = False):
        positive("duration_s", duration_s, allow_zero=False)
        if chunk_events < 1:
            raise ConfigError("workload.chunk_events", f"must be >= 1, got {chunk_events}")
        if not isinstance(closed_loop, bool):
            raise ConfigError("workload.closed_loop", f"must be true or false, got {closed_loop!r}")
        self.duration_s = duration_s
        self.duration_ns: int | None = int(duration_s * NS)  # None when only the trace knows
        self.chunk_events = chunk_events
        self.closed_loop = closed_loop

    def rng(self, seed: int, *stream: int) -> np.random.Generator:
        """The RNG of one stream: keyed by the workload's name, the seed and the stream's key."""
        return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(sum(map(ord, self.name)), *stream)))

    def node_local(self, topo: Topology) -> bool:
        """True when each VM's vCPUs, VMM/kernel-thread pCPU (the pcpu of vm_create, vm_destroy,
        zap and memslot_delete) and page node lie on one NUMA node, so the trace splits by node.
        Here: trivially on a one-node host; workloads that can do better say so."""
        return topo.numa_nodes == 1

    def trace_meta(self, topo: Topology, seed: int) -> dict:
        """What a generated trace depends on (Trace.meta; a closed-loop trace adds its own)."""
        return {"workload": self.name, "seed": seed, "host": topo.name, "generator_version": GENERATOR_VERSION}

    def trace(self, topo: Topology, seed: int, nodes: Sequence[int] | None = None, reference: bool = False) -> Trace:
        """The trace on `topo` for `seed`. `nodes`: generate only the VMs of these NUMA nodes (a
        node-local workload only): the full trace filtered to them, in the same order.
        `reference`: run the Python reference instead of the compiled generator (same bytes).
        A closed-loop workload has no trace of its own: it needs the engine it runs against
        (hvmodel.closed_loop.trace)."""
        if self.closed_loop:
            raise ValueError(f"workload {self.name} has closed_loop=true: its trace comes from hvmodel.closed_loop.trace(..., engine)")
        meta = self.trace_meta(topo, seed)
        if nodes is None:
            nodes = range(topo.numa_nodes)
        else:
            if not self.node_local(topo):
                raise ValueError(f"workload {self.name} is not node-local on host {topo.name or topo.nr_cpus}: it cannot generate by node")
            if any(not 0 <= n < topo.numa_nodes for n in nodes):
                raise ValueError(f"nodes {list(nodes)} outside 0..{topo.numa_nodes - 1}")
            meta["nodes"] = sorted(set(nodes))
        nodes = sorted(set(nodes))
        host = HostCpus(topo)
        duration_ns, chunk_events = self.duration_ns, self.chunk_events

        def chunks() -> Iterator[np.ndarray]:
            streams = self.streams(host, seed, nodes)
            if reference:
                return reference_chunks([s.events() for s in streams], chunk_events)
            return compiled_chunks([s.compiled() for s in streams], duration_ns, chunk_events)

        return Trace(chunks, duration_ns, meta)

    def streams(self, host: HostCpus, seed: int, nodes: list[int]) -> list[VmFleet]:
        """The streams of the VMs of `nodes` (every node unless the workload is node-local), in
        stream order: the merge puts equal times in this order."""
        raise NotImplementedError

    def check(self, topo: Topology) -> None:
        """Raise ConfigError if this workload cannot run on `topo` (before any trace is made)."""
