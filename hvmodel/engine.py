"""The reference engine: replays a trace, one event at a time, through the kernel paths.

This readable loop is the specification; any faster engine must produce identical results.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import numpy as np

from hvmodel.cost import CostModel
from hvmodel.host import Host, Topology
from hvmodel.kvm import (
    guest_tlb_flush,
    kvm_arch_flush_shadow_memslot,
    kvm_arch_vcpu_load,
    kvm_create_vm,
    kvm_destroy_vm,
    kvm_mmu_reset_context,
    kvm_sched_out,
    kvm_smm_changed,
    kvm_zap_gfn_range,
    l1_invept,
    need_resched,
    nested_vmenter,
    nested_vmexit,
    run_in_vcpu_context,
    vcpu_enter_guest,
    vcpu_event,
)
from hvmodel.kvm_host import OUTSIDE_GUEST_MODE
from hvmodel.metrics import NoiseBudget, summarize
from hvmodel.strategies.base import FlushStrategy
from hvmodel.trace import (
    EVENT_NAMES,
    NESTED_EPTP_NOT_BACKED,
    NESTED_NO_EPT,
    Ev,
    Trace,
    TraceError,
    unpack_vm_create,
)

FIELDS = ("time_ns", "kind", "vm", "vcpu", "pcpu", "arg")

# Events handled while the vCPU is out of guest mode on its own pCPU: kind -> fn(vcpu, arg).
IN_VCPU_CONTEXT: dict[int, Callable] = {
    Ev.VM_EXIT: lambda vcpu, arg: None,  # leaving guest mode is all there is
    Ev.SMM_ENTER: lambda vcpu, arg: kvm_smm_changed(vcpu, True),
    Ev.SMM_EXIT: lambda vcpu, arg: kvm_smm_changed(vcpu, False),
    Ev.NESTED_VMENTER: lambda vcpu, arg: nested_vmenter(
        vcpu, arg & 0xFFFFFFFF, nested_ept=not arg & NESTED_NO_EPT, eptp_backed=not arg & NESTED_EPTP_NOT_BACKED
    ),
    Ev.NESTED_VMEXIT: lambda vcpu, arg: nested_vmexit(vcpu),
    Ev.L1_INVEPT: l1_invept,
    Ev.MMU_RESET_CONTEXT: lambda vcpu, arg: kvm_mmu_reset_context(vcpu),
    Ev.GUEST_TLB_FLUSH: lambda vcpu, arg: guest_tlb_flush(vcpu),
}
# Events run by a VMM or kernel thread on the event's pCPU: kind -> fn(kvm, arg).
ON_HOST_CPU: dict[int, Callable] = {
    Ev.VM_DESTROY: lambda kvm, arg: kvm_destroy_vm(kvm),
    Ev.ZAP: kvm_zap_gfn_range,
    Ev.MEMSLOT_DELETE: lambda kvm, arg: kvm_arch_flush_shadow_memslot(kvm),
}


class Engine:
    """Owns one Host (all pCPUs, or the pCPUs of `owned_nodes` for a shard)."""

    engine = "reference"

    def __init__(
        self,
        topo: Topology,
        strategy: FlushStrategy,
        cost: CostModel | None = None,
        noise: NoiseBudget | None = None,
        owned_nodes: Iterable[int] | None = None,
        ept_ad: bool = True,
        max_examples: int = 10,
        local_nodes: Iterable[int] | None = None,
    ):
        """`owned_nodes`: the pCPUs whose TLBs and counters this engine keeps (all if None).
        `local_nodes`: a split shard, replaying only the events of those nodes' VMs (see
        remote_on_each_cpu, take_outbox, take_mask_series)."""
        self.events = 0  # events replayed so far
        self.sim_ns = 0  # simulated time reached
        cost, noise = cost or CostModel(), noise or NoiseBudget()
        self.host = Host(topo, strategy, cost, noise, owned_nodes, ept_ad, max_examples, local_nodes)
        self.mask_series: list[tuple[int, int, int]] = []  # split: (event, peak excursion, change) of mask bytes

    # --- dispatch ---------------------------------------------------------------------
    def dispatch(self, kind: int, vm: int, i: int, cpu: int, arg: int) -> None:
        """Route one event to the kernel path it drives, in the context it runs in."""
        host = self.host
        if kind in IN_VCPU_CONTEXT:  # handled in a VM exit, on the vCPU's pCPU
            vcpu = vcpu_event(host, vm, i, EVENT_NAMES.get(kind, "?"))
            run_in_vcpu_context(vcpu, EVENT_NAMES[kind])
            IN_VCPU_CONTEXT[kind](vcpu, arg)
        elif kind in ON_HOST_CPU:  # VMM or kernel thread on the event's pCPU
            self._on(cpu)
            kvm = host.vms.get(vm)
            if kvm is None:
                raise TraceError(f"{EVENT_NAMES[kind]}: VM {vm} does not exist")
            ON_HOST_CPU[kind](kvm, arg)
        elif kind == Ev.VM_CREATE:
            self._on(cpu)
            nr_vcpus, level, node = unpack_vm_create(arg)
            kvm_create_vm(host, vm, nr_vcpus, level, node)
        elif kind == Ev.VCPU_LOAD:
            self._on(cpu, vcpu_thread=True)
            kvm_arch_vcpu_load(vcpu_event(host, vm, i, "vcpu_load"), cpu)
        elif kind == Ev.VCPU_PUT:
            kvm_sched_out(vcpu_event(host, vm, i, "vcpu_put"), arg)
        elif kind == Ev.VM_ENTRY:
            vcpu_enter_guest(vcpu_event(host, vm, i, "vm_entry"))
        elif kind == Ev.NEED_RESCHED:  # the scheduler, not the vCPU: it stays in guest mode
            need_resched(vcpu_event(host, vm, i, "need_resched"))
        else:
            raise TraceError(f"unknown event kind {kind}")

    def _on(self, cpu: int, vcpu_thread: bool = False) -> None:
        """The host code of this event runs on `cpu` (smp_processor_id()). A VMM or kernel thread
        cannot run where a vCPU is in guest mode; a vCPU thread being scheduled in is checked
        by kvm_arch_vcpu_load()."""
        if not 0 <= cpu < self.host.topo.nr_cpus:
            raise TraceError(f"pcpu {cpu} does not exist (host has {self.host.topo.nr_cpus} CPUs)")
        if not vcpu_thread and self.host.in_guest[cpu] is not None:
            raise TraceError(f"pcpu {cpu} is in guest mode ({self.host.in_guest[cpu]!r}); host code cannot run there")
        self.host.this_cpu = cpu

    # --- the loop ---------------------------------------------------------------------
    def step(self, t: int, kind: int, vm: int, vcpu: int, cpu: int, arg: int) -> None:
        host, m = self.host, self.host.metrics
        host.now = t
        level = m.event_peak = m.cpumask_bytes
        self.dispatch(kind, vm, vcpu, cpu, arg)
        if host.reentry or host.irq_open.any():
            self.finish_event(t)
        if host.split and (m.event_peak > level or m.cpumask_bytes != level):
            self.mask_series.append((host.event, m.event_peak - level, m.cpumask_bytes - level))

    # --- a split shard ----------------------------------------------------------------
    def remote_on_each_cpu(self, t: int, broadcasts: list[tuple[int, int]]) -> None:
        """Another shard's event at time t broadcast kvm_flush_tlb_root to every online pCPU:
        each (src pCPU, hpa) reaches this shard's pCPUs as in the unsplit run (kicks, IPIs,
        INVEPTs), then the event ends here as it ended there."""
        host = self.host
        host.now = t
        for src, hpa in broadcasts:
            host.send_ipis(src, host.local_cpus, "ipi_flush", flush_hpa=hpa)
        self.finish_event(t)

    def take_outbox(self) -> list[tuple[int, int, int]]:
        """The on_each_cpu broadcasts so far that left this shard: (event index, src, hpa)."""
        out, self.host.outbox = self.host.outbox, []
        return out

    def take_mask_series(self) -> list[tuple[int, int, int]]:
        """Per event that changed strategy memory: (event index, the most bytes above the level
        before it, the change) -- what the whole host's cpumask_bytes_peak is made of."""
        out, self.mask_series = self.mask_series, []
        return out

    def finish_event(self, t: int) -> None:
        """vCPUs kicked out of guest mode by this event's IPIs re-enter (servicing whatever
        was requested of them), except those whose thread must reschedule first (need_resched):
        they stay out of guest mode until their next event; then each pCPU's interruption
        becomes one noise sample."""
        host = self.host
        while host.reentry:
            vcpu = host.reentry.pop(0)
            if vcpu.loaded and vcpu.mode == OUTSIDE_GUEST_MODE and not vcpu.need_resched:
                vcpu_enter_guest(vcpu)
        cpus = np.flatnonzero(host.irq_open)
        host.metrics.record_noise(cpus, t, host.irq_us[cpus])
        host.irq_open[cpus] = False
        host.irq_us[cpus] = 0.0

    def replay(self, chunk, trace: Trace) -> None:
        """Process one chunk of `trace` (errors name the trace line or event index)."""
        index = self.events
        cols = [chunk[f].tolist() for f in FIELDS]
        for t, kind, vm, vcpu, cpu, arg in zip(*cols):
            self.host.event = index
            try:
                self.step(t, kind, vm, vcpu, cpu, arg)
            except TraceError as e:
                raise TraceError(f"{trace.where(index)} (t_ns={t}): {e}") from None
            index += 1
        self.events = index
        if len(chunk):
            self.sim_ns = cols[0][-1]

    def flush_overhead_us(self) -> np.ndarray:
        """flush_overhead_us per pCPU so far (the closed loop's question, between chunks): a
        view, current until the next replay."""
        return self.host.metrics.cpu_f["flush_overhead_us"]

    def result(self, end_ns: int | None = None) -> dict:
        """The raw result (metrics.Metrics.result()); call once, after the last chunk. `end_ns`:
        the trace's end (its duration), where open guest-mode, steal and lifetime intervals
        close; by default the last event's time."""
        self.host.metrics.vm["events"] = self.events
        self.host.close_accounting(self.sim_ns if end_ns is None else end_ns)
        return self.host.metrics.result()

    def run(self, trace: Trace) -> dict:
        for chunk in trace:
            self.replay(chunk, trace)
        return self.result(trace.duration_ns)


