"""Counters, per-pCPU arrays, RT noise windows, and the merge of shard results.

Two kinds of numbers, which is what makes sharding exact (DESIGN.md §3):

* per-pCPU counters: counted only by the shard that owns the pCPU, so the merged array is the
  element-wise sum of the shards' arrays;
* VM-level counters (root allocations, remote flushes, mask memory, ...): a deterministic
  function of the trace that every shard computes identically, so the merge checks that all
  shards agree and keeps one copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from hvmodel.errors import ConfigError

# Integer per-pCPU counters. Each IPI is counted once, at its receiver.
PER_CPU_COUNTERS = (
    "ipi_flush",  # call-function IPIs sent for TLB maintenance, received here
    "ipi_vmclear",  # synchronous VMCLEAR IPIs (loaded_vmcs_clear) received here
    "vmexits_from_ipi",  # IPIs that found a vCPU in guest mode here
    "invept_single",
    "invept_global",
    "invvpid",
    "migrations",  # vmx_vcpu_load_vmcs with loaded_vmcs->cpu != cpu, landing here (first loads too)
    "vmcs_first_loads",  # ... of those, a VMCS's first load (no VMCLEAR IPI: it was active nowhere)
    "pcpu_changes",  # vcpu_load here of a vCPU whose last pCPU was another one (not its first load)
    "stale_tlb_uses",  # oracle violations at VM entries here
    "noise_events",  # interruptions here at or above the noise threshold
    "rt_budget_violations",  # noise windows here over budget
    # the trace's own rates (how realistic a run was; of these only vm_exits depends on the strategy, through its IPIs)
    "vm_exits",  # every exit from guest mode here: the trace's (vm_exit, vcpu_put, ...) and IPIs' (vmexits_from_ipi)
    "halts",  # vcpu_put here of a vCPU blocked in HLT (trace arg PUT_HALT)
    "preemptions",  # vcpu_put here of a runnable vCPU (arg PUT_PREEMPTED: kvm_sched_out's vcpu->preempted)
    "guest_ns",  # time a vCPU spent in guest mode here
    "steal_ns",  # time from a preemption here to that vCPU's next vcpu_load (a lower bound of steal)
)
PER_CPU_FLOATS = (
    "flush_overhead_us",  # all flush-related cost charged to this pCPU
    "noise_us",  # interruption time (IPI + exit + handler + re-entry work)
    "noise_max_single_us",
    "noise_max_window_us",
)
# VM-level counters that every shard computes identically.
REPLICATED = (
    "events",
    "root_allocs",
    "root_frees",
    "remote_flushes",
    "hv_flush_hypercalls",
    "vpid_exhausted",
    "cpumask_bytes_peak",
    "vcpu_ns",  # the time every vCPU existed, summed (vm_create to vm_destroy or the trace's end)
)

# Oracle hazard kinds (kvm-flush-semantics.md §6), in classification order.
HAZARDS = {
    "h1": "EP4TA reuse: the tag belongs to a freed root whose page was reallocated",
    "h4": "a remote flush never reached this entry (no vCPU of the VM loaded here, or a root the Hyper-V hypercall skipped)",
    "h3": "previous-root reuse: fast_pgd_switch to a cached root without a flush",
    "h5": "guest_mmu (shadow-EPT) root not flushed",
    "h2": "missing migration flush",
}


@dataclass(frozen=True)
class NoiseBudget:
    """RT noise accounting, after the osnoise tracer (Documentation/trace/osnoise-tracer.rst).

    An interruption shorter than `threshold_us` is not noise (osnoise's tracing_thresh, whose
    own default is 5 us; here 0: every interruption counts). `budget_us` is the most noise one
    RT pCPU may see in one `period_us` window.
    """

    period_us: int = 1_000_000
    threshold_us: float = 0.0
    budget_us: float = 20.0

    def __post_init__(self) -> None:
        if self.period_us <= 0:
            raise ConfigError("noise.period_us", f"must be > 0, got {self.period_us}")
        for key in ("threshold_us", "budget_us"):
            if getattr(self, key) < 0:
                raise ConfigError(f"noise.{key}", f"must be >= 0, got {getattr(self, key)}")


class Metrics:
    """The counters of one emulator run (one shard, or the whole host)."""

    def __init__(self, nr_cpus: int, noise: NoiseBudget, max_examples: int = 10):
        self.noise = noise
        self.max_examples = max_examples
        self.cpu = {name: np.zeros(nr_cpus, np.int64) for name in PER_CPU_COUNTERS}
        self.cpu_f = {name: np.zeros(nr_cpus, np.float64) for name in PER_CPU_FLOATS}
        self.vm = dict.fromkeys(REPLICATED, 0)
        self.stale_by_kind = dict.fromkeys(HAZARDS, 0)
        self.stale_any_kind = dict.fromkeys(HAZARDS, 0)
        self.examples: list[dict] = []
        self.cpumask_bytes = 0
        self.event_peak = 0  # the most bytes allocated during the current event (split shards)
        # open noise window per pCPU: index and accumulated noise
        self._win = np.full(nr_cpus, -1, np.int64)
        self._win_noise = np.zeros(nr_cpus, np.float64)

    # --- memory owned by strategies ---------------------------------------------------
    def mask_alloc(self, nbytes: int) -> None:
        self.cpumask_bytes += nbytes
        self.event_peak = max(self.event_peak, self.cpumask_bytes)
        if self.cpumask_bytes > self.vm["cpumask_bytes_peak"]:
            self.vm["cpumask_bytes_peak"] = self.cpumask_bytes

    def mask_free(self, nbytes: int) -> None:
        self.cpumask_bytes -= nbytes

    # --- oracle -----------------------------------------------------------------------
    def stale(self, cpu: int, t_ns: int, kinds: list[str], example: Callable[[], dict]) -> None:
        """Count a stale use under its first kind and every kind that applies; build its example
        only if it can be among the first ones."""
        self.cpu["stale_tlb_uses"][cpu] += 1
        self.stale_by_kind[kinds[0]] += 1
        for k in kinds:
            self.stale_any_kind[k] += 1
        ex = self.examples
        if len(ex) < self.max_examples or (ex and t_ns <= ex[-1]["t_ns"]):  # events come in time order
            self.examples = first_examples([*ex, example()], self.max_examples)

    # --- noise ------------------------------------------------------------------------
    def record_noise(self, cpus: np.ndarray, t_ns: int, us: np.ndarray) -> None:
        """One interruption on each of `cpus` (distinct pCPUs) at time `t_ns`, of `us`
        microseconds each. Vectorised: a broadcast interrupts thousands of pCPUs at once."""
        keep = us >= self.noise.threshold_us
        cpus, us = cpus[keep], us[keep]
        f = self.cpu_f
        f["noise_us"][cpus] += us
        self.cpu["noise_events"][cpus] += 1
        f["noise_max_single_us"][cpus] = np.maximum(f["noise_max_single_us"][cpus], us)
        w = t_ns // (self.noise.period_us * 1000)
        moving = cpus[self._win[cpus] != w]
        self._close_windows(moving)
        self._win[moving] = w
        self._win_noise[cpus] += us

    def _close_windows(self, cpus: np.ndarray) -> None:
        noise = self._win_noise[cpus]
        self.cpu_f["noise_max_window_us"][cpus] = np.maximum(self.cpu_f["noise_max_window_us"][cpus], noise)
        self.cpu["rt_budget_violations"][cpus] += noise > self.noise.budget_us
        self._win_noise[cpus] = 0.0

    def result(self) -> dict:
        """Close open noise windows and return plain, picklable arrays and dicts."""
        open_ = np.flatnonzero(self._win >= 0)
        self._close_windows(open_)
        self._win[open_] = -1
        per_cpu = {k: v.copy() for k, v in self.cpu.items()}
        per_cpu.update({k: v.copy() for k, v in self.cpu_f.items()})
        return {
            "per_cpu": per_cpu,
            "vm": dict(self.vm),
            "stale_by_kind": dict(self.stale_by_kind),
            "stale_any_kind": dict(self.stale_any_kind),
            "examples": list(self.examples),
        }


def first_examples(examples: list[dict], k: int) -> list[dict]:
    """The k earliest stale uses in a total order (time, pCPU, VM, vCPU), so that the examples
    kept do not depend on how the pCPUs were split into shards."""
    return sorted(examples, key=lambda e: (e["t_ns"], e["pcpu"], e["vm"], e["vcpu"]))[:k]


def merge(results: list[dict], max_examples: int = 10, split: bool = False) -> dict:
    """Merge shard results. Per-pCPU arrays add up (each pCPU has one owner). VM-level counters
    must agree across shards that replay every VM, or the sharding is broken and we say so;
    shards that split the VMs between them (hvmodel.split) each count their own, which add up,
    and give their strategy-memory changes per event, from which the host's peak is rebuilt."""
    if len(results) == 1 and not split:
        return results[0]
    first = results[0]
    if split:
        vm = {k: sum(r["vm"][k] for r in results) for k in first["vm"]}
        vm["cpumask_bytes_peak"] = whole_host_peak(e for r in results for e in r["mask_series"])
    else:
        vm = dict(first["vm"])
        for r in results[1:]:
            if r["vm"] != first["vm"]:
                diff = {k: [s["vm"][k] for s in results] for k in first["vm"] if r["vm"][k] != first["vm"][k]}
                raise AssertionError(f"shards disagree on VM-level counters: {diff}")
    # each pCPU has exactly one owner and is 0 elsewhere: a sum is exact, maxima included
    per_cpu = {key: np.sum([r["per_cpu"][key] for r in results], axis=0) for key in first["per_cpu"]}
    stale = {key: {k: sum(r[key][k] for r in results) for k in first[key]} for key in ("stale_by_kind", "stale_any_kind")}
    examples = first_examples([e for r in results for e in r["examples"]], max_examples)
    return {"per_cpu": per_cpu, "vm": vm, **stale, "examples": examples}


