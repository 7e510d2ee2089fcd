"""Property tests: on random valid traces (tracegen.py), counters and model state obey invariants."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hvmodel.engine as engine_mod
from hvmodel.engine import TIMING_KEYS as TIMING
from hvmodel.engine import Engine, simulate
from hvmodel.kvm_host import IN_GUEST_MODE, VALID_PAGE
from hvmodel.metrics import HAZARDS, merge
from hvmodel.strategies.active_roots import ActiveRoots
from hvmodel.strategies.hyperv_flush_hypercall import HypervFlushHypercall
from hvmodel.strategies.ipi_all_on_alloc import IpiAllOnAlloc
from hvmodel.strategies.per_root_cpumask import PerRootCpumask
from hvmodel.strategies.per_root_cpumask_clear import PerRootCpumaskClear
from hvmodel.strategies.root_generation import RootGeneration
from hvmodel.strategies.upstream import Upstream
from hvmodel.strategies.vm_ever_ran_mask import VmEverRanMask

from controls import CurrentRootOnly, NoMigrationFlush
from readings import READINGS
from tracegen import ACTIONS, CPUS, HYPERV, TOPO, build_trace

BARE_METAL = [Upstream, IpiAllOnAlloc, VmEverRanMask, ActiveRoots, PerRootCpumask, PerRootCpumaskClear, RootGeneration, *READINGS]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_refcounts(host) -> None:
    """Every cached root is live; refcounts equal the references; no two live roots share a
    page; no page is both live and free."""
    live_hpas = []
    for kvm in host.vms.values():
        refs: dict[int, int] = {}
        for v in kvm.vcpus:
            for mmu in (v.arch.root_mmu, v.arch.guest_mmu):
                for r in mmu.slots():
                    if VALID_PAGE(r.hpa) and r.sp is not None:
                        assert r.sp.id in kvm.roots, f"{v!r} caches freed {r.sp!r}"
                        refs[r.sp.id] = refs.get(r.sp.id, 0) + 1
        for sp in kvm.roots.values():
            own = 1 if sp.tdp_mmu_page and (not sp.invalid or sp.tdp_mmu_scheduled_root_to_zap) else 0
            assert sp.root_count == refs.get(sp.id, 0) + own, sp
            live_hpas.append(sp.hpa)
    assert len(live_hpas) == len(set(live_hpas))
    free = {hpa for node in host.pool.free for hpa in node}
    assert not free & set(live_hpas)


@SETTINGS
@given(actions=ACTIONS)
def test_model_state_stays_consistent(actions):
    trace = build_trace(actions)
    for strategy in (Upstream, PerRootCpumask):
        eng = Engine(TOPO, strategy())
        for t, kind, vm, vcpu, cpu, arg in trace.to_array().tolist():
            eng.step(t, kind, vm, vcpu, cpu, arg)
            check_refcounts(eng.host)
            for cpu_, v in enumerate(eng.host.in_guest):
                assert v is None or (v.mode == IN_GUEST_MODE and v.cpu == cpu_)


@SETTINGS
@given(actions=ACTIONS)
def test_upstream_is_never_stale_on_bare_metal(actions):
    _, s = simulate(build_trace(actions), TOPO, Upstream())
    assert s["stale_tlb_uses"] == 0


@contextmanager
def invept_global_before_every_entry():
    """Brute-force safety: INVEPT all-context on the pCPU right before every VM entry."""
    original = engine_mod.vcpu_enter_guest

    def flush_then_enter(vcpu):
        vcpu.kvm.host.invept_global(vcpu.cpu)
        original(vcpu)

    engine_mod.vcpu_enter_guest = flush_then_enter
    try:
        yield
    finally:
        engine_mod.vcpu_enter_guest = original


@SETTINGS
@given(actions=ACTIONS)
def test_flushing_everything_at_every_entry_is_never_stale(actions):
    """A strategy made safe by brute force must never be flagged: the oracle has no false
    positives."""
    trace = build_trace(actions)
    with invept_global_before_every_entry():
        for strategy in (NoMigrationFlush, CurrentRootOnly, IpiAllOnAlloc, PerRootCpumask, VmEverRanMask, *READINGS):
            _, s = simulate(trace, TOPO, strategy())
            assert s["stale_tlb_uses"] == 0


class CountingActiveRoots(ActiveRoots):
    def __init__(self):
        super().__init__()
        self.per_migration: list[int] = []

    def vcpu_migrated(self, vcpu, cpu):
        before = sum(self.host.metrics.cpu["invept_single"])
        super().vcpu_migrated(vcpu, cpu)
        self.per_migration.append(sum(self.host.metrics.cpu["invept_single"]) - before)


@SETTINGS
@given(actions=ACTIONS)
def test_active_roots_flushes_at_most_8_roots_per_migration(actions):
    """2 MMUs x (root + 3 prev_roots): never more than 8 single-context INVEPTs."""
    strategy = CountingActiveRoots()
    _, s = simulate(build_trace(actions), TOPO, strategy)
    assert all(0 <= n <= 8 for n in strategy.per_migration)
    assert len(strategy.per_migration) == s["migrations"]


@SETTINGS
@given(actions=ACTIONS)
def test_counters_are_consistent(actions):
    trace = build_trace(actions)
    for strategy in BARE_METAL:
        r, s = simulate(trace, TOPO, strategy())
        assert s["stale_tlb_uses"] == sum(s[f"stale_tlb_uses_{k}"] for k in HAZARDS)
        # every kind that applies: at least the first one, and h2 only when it is the only one
        assert all(s[f"stale_tlb_uses_any_{k}"] >= s[f"stale_tlb_uses_{k}"] for k in HAZARDS)
        assert s["stale_tlb_uses_any_h2"] == s["stale_tlb_uses_h2"]
        assert s["stale_tlb_uses"] <= sum(s[f"stale_tlb_uses_any_{k}"] for k in HAZARDS)
        assert s["vmexits_from_ipi"] <= s["ipi_flush"] + s["ipi_vmclear"]
        assert s["root_frees"] <= s["root_allocs"]
        # every pCPU change moves the current VMCS, and every VMCS move sends a VMCLEAR IPI
        assert s["pcpu_changes"] <= s["migrations"] - s["vmcs_first_loads"] <= s["ipi_vmclear"]
        assert all((v >= 0).all() for v in r["per_cpu"].values())


@SETTINGS
@given(actions=ACTIONS, strategy=st.sampled_from(BARE_METAL))
def test_two_shards_equal_one(actions, strategy):
    trace = build_trace(actions)
    whole = Engine(TOPO, strategy()).run(trace)
    parts = merge([Engine(TOPO, strategy(), owned_nodes=[n]).run(trace) for n in (0, 1)])
    assert parts["vm"] == whole["vm"] and parts["stale_by_kind"] == whole["stale_by_kind"]
    assert parts["stale_any_kind"] == whole["stale_any_kind"]
    assert parts["examples"] == whole["examples"]
    for key, arr in whole["per_cpu"].items():
        assert np.array_equal(parts["per_cpu"][key], arr), key


def globals_per_migration(strategy) -> int:
    """INVEPT all-context one migration can cause where remote flushes are hypercalls: the
    KVM_REQ_TLB_FLUSH that vmx_vcpu_load_vmcs() still raises (A, and B and C as posted), and C's
    first-arrival flush when it is all-context."""
    request = type(strategy) is Upstream or (isinstance(strategy, IpiAllOnAlloc) and not strategy.elide_migration_flush)
    return int(request) + int(getattr(strategy, "first_visit_flush", None) == "global")


@SETTINGS
@given(actions=ACTIONS, strategy=st.sampled_from(BARE_METAL))
def test_remote_flushes_are_hypercalls_nested_on_hyperv(actions, strategy):
    """On Hyper-V a remote flush is a hypercall: it sends no IPI and raises no KVM_REQ_TLB_FLUSH.
    Only memslot deletes still kick vCPUs in guest mode (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS), so on
    the same trace Hyper-V sends at most the bare-metal flush IPIs, as many if bare metal made no
    remote flush (zaps, and obsolete shadow pages zapped by a memslot delete, make one), and
    INVEPT all-context comes only from migrations (globals_per_migration)."""
    trace = build_trace(actions)
    _, hv = simulate(trace, HYPERV, strategy())
    _, bare = simulate(trace, TOPO, strategy())
    assert hv["ipi_flush"] <= bare["ipi_flush"] if bare["remote_flushes"] else hv["ipi_flush"] == bare["ipi_flush"]
    assert hv["invept_global"] <= globals_per_migration(strategy()) * hv["migrations"]
    assert hv["hv_flush_hypercalls"] <= hv["remote_flushes"] * len(CPUS)


@SETTINGS
@given(actions=ACTIONS)
def test_hypercall_strategy_never_executes_invept(actions):
    """H turns every flush of a root into the hypercall; on Hyper-V nothing else flushes."""
    _, s = simulate(build_trace(actions), HYPERV, HypervFlushHypercall())
    assert s["invept_single"] == s["invept_global"] == 0


@SETTINGS
@given(actions=ACTIONS)
def test_e_mask_readings_only_add_flushes_or_memory(actions):
    """E with masks emptied at every shadow-root reference only ever flushes more (never more
    stale uses); E with masks from a memory cache flushes exactly as E and holds more memory:
    at least one 40-object cache per vCPU that loaded an MMU."""
    trace = build_trace(actions)
    _, page = simulate(trace, TOPO, PerRootCpumask())
    _, ref = simulate(trace, TOPO, PerRootCpumask(mask_lifetime="reference"))
    _, cache = simulate(trace, TOPO, PerRootCpumask(mask_source="memory_cache"))
    assert ref["stale_tlb_uses"] <= page["stale_tlb_uses"] and ref["invept_single"] >= page["invept_single"]
    assert {k: v for k, v in cache.items() if k != "cpumask_bytes_peak" and k not in TIMING} == {
        k: v for k, v in page.items() if k != "cpumask_bytes_peak" and k not in TIMING
    }
    assert cache["cpumask_bytes_peak"] >= page["cpumask_bytes_peak"]
    if page["root_allocs"]:
        assert cache["cpumask_bytes_peak"] >= 40 * 8


@SETTINGS
@given(actions=ACTIONS, elide=st.booleans())
def test_a_global_first_visit_flush_is_never_less_safe(actions, elide):
    """C's first-arrival flush as one INVEPT all-context flushes a superset of the per-root
    singles on that pCPU, and nothing else changes: never more stale uses, never fewer globals,
    the same IPIs."""
    trace = build_trace(actions)
    _, per_root = simulate(trace, TOPO, VmEverRanMask(elide_migration_flush=elide))
    _, whole = simulate(trace, TOPO, VmEverRanMask(elide_migration_flush=elide, first_visit_flush="global"))
    assert whole["stale_tlb_uses"] <= per_root["stale_tlb_uses"]
    assert whole["invept_global"] >= per_root["invept_global"] and whole["invept_single"] <= per_root["invept_single"]
    assert (whole["ipi_flush"], whole["ipi_vmclear"]) == (per_root["ipi_flush"], per_root["ipi_vmclear"])