def simulate(trace: Trace, topo: Topology, strategy: FlushStrategy, engine=None, **kwargs) -> tuple[dict, dict]:
    """Run the whole host in one engine (the reference unless `engine` is given, e.g.
    hvmodel.fast.FastEngine): (raw result, flat summary with timing). `sim_wall_s` and
    `events_per_s` time the replay alone; `gen_wall_s` is the time spent making the trace."""
    eng = (engine or Engine)(topo, strategy, **kwargs)
    gen = replay = 0.0
    chunks = iter(trace)
    while True:
        t0 = time.perf_counter()
        chunk = next(chunks, None)
        t1 = time.perf_counter()
        gen += t1 - t0
        if chunk is None:
            break
        eng.replay(chunk, trace)
        replay += time.perf_counter() - t1
    result = eng.result(trace.duration_ns)
    summary = summarize(result, topo.rt_mask(), trace.duration_ns / 1e9)
    summary.update(timing(summary["events"], replay, gen))
    return result, summary


TIMING_KEYS = ("sim_wall_s", "events_per_s", "gen_wall_s")  # how fast it ran, not what it found


def timing(events: int, replay_s: float, gen_s: float) -> dict:
    """The timing keys of summary.json: replay alone, and trace generation (or loading)."""
    return {"sim_wall_s": replay_s, "events_per_s": events / replay_s if replay_s > 0 else 0.0, "gen_wall_s": gen_s}
