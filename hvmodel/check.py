"""hvbench-check: every valid event sequence on a tiny host, breadth first.

Random and generated traces sample the event sequences; this enumerates them. From the state
after the VMs are created, every event of a small alphabet (each vCPU's loads, puts, entries,
exits, SMM and nested transitions, L1 INVEPTs, context resets, guest flush requests and
need_resched; zaps, EPT12 writes and floods, and memslot deletes on every pCPU) is tried in
every state, depth by depth. An event the engine rejects (a precondition of docs/trace-format.md)
ends that branch; a state already seen, by its canonical key (hvmodel/fast/src/check.h), is not
expanded again. Breadth first, the first stale use found is on a shortest sequence. It runs on
the compiled engine's state: the reference engine is the spec, and the fast engine matches it
on every trace (tests/test_fast_engine.py); a counter-example is replayed on the reference too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from hvmodel.fast.engine import FastEngine
from hvmodel.host import Topology
from hvmodel.metrics import HAZARDS
from hvmodel.trace import EVENT_DTYPE, ZAP_FLOOD, Ev, pack_nested_vmenter, pack_vm_create

L2 = 1  # the one EPTP12 (and VPID12) L1 uses


@dataclass
class CheckResult:
    depth: int  # every sequence up to this many events was explored (or, with a counter-example, its length)
    states: int  # distinct states seen
    sequences: int  # events tried
    seconds: float
    counterexample: np.ndarray | None  # the whole trace: the VMs' creation, then the events
    kind: str | None  # its hazard kind
    complete: bool  # False: the time limit stopped it before `depth` was done


def alphabet(topo: Topology, vms: list[int], nested: bool = True) -> np.ndarray:
    """Every event the check tries in each state (EVENT_DTYPE records without times)."""
    ev = []
    for vm, n in enumerate(vms, 1):
        for i in range(n):
            ev += [(Ev.VCPU_LOAD, vm, i, cpu, 0) for cpu in range(topo.nr_cpus)]
            ev += [(k, vm, i, -1, 0) for k in (Ev.VCPU_PUT, Ev.VM_ENTRY, Ev.VM_EXIT, Ev.SMM_ENTER, Ev.SMM_EXIT)]
            ev += [(k, vm, i, -1, 0) for k in (Ev.MMU_RESET_CONTEXT, Ev.GUEST_TLB_FLUSH, Ev.NEED_RESCHED)]
            if nested:
                ev += [(Ev.NESTED_VMENTER, vm, i, -1, pack_nested_vmenter(L2)), (Ev.NESTED_VMEXIT, vm, i, -1, 0)]
                ev += [(Ev.L1_INVEPT, vm, i, -1, L2), (Ev.L1_INVEPT, vm, i, -1, 0)]
        for cpu in range(topo.nr_cpus):
            ev += [(Ev.ZAP, vm, -1, cpu, 0), (Ev.MEMSLOT_DELETE, vm, -1, cpu, 0)]
            if nested:
                ev += [(Ev.ZAP, vm, -1, cpu, L2), (Ev.ZAP, vm, -1, cpu, L2 | ZAP_FLOOD)]
    out = np.zeros(len(ev), EVENT_DTYPE)
    for k, name in enumerate(("kind", "vm", "vcpu", "pcpu", "arg")):
        out[name] = [e[k] for e in ev]
    return out


def creation(vms: list[int]) -> np.ndarray:
    """The initial state's trace: each VM created by a VMM thread on pCPU 0."""
    out = np.zeros(len(vms), EVENT_DTYPE)
    out["kind"], out["vm"], out["vcpu"], out["pcpu"] = Ev.VM_CREATE, np.arange(1, len(vms) + 1), -1, 0
    out["arg"] = [pack_vm_create(n) for n in vms]
    return out


def check(
    topo: Topology,
    make_strategy: Callable,
    vms: list[int],
    depth: int,
    nested: bool = True,
    time_limit_s: float = 600.0,
    progress: Callable[[int, int, int], None] | None = None,
) -> CheckResult:
    """Explore every valid sequence of up to `depth` events after `creation(vms)`."""
    if topo.page_reuse != "lifo":
        raise ValueError("hvbench-check models host.page_reuse=lifo only (the cached pool's RCU clock is time)")
    strategy = make_strategy()
    t0 = time.perf_counter()
    root = FastEngine(topo, strategy, max_examples=1).state
    root.replay(_timed(creation(vms), 0))
    letters = alphabet(topo, vms, nested)
    seen = {root.digest()}
    frontier: list[tuple[int, ...]] = [()]
    tried = 0
    for d in range(1, depth + 1):
        nxt = []
        for path in frontier:
            # the frontier holds paths, not states: a State holds every array of the model
            # (its free vCPU-block table alone is 32 KiB), a path a few bytes, and replaying
            # at most `depth` events costs less than the node's children
            node = root.copy()
            node.replay(_timed(letters[list(path)], len(vms)))
            children = node.expand(letters)
            tried += len(letters)
            for k, stale, kind, digest in children:
                if stale:
                    events = np.concatenate([creation(vms), letters[[*path, k]]])
                    return _result(d, len(seen), tried, t0, _timed(events, 0), list(HAZARDS)[kind], True)
                if digest not in seen:
                    seen.add(digest)
                    nxt.append((*path, k))
            if time.perf_counter() - t0 > time_limit_s:
                return _result(d - 1, len(seen), tried, t0, None, None, False)
        if progress:
            progress(d, len(seen), len(nxt))
        frontier = nxt
        if not frontier:  # every reachable state was seen: deeper sequences find nothing new
            break
    return _result(depth, len(seen), tried, t0, None, None, True)


def _timed(events: np.ndarray, t0: int) -> np.ndarray:
    out = np.ascontiguousarray(events.copy(), dtype=EVENT_DTYPE)
    out["time_ns"] = np.arange(t0, t0 + len(out))
    return out


def _result(depth, states, tried, t0, events, kind, complete) -> CheckResult:
    return CheckResult(depth, states, tried, time.perf_counter() - t0, events, kind, complete)
