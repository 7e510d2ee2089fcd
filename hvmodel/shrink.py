"""Minimal counter-examples: shrink a trace on which a strategy lets a guest use a stale
translation to the few events that still show it, and say in plain words what they do.

Kernel developers act on a 15-event trace, not on a count. `shrink` keeps the oracle's verdict
(a stale use of the same hazard kind under the same strategy) while it removes, in order: the
events after the first stale use, every VM but the two the first stale use names, whole vCPUs,
then single events (delta debugging, Zeller's ddmin, to a 1-minimal trace: removing any one
event loses the stale use or makes the trace invalid). It then renumbers VMs, vCPUs, pCPUs
and times, on the smallest host the events fit (one node, no SMT, pCPU 0 housekeeping), and
shrinks once more. Every step is deterministic: the same input gives the same trace.

`walkthrough` replays the result event by event in the reference engine and tells what each
event did to the TLBs: which pCPU caches which root at which epoch, which flush removed it,
which remote flush missed it, and the stale use itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from hvmodel.engine import Engine
from hvmodel.host import Topology
from hvmodel.trace import EVENT_DTYPE, EVENT_NAMES, Ev, Trace, TraceError, pack_vm_create, unpack_vm_create

HOST_EVENTS = (Ev.VM_CREATE, Ev.VM_DESTROY, Ev.ZAP, Ev.MEMSLOT_DELETE)  # vcpu field unused


@dataclass
class Counterexample:
    events: np.ndarray  # EVENT_DTYPE, renumbered
    topo: Topology  # the host the events are numbered for
    kind: str  # hazard kind of the stale use (metrics.HAZARDS)
    source_events: int  # events of the trace it was shrunk from
    replays: int  # candidate traces replayed
    complete: bool  # False if the time budget ended the search (still a valid counter-example)


class Search:
    """The oracle test: does this candidate still show a stale use of `kind`?"""

    def __init__(self, make_strategy: Callable, engine, kind: str | None, deadline: float):
        self.make_strategy, self.engine, self.kind = make_strategy, engine, kind
        self.deadline, self.replays = deadline, 0

    @property
    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def run(self, events: np.ndarray, topo: Topology) -> dict | None:
        """The raw result, or None if the candidate is not a valid trace."""
        self.replays += 1
        try:
            return self.engine(topo, self.make_strategy()).run(Trace.from_array(events))
        except TraceError:
            return None

    def stale(self, events: np.ndarray, topo: Topology) -> bool:
        r = self.run(events, topo)
        return r is not None and r["stale_by_kind"].get(self.kind, 0) > 0


def shrink(
    events: np.ndarray,
    topo: Topology,
    make_strategy: Callable,
    engine=Engine,
    kind: str | None = None,
    budget_s: float = 60.0,
    source_events: int = 0,
) -> Counterexample | None:
    """The smallest trace found in `budget_s` that still shows a stale use of `kind` (the first
    stale use's kind if None) under `make_strategy()`; None if `events` shows none.
    `engine`: the engine class to replay candidates (the fast one gives the same verdicts);
    `source_events`: the size of the trace `events` was cut from, for the record."""
    search = Search(make_strategy, engine, kind, time.monotonic() + budget_s)
    events = np.asarray(events, EVENT_DTYPE)
    first = search.run(events, topo)
    examples = [] if first is None else [e for e in first["examples"] if kind is None or e["kind"] == kind]
    if not examples:
        return None
    ex = examples[0]
    search.kind = ex["kind"]
    cut = events[events["time_ns"] <= ex["t_ns"]]
    cut = _keep_if(search, cut, topo, np.isin(cut["vm"], [ex["vm"], ex["cached_vm"]]))
    cut = _groups(search, cut, topo, cut["vm"])
    cut = _groups(search, cut, topo, np.where(np.isin(cut["kind"], HOST_EVENTS), -1, cut["vm"] * 65536 + cut["vcpu"]))
    cut = minimize(cut, lambda c: search.stale(c, topo), lambda: search.out_of_time)
    cut, topo = _renumbered(search, cut, topo)
    cut = minimize(cut, lambda c: search.stale(c, topo), lambda: search.out_of_time)
    cut, topo = _renumbered(search, cut, topo)
    return Counterexample(cut, topo, search.kind, source_events or len(events), search.replays, not search.out_of_time)


def _renumbered(search: Search, events: np.ndarray, topo: Topology) -> tuple[np.ndarray, Topology]:
    small, small_topo = renumber(events, topo)
    return (small, small_topo) if search.stale(small, small_topo) else (events, topo)


def _keep_if(search: Search, events: np.ndarray, topo: Topology, keep: np.ndarray) -> np.ndarray:
    return events[keep] if search.stale(events[keep], topo) else events


def _groups(search: Search, events: np.ndarray, topo: Topology, key: np.ndarray) -> np.ndarray:
    """Try dropping every event of one group (a VM, a vCPU) at a time, keeping each drop that
    keeps the stale use. Group -1 (host events) is never dropped whole."""
    for g in np.unique(key):
        if g == -1 or search.out_of_time:
            continue
        keep = key != g
        if search.stale(events[keep], topo):
            events, key = events[keep], key[keep]
    return events


def ddmin(items: np.ndarray, test: Callable[[np.ndarray], bool], stop: Callable[[], bool] = lambda: False) -> np.ndarray:
    """Delta debugging (complements only): remove chunks of n-th size while `test` holds,
    refining to single events; the result is 1-minimal unless `stop()` ended it early."""
    n = 2
    while len(items) >= 2 and not stop():
        bounds = np.linspace(0, len(items), min(n, len(items)) + 1).astype(int)
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            candidate = np.concatenate([items[:lo], items[hi:]])
            if test(candidate):
                items, n = candidate, max(n - 1, 2)
                break
        else:
            if n >= len(items):
                break
            n = min(2 * n, len(items))
    return items


def minimize(items: np.ndarray, test: Callable[[np.ndarray], bool], stop: Callable[[], bool]) -> np.ndarray:
    """ddmin, then pairs of one vCPU's consecutive events (a load and its put, a put and the
    next load: removing either alone makes the trace invalid, so ddmin's single steps cannot),
    until neither removes anything."""
    while True:
        items = ddmin(items, test, stop)
        for i, j in _vcpu_pairs(items):
            candidate = np.delete(items, [i, j])
            if stop() or test(candidate):
                break
        else:
            return items
        if stop():
            return items
        items = candidate


def _vcpu_pairs(events: np.ndarray):
    last: dict[tuple[int, int], int] = {}
    for j, rec in enumerate(events):
        if rec["kind"] in HOST_EVENTS:
            continue
        key = (int(rec["vm"]), int(rec["vcpu"]))
        if key in last:
            yield last[key], j
        last[key] = j


def renumber(events: np.ndarray, topo: Topology) -> tuple[np.ndarray, Topology]:
    """VMs 1.., each VM's vCPUs 0.. (vm_create says how many), pCPUs 0.. in order of first use
    (the first is where the VMM runs: the housekeeping CPU of the new host), times 10 ns
    apart; on a host of one node, one thread per core, as many CPUs as the events use."""
    out = events.copy()
    vms = {int(v): i + 1 for i, v in enumerate(dict.fromkeys(events["vm"].tolist()))}
    vcpus: dict[int, dict[int, int]] = {v: {} for v in vms}
    for rec in events:
        if rec["kind"] not in HOST_EVENTS:
            vcpus[int(rec["vm"])].setdefault(int(rec["vcpu"]), len(vcpus[int(rec["vm"])]))
    host_cpu = lambda r: r["kind"] in HOST_EVENTS or r["kind"] == Ev.VCPU_LOAD
    cpus = {c: i for i, c in enumerate(dict.fromkeys(int(r["pcpu"]) for r in events if host_cpu(r)))}
    for i, rec in enumerate(out):
        vm, kind = int(events[i]["vm"]), rec["kind"]
        rec["vm"], rec["time_ns"] = vms[vm], 10 * i
        if kind not in HOST_EVENTS:
            rec["vcpu"] = vcpus[vm][int(events[i]["vcpu"])]
        if host_cpu(events[i]):
            rec["pcpu"] = cpus[int(events[i]["pcpu"])]
        if kind == Ev.VM_CREATE:
            _, level, _ = unpack_vm_create(int(rec["arg"]))
            rec["arg"] = pack_vm_create(max(1, len(vcpus[vm])), level, 0)
    n = max(1, len(cpus))
    small = replace(topo, nr_cpus=n, sockets=1, numa_nodes=1, smt=1, housekeeping_per_node=1, isolcpus=None, name=f"t{n}")
    return out, small


def verdicts(events: np.ndarray, topo: Topology, strategies: dict[str, Callable], engine=Engine) -> dict[str, dict]:
    """Each strategy's stale uses by kind on the trace (strategies that cannot run on this
    host's environment are left out)."""
    out = {}
    for name, make in strategies.items():
        strategy = make()
        if topo.env in getattr(strategy, "environments", (topo.env,)):
            out[name] = engine(topo, strategy).run(Trace.from_array(events))["stale_by_kind"]
    return out


# --- the walk-through ------------------------------------------------------------------------
def walkthrough(events: np.ndarray, topo: Topology, make_strategy: Callable) -> list[str]:
    """One line per event: what it is, the flushes and IPIs it caused, and how the TLBs and
    roots changed; the stale use itself in words, with when that pCPU last flushed the root."""
    eng = Engine(topo, make_strategy(), max_examples=len(events) + 1)
    host, lines, told = eng.host, [], Told()
    _record(host, told)
    for i, rec in enumerate(events):
        before_tlb, before_epoch, seen = _tlbs(host, told.roots), _epochs(host), len(host.metrics.examples)
        told.event, told.lines = i + 1, []
        host.event = i
        eng.step(*(int(rec[f]) for f in ("time_ns", "kind", "vm", "vcpu", "pcpu", "arg")))
        parts = [f"{i + 1:>2}. {describe(rec)}", *told.lines]
        parts += _epoch_changes(before_epoch, _epochs(host), told)
        parts += _tlb_changes(before_tlb, _tlbs(host, told.roots), topo.env)
        parts += [_stale_sentence(e, told) for e in host.metrics.examples[seen:]]
        lines.append(" -- ".join(parts))
    return lines


class Told:
    """What the walk-through has said so far: root names, and when each pCPU last flushed."""

    def __init__(self):
        self.event, self.lines = 0, []
        self.roots: dict[tuple[int, int], str] = {}  # (VM id, root id) -> R1, R2, ...
        self.flushed: dict[tuple[int, str], int] = {}  # (pCPU, root name or "*") -> event
        self.zapped: dict[str, int] = {}  # root name -> event


def describe(rec) -> str:
    kind, vm, vcpu, cpu = int(rec["kind"]), int(rec["vm"]), int(rec["vcpu"]), int(rec["pcpu"])
    name = EVENT_NAMES.get(kind, "?")
    if kind == Ev.VM_CREATE:
        return f"{name}: VM {vm} with {unpack_vm_create(int(rec['arg']))[0]} vCPUs, by the VMM on pCPU {cpu}"
    if kind in HOST_EVENTS:
        return f"{name}: VM {vm}, from pCPU {cpu}"
    if kind == Ev.VCPU_LOAD:
        return f"{name}: VM {vm} vCPU {vcpu} scheduled in on pCPU {cpu}"
    return f"{name}: VM {vm} vCPU {vcpu}"


def _record(host, told: Told) -> None:
    """Wrap the host's flush and IPI primitives so each call is told."""

    def root(hpa: int) -> str:
        sp = next((sp for kvm in host.vms.values() for sp in kvm.roots.values() if sp.hpa == hpa), None)
        return _name(told.roots, sp) if sp is not None else "the dummy root"

    def single(cpu, hpa):
        told.flushed[(cpu, root(hpa))] = told.event
        return f"INVEPT single-context of {root(hpa)} on pCPU {cpu}"

    def every(cpu):
        told.flushed[(cpu, "*")] = told.event
        return f"INVEPT all-context on pCPU {cpu}"

    def ipis(src, cpus, counter, flush_hpa=None):
        targets = ", ".join(map(str, np.asarray(cpus).tolist()))
        return f"{'VMCLEAR' if counter == 'ipi_vmclear' else 'flush'} IPI from pCPU {src} to pCPU {targets}" if len(cpus) else None

    tell = {
        "invept_single": single,
        "invept_global": every,
        "invvpid": lambda cpu: f"INVVPID on pCPU {cpu}",
        "hv_flush_guest_physical_address_space": lambda src, hpa: f"HvFlushGuestPhysicalAddressSpace of {root(hpa)} on every pCPU",
        "send_ipis": ipis,
    }
    for name, text in tell.items():
        call = getattr(host, name)

        def wrapped(*args, _call=call, _text=text, **kwargs):
            line = _text(*args, **kwargs)
            if line:
                told.lines.append(line)
            return _call(*args, **kwargs)

        setattr(host, name, wrapped)


def _name(roots: dict, sp) -> str:
    return roots.setdefault((sp.kvm.id, sp.id), f"R{len(roots) + 1}")


def _tlbs(host, roots) -> dict[tuple[int, str], tuple[int, bool]]:
    """(pCPU, root name) -> (cached epoch, missed by a remote flush)."""
    return {(cpu, _name(roots, e.sp)): (e.epoch, e.missed) for cpu, tlb in enumerate(host.tlb) for e in tlb.values() if e.sp is not None}


def _epochs(host) -> dict[int, int]:
    return {(kvm.id, sp.id): sp.epoch for kvm in host.vms.values() for sp in kvm.roots.values()}


def _epoch_changes(a: dict, b: dict, told: Told) -> list[str]:
    out = []
    for k, v in b.items():
        if k in a and a[k] != v:
            name = told.roots.get(k, f"#{k[1]}")
            told.zapped[name] = told.event
            out.append(f"root {name} zapped: epoch {a[k]} -> {v}")
    return out


MISSED = {
    "bare_metal": "no vCPU of the VM is loaded there to take a request",
    "hyperv": "the hypercall flushed only the vCPUs' last-loaded roots",
}


def _tlb_changes(a: dict, b: dict, env: str) -> list[str]:
    out = []
    for (cpu, root), (epoch, missed) in sorted(b.items()):
        if (cpu, root) not in a or a[(cpu, root)][0] != epoch:
            out.append(f"pCPU {cpu} now caches {root} at epoch {epoch}")
        elif missed and not a[(cpu, root)][1]:
            out.append(f"the remote flush cannot reach {root}'s epoch-{epoch} entries on pCPU {cpu} ({MISSED[env]})")
    out += [f"pCPU {cpu} no longer caches {root}" for (cpu, root) in sorted(a) if (cpu, root) not in b]
    return out


def _stale_sentence(e: dict, told: Told) -> str:
    root = told.roots.get((e["vm"], e["root"]), e["root"])
    cached, cpu = told.roots.get((e["cached_vm"], e["cached_root"]), e["cached_root"]), e["pcpu"]
    last = max(told.flushed.get((cpu, cached), 0), told.flushed.get((cpu, "*"), 0))
    when = f"pCPU {cpu} last flushed {cached} at event {last}" if last else f"pCPU {cpu} never flushed {cached}"
    if cached in told.zapped:
        when += f", before {cached} was zapped at event {told.zapped[cached]}"
    return (
        f"STALE ({e['kind']}): VM {e['vm']} vCPU {e['vcpu']} enters on pCPU {cpu} with root {root} at epoch {e['epoch']}, "
        f"but pCPU {cpu} still caches {cached} (VM {e['cached_vm']}) at epoch {e['cached_epoch']} ({when}): "
        "the guest can use translations that were zapped"
    )
