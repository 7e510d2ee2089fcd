"""Random valid traces for property tests: a list of (action, parameter) pairs that hypothesis
draws and shrinks, interpreted into the events a host could produce in its current state (an
action that makes no sense there is skipped), so every generated trace replays without error."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from hvmodel.host import Topology
from hvmodel.trace import EVENT_DTYPE, MMU_RESET_REASONS, ZAP_FLOOD, Ev, Trace, pack_nested_vmenter, pack_vm_create

TOPO = Topology(nr_cpus=8, numa_nodes=2, smt=1, housekeeping_per_node=1, name="p8")
HYPERV = Topology(nr_cpus=8, numa_nodes=2, smt=1, housekeeping_per_node=1, env="hyperv", name="p8hv")
# root pages through per-vCPU caches, TDP root pages back after 5 ns (an event or so here)
CACHED = Topology(nr_cpus=8, numa_nodes=2, smt=1, housekeeping_per_node=1, page_reuse="cached", rcu_grace_ns=5, name="p8c")
CPUS = [1, 2, 3, 5, 6, 7]  # the isolated CPUs: vCPUs run here; 0 and 4 run host code
ACTIONS = st.lists(st.tuples(st.integers(0, 16), st.integers(0, 10_000)), min_size=40, max_size=250)


class _V:
    def __init__(self):
        self.cpu = None  # pCPU while loaded
        self.guest = False  # in guest mode
        self.l2 = False
        self.smm = False


def build_trace(actions: list[tuple[int, int]]) -> Trace:
    """Interpret (action, parameter) pairs into a valid trace for TOPO."""
    vms: dict[int, list[_V]] = {}
    busy: set[int] = set()
    ev: list[tuple] = []
    next_vm = 1

    def emit(kind, vm=-1, vcpu=-1, pcpu=-1, arg=0):
        ev.append((len(ev), int(kind), vm, vcpu, pcpu, arg))

    def enter(vm, i, v):
        emit(Ev.VM_ENTRY, vm, i)
        v.guest = True

    for action, p in actions:
        loaded = [(vm, i, v) for vm, vs in vms.items() for i, v in enumerate(vs) if v.cpu is not None]
        pick = lambda seq, p=p: seq[p % len(seq)]  # noqa: E731
        if action == 0 or not vms:  # vm_create
            if len(vms) < 3:
                vms[next_vm] = [_V() for _ in range(1 + p % 3)]
                emit(Ev.VM_CREATE, next_vm, pcpu=0, arg=pack_vm_create(len(vms[next_vm]), 4 + (p // 7) % 2, (p // 3) % 2))
                next_vm += 1
        elif action == 1:  # vm_destroy, after putting its vCPUs
            vm = pick(sorted(vms))
            for i, v in enumerate(vms[vm]):
                if v.cpu is not None:
                    emit(Ev.VCPU_PUT, vm, i)
                    busy.discard(v.cpu)
            emit(Ev.VM_DESTROY, vm, pcpu=4 * (p % 2))
            del vms[vm]
        elif action in (2, 3):  # vcpu_load on a free pCPU, then enter
            idle = [(vm, i, v) for vm, vs in vms.items() for i, v in enumerate(vs) if v.cpu is None]
            free = [c for c in CPUS if c not in busy]
            if idle and free:
                vm, i, v = pick(idle)
                v.cpu = free[(p // 5) % len(free)]
                busy.add(v.cpu)
                emit(Ev.VCPU_LOAD, vm, i, v.cpu)
                if action == 2:
                    enter(vm, i, v)
        elif action == 4 and loaded:  # vcpu_put
            vm, i, v = pick(loaded)
            emit(Ev.VCPU_PUT, vm, i)
            busy.discard(v.cpu)
            v.cpu, v.guest = None, False
        elif action == 5 and loaded:  # vm_exit or vm_entry
            vm, i, v = pick(loaded)
            if v.guest:
                emit(Ev.VM_EXIT, vm, i)
                v.guest = False
            else:
                enter(vm, i, v)
        elif action == 6:  # mmu-notifier zap, or an EPT12 write zap
            eptp12 = 0 if p % 3 else 1 + p % 4
            emit(Ev.ZAP, pick(sorted(vms)), pcpu=4 * (p % 2), arg=eptp12 | (ZAP_FLOOD if eptp12 and p % 5 == 0 else 0))
        elif action == 7:
            emit(Ev.MEMSLOT_DELETE, pick(sorted(vms)), pcpu=0)
        elif action == 8 and loaded:  # SMM transition
            vm, i, v = pick(loaded)
            emit(Ev.SMM_EXIT if v.smm else Ev.SMM_ENTER, vm, i)
            v.l2 = False if not v.smm else v.l2
            v.smm = not v.smm
            enter(vm, i, v)
        elif action in (9, 10) and loaded:  # nested VM-enter / VM-exit
            vm, i, v = pick(loaded)
            if v.l2:
                emit(Ev.NESTED_VMEXIT, vm, i)
                v.l2 = False
            elif not v.smm:
                arg = pack_nested_vmenter(1 + (p // 3) % 4, nested_ept=p % 4 != 0, eptp_backed=p % 11 != 0)
                emit(Ev.NESTED_VMENTER, vm, i, arg=arg)
                v.l2 = True
            enter(vm, i, v)
        elif action == 11 and loaded:  # L1 INVEPT
            vm, i, v = pick(loaded)
            if not v.l2:
                emit(Ev.L1_INVEPT, vm, i, arg=p % 5)
                enter(vm, i, v)
        elif action == 12 and loaded:
            vm, i, v = pick(loaded)
            emit(Ev.MMU_RESET_CONTEXT, vm, i, arg=p % len(MMU_RESET_REASONS))
            enter(vm, i, v)
        elif action == 13 and loaded:
            vm, i, v = pick(loaded)
            emit(Ev.GUEST_TLB_FLUSH, vm, i)
            enter(vm, i, v)
        elif action == 16 and loaded:  # the next kick reschedules this vCPU instead of re-entering
            vm, i, v = pick(loaded)
            emit(Ev.NEED_RESCHED, vm, i)
    return Trace.from_array(np.array(ev, dtype=EVENT_DTYPE), duration_ns=len(ev) + 1)