def whole_host_peak(series: Iterable[tuple[int, int, int]]) -> int:
    """The whole host's cpumask_bytes_peak from every shard's (order key, the most bytes above
    the level before the event, the change) for each event that changed strategy memory: only
    one shard's VMs act in any one event, so the host's level is the sum of the changes so far."""
    level = peak = 0
    for _, excursion, change in sorted(series):
        peak = max(peak, level + excursion)
        level += change
    return peak


RATE_KEYS = (
    "stale_tlb_uses",
    "invept_single",
    "invept_global",
    "invvpid",
    "ipi_flush",
    "ipi_vmclear",
    "ipi_rt",
    "vmexits_from_ipi",
    "migrations",
    "pcpu_changes",
    "root_allocs",
    "remote_flushes",
)


# The trace's own rates, per vCPU (per second a vCPU existed): what a user compares with a real
# host (cost-anchors.md "Workload rates seen on real KVM hosts") to see how realistic a run was.
TRACE_RATE_KEYS = (
    "vcpu_seconds",
    "exits_per_vcpu_s",
    "halts_per_vcpu_s",
    "preemptions_per_vcpu_s",
    "pcpu_changes_per_vcpu_s",
    "guest_mode_pct",
    "steal_pct",
)


def trace_rates(pc: dict, vm: dict) -> dict:
    """TRACE_RATE_KEYS. Steal counts from a preemption to the next vcpu_load (a woken vCPU
    that waits for a pCPU is not in a trace)."""
    vcpu_ns = int(vm["vcpu_ns"])
    per_s = 1e9 / vcpu_ns if vcpu_ns else 0.0
    return {
        "vcpu_seconds": vcpu_ns / 1e9,
        "exits_per_vcpu_s": int(pc["vm_exits"].sum()) * per_s,
        "halts_per_vcpu_s": int(pc["halts"].sum()) * per_s,
        "preemptions_per_vcpu_s": int(pc["preemptions"].sum()) * per_s,
        "pcpu_changes_per_vcpu_s": int(pc["pcpu_changes"].sum()) * per_s,
        "guest_mode_pct": 100 * int(pc["guest_ns"].sum()) / vcpu_ns if vcpu_ns else 0.0,
        "steal_pct": 100 * int(pc["steal_ns"].sum()) / vcpu_ns if vcpu_ns else 0.0,
    }


def closed_loop_summary(stats: dict) -> dict:
    """The closed loop's own keys (hvmodel/closed_loop.py; a closed-loop run only: in the open
    loop the delay and the extra migrations are 0 and every completed boot takes exactly
    lifecycle.boot_s). vm_boot_ms_mean is over the boots that completed in the trace."""
    boots = int(stats["boots"])
    return {
        "closed_loop_delay_us": stats["delay_ns"] / 1000,  # flush time turned into later stint ends and boot steps
        "closed_loop_extra_migrations": int(stats["extra_migrations"]),  # wake-ups moved off an idle last pCPU by the host's flush load
        "vm_boots": boots,
        "vm_boot_ms_mean": stats["boot_ns"] / boots / 1e6 if boots else 0.0,
    }


def summarize(result: dict, rt_mask: np.ndarray, sim_seconds: float) -> dict:
    """The flat metric dict of DESIGN.md §6 (keys of summary.json and MLflow metric names)."""
    pc, vm = result["per_cpu"], result["vm"]
    ipi_rx = pc["ipi_flush"] + pc["ipi_vmclear"]
    rt = np.asarray(rt_mask, dtype=bool)
    out: dict[str, float] = {
        "stale_tlb_uses": int(pc["stale_tlb_uses"].sum()),
        **{f"stale_tlb_uses_{k}": int(v) for k, v in result["stale_by_kind"].items()},
        **{f"stale_tlb_uses_any_{k}": int(v) for k, v in result["stale_any_kind"].items()},
        "invept_single": int(pc["invept_single"].sum()),
        "invept_global": int(pc["invept_global"].sum()),
        "invvpid": int(pc["invvpid"].sum()),
        "ipi_flush": int(pc["ipi_flush"].sum()),
        "ipi_vmclear": int(pc["ipi_vmclear"].sum()),
        "ipi_rt": int(ipi_rx[rt].sum()),
        "ipi_max_per_cpu": int(ipi_rx.max()) if len(ipi_rx) else 0,
        "vmexits_from_ipi": int(pc["vmexits_from_ipi"].sum()),
        "cpumask_bytes_peak": int(vm["cpumask_bytes_peak"]),
        "rt_noise_max_us": float(pc["noise_max_window_us"][rt].max()) if rt.any() else 0.0,
        "rt_noise_max_single_us": float(pc["noise_max_single_us"][rt].max()) if rt.any() else 0.0,
        "rt_budget_violations": int(pc["rt_budget_violations"][rt].sum()),
        "flush_overhead_us": float(pc["flush_overhead_us"].sum()),
        "migrations": int(pc["migrations"].sum()),
        "vmcs_first_loads": int(pc["vmcs_first_loads"].sum()),
        "pcpu_changes": int(pc["pcpu_changes"].sum()),
        "root_allocs": int(vm["root_allocs"]),
        "root_frees": int(vm["root_frees"]),
        "remote_flushes": int(vm["remote_flushes"]),
        "hv_flush_hypercalls": int(vm["hv_flush_hypercalls"]),
        "vpid_exhausted": int(vm["vpid_exhausted"]),
        "events": int(vm["events"]),
        "sim_seconds": float(sim_seconds),
    }
    if sim_seconds > 0:
        for key in RATE_KEYS:
            out[f"{key}_per_s"] = out[key] / sim_seconds
    out.update(trace_rates(pc, vm))
    if "closed_loop" in result:
        out.update(closed_loop_summary(result["closed_loop"]))
    for k, v in out.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise AssertionError(f"metric {k} is not finite: {v}")
    return out
