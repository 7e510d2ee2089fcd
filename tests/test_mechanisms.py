"""The kernel mechanisms under the strategies, one at a time, on small hand-written traces.

Each test replays a few events (JSON Lines written to tmp_path, so errors name the line) and
checks exact model state (roots, refcounts, HPAs, prev_roots, VPIDs, VMCS placement) and exact
counters. Expected values were derived by hand, event by event, from the kernel paths the model
names; each docstring gives the derivation. Conventions as in test_hazard_traces.py: hosts have
smt=1 and one housekeeping CPU (CPU 0), the rest RT-isolated; root pages come from a LIFO pool
starting at pfn 1 of node 0 (first root page 0x1000, then 0x2000, ...); root ids count from 1.
Upstream: the first load of a VMCS on a pCPU is a "migration" (KVM_REQ_TLB_FLUSH -> one INVEPT
all-context at the next entry); kvm_mmu_load() does one INVEPT single-context on its pCPU.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from hvmodel.cost import CostModel
from hvmodel.engine import TIMING_KEYS, Engine, simulate
from hvmodel.errors import ConfigError
from hvmodel.host import Topology
from hvmodel.kvm_host import INVALID_ROOT, KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, KvmMmuPageRole
from hvmodel.metrics import TRACE_RATE_KEYS, Metrics, NoiseBudget
from hvmodel.mmu import PagePool
from hvmodel.strategies.base import cpumask_bytes, kmalloc_size
from hvmodel.strategies.hyperv_flush_hypercall import HypervFlushHypercall
from hvmodel.strategies.per_root_cpumask import PerRootCpumask
from hvmodel.strategies.root_generation import RootGeneration
from hvmodel.strategies.upstream import Upstream
from hvmodel.trace import (
    EVENT_DTYPE,
    Ev,
    Trace,
    TraceError,
    load,
    load_binary,
    load_text,
    pack_vm_create,
    save_binary,
    write_text,
)
from hvmodel.vmx import VpidBitmap
from hvmodel.workloads.partitioned_pinned import PartitionedPinned

TDP_L1 = KvmMmuPageRole(level=4, direct=True, guest_mode=False, smm=False, ad_disabled=False)
TDP_SMM = TDP_L1._replace(smm=True)
TDP_L2 = TDP_L1._replace(guest_mode=True)
SHADOW_EPT = KvmMmuPageRole(level=4, direct=False, guest_mode=True, smm=False, ad_disabled=False)
IGNORED = TIMING_KEYS


# --- helpers ---------------------------------------------------------------------------------
def host(cpus: int, env: str = "bare_metal") -> Topology:
    return Topology(nr_cpus=cpus, smt=1, housekeeping_per_node=1, env=env, name=f"t{cpus}")


def ev(t: int, event: str, vm: int = 1, **fields) -> dict:
    return {"t_ns": t, "event": event, "vm": vm, **fields}


def jsonl(tmp_path, events: list, name: str = "trace.jsonl") -> Trace:
    path = tmp_path / name
    path.write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    return load_text(path)


def play(engine: Engine, trace: Trace, upto: int | None = None) -> None:
    """Replay the trace's events from where the engine stopped up to index `upto` (exclusive)."""
    arr = trace.to_array()
    engine.replay(arr[engine.events : upto], trace)


def counters(engine: Engine) -> dict:
    """Per-pCPU counter lists and VM-level counters, as they stand (no window closing)."""
    m = engine.host.metrics
    return {**{k: list(v) for k, v in m.cpu.items()}, **m.vm, **{f"stale_{k}": v for k, v in m.stale_by_kind.items()}}


def slots(mmu) -> list:
    """root + prev_roots as root ids (None for an invalid slot)."""
    return [r.sp.id if r.sp is not None else None for r in mmu.slots()]


# --- 1. memslot delete -> kvm_mmu_zap_all_fast ------------------------------------------------
def test_memslot_delete_kicks_in_guest_vcpu_and_reuses_root_page_lifo(tmp_path):
    """kvm_mmu_zap_all_fast() while the vCPU is IN_GUEST_MODE: the TDP root is invalidated, the
    KVM_REQ_MMU_FREE_OBSOLETE_ROOTS request is made with an IPI to the vCPU's pCPU (one flush
    IPI, one VM exit), the TDP MMU drops its reference (2 -> 1). At re-entry the vCPU frees the
    obsolete root (1 -> 0: root_frees 1, page 0x1000 back to the pool) and kvm_mmu_load()
    allocates root 2, which gets the same page 0x1000 (LIFO), with its local single-context
    flush removing root 1's entries on P1 before entry: no stale use. Upstream totals: INVEPT
    single 2 (both loads, P1), all-context 1 (first load of vmcs01 on P1), root_allocs 2."""
    trace = jsonl(
        tmp_path,
        [
            ev(0, "vm_create", vcpus=1, pcpu=0),
            ev(10, "vcpu_load", vcpu=0, pcpu=1),
            ev(11, "vm_entry", vcpu=0),
            ev(20, "memslot_delete", pcpu=0),
        ],
    )
    engine = Engine(host(4), Upstream())
    play(engine, trace, 3)
    h = engine.host
    kvm = h.vms[1]
    old = kvm.vcpus[0].arch.root_mmu.root.sp
    assert (old.id, old.hpa, old.root_count, old.tdp_mmu_page) == (1, 0x1000, 2, True)
    play(engine, trace)
    vcpu = kvm.vcpus[0]
    new = vcpu.arch.root_mmu.root.sp
    assert (new.id, new.hpa, new.root_count, new.invalid) == (2, 0x1000, 2, False)
    assert (old.invalid, old.root_count) == (True, 0)
    assert kvm.roots == {2: new} and kvm.tdp_mmu_roots == [new]
    assert h.pool.free[0] == [] and h.pool.next_pfn[0] == 2
    assert h.in_guest[1] is vcpu and vcpu.requests == 0
    assert list(h.tlb[1]) == [0x1000] and h.tlb[1][0x1000].sp is new
    c = counters(engine)
    assert c["ipi_flush"] == [0, 1, 0, 0] and c["vmexits_from_ipi"] == [0, 1, 0, 0]
    assert c["invept_single"] == [0, 2, 0, 0] and c["invept_global"] == [0, 1, 0, 0]
    assert (c["root_allocs"], c["root_frees"], c["remote_flushes"]) == (2, 1, 0)
    assert c["stale_tlb_uses"] == [0, 0, 0, 0]


def test_memslot_delete_with_halted_vcpu_replaces_root_at_next_entry(tmp_path):
    """Same zap with the vCPU halted (vm_exit: loaded, OUTSIDE_GUEST_MODE): the request is set
    but no IPI is sent (kvm_make_all_cpus_request only kicks vCPUs in guest mode). Until the
    vCPU runs, the invalid root 1 stays alive on the vCPU's reference alone (root_count 1,
    still listed, page not freed). At the next vm_entry the request frees it (root_frees 1)
    and kvm_mmu_load() allocates root 2 on the same page 0x1000. No IPI, no VM exit, no stale
    use; INVEPT single 2 and all-context 1 on P1 as in the in-guest case."""
    trace = jsonl(
        tmp_path,
        [
            ev(0, "vm_create", vcpus=1, pcpu=0),
            ev(10, "vcpu_load", vcpu=0, pcpu=1),
            ev(11, "vm_entry", vcpu=0),
            ev(15, "vm_exit", vcpu=0),
            ev(20, "memslot_delete", pcpu=0),
            ev(30, "vm_entry", vcpu=0),
        ],
    )
    engine = Engine(host(4), Upstream())
    play(engine, trace, 5)
    h = engine.host
    kvm = h.vms[1]
    vcpu = kvm.vcpus[0]
    old = vcpu.arch.root_mmu.root.sp
    assert (old.id, old.hpa, old.invalid, old.root_count) == (1, 0x1000, True, 1)
    assert kvm.roots == {1: old} and kvm.tdp_mmu_roots == [old]
    assert vcpu.requests & KVM_REQ_MMU_FREE_OBSOLETE_ROOTS
    assert h.pool.free[0] == []
    assert counters(engine)["ipi_flush"] == [0, 0, 0, 0]
    play(engine, trace)
    new = vcpu.arch.root_mmu.root.sp
    assert (new.id, new.hpa, new.root_count) == (2, 0x1000, 2)
    assert kvm.roots == {2: new}
    c = counters(engine)
    assert c["ipi_flush"] == [0, 0, 0, 0] and c["vmexits_from_ipi"] == [0, 0, 0, 0]
    assert c["invept_single"] == [0, 2, 0, 0] and c["invept_global"] == [0, 1, 0, 0]
    assert (c["root_allocs"], c["root_frees"]) == (2, 1)
    assert c["stale_tlb_uses"] == [0, 0, 0, 0]


def test_memslot_delete_frees_idle_root_at_once_and_reuses_last_freed_page(tmp_path):
    """After an SMM round trip the VM has root 1 (page 0x1000, in use by the vCPU, refcount 2)
    and the SMM root 2 (0x2000, held only by the TDP MMU, refcount 1). kvm_mmu_zap_all_fast()
    with the vCPU in guest mode: kvm_tdp_mmu_zap_invalidated_roots() puts the TDP MMU's
    references, freeing root 2 at once (pool [0x2000]) while root 1 survives on the vCPU's
    reference until the kicked vCPU frees it at re-entry (pool [0x2000, 0x1000]). The new
    root 3 takes the page freed last, 0x1000 (LIFO), leaving [0x2000]. root_frees 2,
    root_allocs 3, one flush IPI; INVEPT single 4 on P1 (every load), no stale use."""
    trace = jsonl(
        tmp_path,
        [
            ev(0, "vm_create", vcpus=1, pcpu=0),
            ev(10, "vcpu_load", vcpu=0, pcpu=1),
            ev(11, "vm_entry", vcpu=0),
            ev(20, "smm_enter", vcpu=0),
            ev(21, "vm_entry", vcpu=0),
            ev(30, "smm_exit", vcpu=0),
            ev(31, "vm_entry", vcpu=0),
            ev(40, "memslot_delete", pcpu=0),
        ],
    )
    engine = Engine(host(4), Upstream())
    play(engine, trace, 7)
    kvm = engine.host.vms[1]
    r1, r2 = kvm.tdp_mmu_roots
    assert [(r.id, r.hpa, r.role, r.root_count) for r in (r1, r2)] == [(1, 0x1000, TDP_L1, 2), (2, 0x2000, TDP_SMM, 1)]
    play(engine, trace)
    r3 = kvm.vcpus[0].arch.root_mmu.root.sp
    assert (r3.id, r3.hpa, r3.role, r3.root_count) == (3, 0x1000, TDP_L1, 2)
    assert kvm.tdp_mmu_roots == [r3] and kvm.roots == {3: r3}
    assert engine.host.pool.free[0] == [0x2000]
    c = counters(engine)
    assert (c["root_allocs"], c["root_frees"]) == (3, 2)
    assert c["ipi_flush"] == [0, 1, 0, 0] and c["invept_single"] == [0, 4, 0, 0] and c["invept_global"] == [0, 1, 0, 0]
    assert sum(c["stale_tlb_uses"]) == 0


# --- 2. TDP root sharing, SMM, level 5 --------------------------------------------------------
def test_tdp_root_shared_by_role_and_smm_root_is_distinct(tmp_path):
    """kvm_tdp_mmu_alloc_root() reuses a valid root with the same role: vCPU 1 takes a
    reference on vCPU 0's root 1 (refcount 2 at allocation + 1 = 3: the TDP MMU and both
    vCPUs). SMM enter on vCPU 0: kvm_smm_changed() -> kvm_mmu_reset_context() drops its
    reference (3 -> 2, root kept: not invalid) and leaves no prev_roots; the next load needs
    role.smm=1, so root 2 (page 0x2000) is allocated. SMM exit drops root 2 to 1 (the TDP MMU's
    reference; roots persist until invalidated) and the load finds root 1 again (-> 3).
    root_allocs 2, root_frees 0. Upstream INVEPT: all-context 2 (vmcs01 first loads on P1, P2),
    single 4 (every kvm_mmu_load: P1 three times, P2 once)."""
    trace = jsonl(
        tmp_path,
        [
            ev(0, "vm_create", vcpus=2, pcpu=0),
            ev(10, "vcpu_load", vcpu=0, pcpu=1),
            ev(11, "vm_entry", vcpu=0),
            ev(20, "vcpu_load", vcpu=1, pcpu=2),
            ev(21, "vm_entry", vcpu=1),
            ev(30, "smm_enter", vcpu=0),
            ev(31, "vm_entry", vcpu=0),
            ev(40, "smm_exit", vcpu=0),
            ev(41, "vm_entry", vcpu=0),
        ],
    )
    engine = Engine(host(4), Upstream())
    kvm_of = lambda: engine.host.vms[1]  # noqa: E731
    play(engine, trace, 5)
    v0, v1 = kvm_of().vcpus
    r1 = v0.arch.root_mmu.root.sp
    assert v1.arch.root_mmu.root.sp is r1
    assert (r1.id, r1.hpa, r1.role, r1.root_count) == (1, 0x1000, TDP_L1, 3)
    assert kvm_of().tdp_mmu_roots == [r1]

    play(engine, trace, 6)  # smm_enter
    assert v0.smm and v0.arch.root_mmu.root == INVALID_ROOT
    assert v0.arch.root_mmu.prev_roots == [INVALID_ROOT] * 3
    assert v0.arch.root_mmu.root_role == TDP_SMM and r1.root_count == 2
    play(engine, trace, 7)
    r2 = v0.arch.root_mmu.root.sp
    assert (r2.id, r2.hpa, r2.role, r2.root_count) == (2, 0x2000, TDP_SMM, 2)
    assert slots(v0.arch.root_mmu) == [2, None, None, None]

    play(engine, trace, 8)  # smm_exit
    assert not v0.smm and v0.arch.root_mmu.root == INVALID_ROOT
    assert v0.arch.root_mmu.prev_roots == [INVALID_ROOT] * 3
    assert r2.root_count == 1 and not r2.invalid
    play(engine, trace)
    assert v0.arch.root_mmu.root.sp is r1 and r1.root_count == 3
    assert slots(v0.arch.root_mmu) == [1, None, None, None]
    assert kvm_of().tdp_mmu_roots == [r1, r2] and set(kvm_of().roots) == {1, 2}
    c = counters(engine)
    assert (c["root_allocs"], c["root_frees"]) == (2, 0)
    assert c["invept_single"] == [0, 3, 1, 0] and c["invept_global"] == [0, 1, 1, 0]
    assert sum(c["stale_tlb_uses"]) == 0


def test_tdp_level_5_vm_gets_level_5_roles(tmp_path):
    """kvm_mmu_get_tdp_level() is fixed per VM (guest MAXPHYADDR): a VM created with
    tdp_level 5 gets level-5 TDP roots, in SMM too, while a level-4 VM next to it keeps
    level 4. Roots are per VM, so the two VMs' non-SMM roots are distinct pages (0x1000 for
    VM 1, 0x2000 for VM 2), and VM 2's SMM root is a third one (0x3000)."""
    trace = jsonl(
        tmp_path,
        [
            ev(0, "vm_create", vm=1, vcpus=1, pcpu=0),
            ev(1, "vm_create", vm=2, vcpus=1, pcpu=0, tdp_level=5),
            ev(10, "vcpu_load", vm=1, vcpu=0, pcpu=1),
            ev(11, "vm_entry", vm=1, vcpu=0),
            ev(20, "vcpu_load", vm=2, vcpu=0, pcpu=2),
            ev(21, "vm_entry", vm=2, vcpu=0),
            ev(30, "smm_enter", vm=2, vcpu=0),
            ev(31, "vm_entry", vm=2, vcpu=0),
        ],
    )
    engine = Engine(host(4), Upstream())
    engine.run(trace)
    vms = engine.host.vms
    assert vms[1].tdp_level == 4 and vms[2].tdp_level == 5
    (a,) = vms[1].tdp_mmu_roots
    b, b_smm = vms[2].tdp_mmu_roots
    assert (a.hpa, a.role) == (0x1000, TDP_L1)
    assert (b.hpa, b.role) == (0x2000, TDP_L1._replace(level=5))
    assert (b_smm.hpa, b_smm.role) == (0x3000, TDP_SMM._replace(level=5))
    assert vms[2].vcpus[0].arch.root_mmu.root.sp is b_smm


# --- 3. fast_pgd_switch LRU -------------------------------------------------------------------
def test_nested_without_ept_all_l2s_share_one_guest_mode_tdp_root(tmp_path):
    """Without nested EPT, L2 runs on root_mmu with role.guest_mode=1. A TDP root's role does
    not depend on the L2 (is_root_usable ignores pgd for direct roots), so every L2 of a VM,
    whatever its id and on whichever vCPU, maps to the same root 2. vCPU 0: the first nested
    VM-enter misses (R1 rotates into prev_roots[0], root invalid) and loads R2; VM-exit is a
    prev_roots hit back to R1; the next VM-enter with l2=2 is a hit on R2 (no allocation).
    vCPU 1 loads R1 (+1) and its L2 (l2=3) takes a reference on R2. Refcounts: R1 = TDP MMU +
    v0 (prev) + v1 (prev) = 3, R2 = TDP MMU + v0 + v1 = 3. Upstream: INVEPT single 4 (loads),
    all-context 4 (vmcs01 and vmcs02 first loads of each vCPU), INVVPID 3 (vpid12 1, 2, 3)."""
    trace = jsonl(
        tmp_path,
        [
            ev(0, "vm_create", vcpus=2, pcpu=0),
            ev(10, "vcpu_load", vcpu=0, pcpu=1),
            ev(11, "vm_entry", vcpu=0),
            ev(20, "nested_vmenter", vcpu=0, l2=1, nested_ept=False),
            ev(21, "vm_entry", vcpu=0),
            ev(30, "nested_vmexit", vcpu=0),
            ev(31, "vm_entry", vcpu=0),
            ev(40, "nested_vmenter", vcpu=0, l2=2, nested_ept=False),
            ev(41, "vm_entry", vcpu=0),
            ev(50, "vcpu_load", vcpu=1, pcpu=2),
            ev(51, "vm_entry", vcpu=1),
            ev(60, "nested_vmenter", vcpu=1, l2=3, nested_ept=False),
            ev(61, "vm_entry", vcpu=1),
        ],
    )
    engine = Engine(host(3), Upstream())
    play(engine, trace, 4)
    kvm = engine.host.vms[1]
    v0, v1 = kvm.vcpus
    assert slots(v0.arch.root_mmu) == [None, 1, None, None]
    play(engine, trace, 5)
    assert slots(v0.arch.root_mmu) == [2, 1, None, None]
    play(engine, trace, 7)
    assert slots(v0.arch.root_mmu) == [1, 2, None, None] and v0.arch.root_mmu.root_via_fast_switch
    play(engine, trace, 9)
    assert slots(v0.arch.root_mmu) == [2, 1, None, None]
    assert engine.host.metrics.vm["root_allocs"] == 2
    play(engine, trace)
    r1, r2 = kvm.tdp_mmu_roots
    assert (r1.id, r1.role, r1.root_count) == (1, TDP_L1, 3)
    assert (r2.id, r2.role, r2.root_count) == (2, TDP_L2, 3)
    assert slots(v1.arch.root_mmu) == [2, 1, None, None]
    assert v0.arch.guest_mmu.slots() == [INVALID_ROOT] * 4
    c = counters(engine)
    assert c["root_allocs"] == 2
    assert c["invept_single"] == [0, 2, 2] and c["invept_global"] == [0, 2, 2] and c["invvpid"] == [0, 2, 1]
    assert sum(c["stale_tlb_uses"]) == 0


def test_nested_ept_prev_roots_lru_drops_least_recently_used(tmp_path):
    """guest_mmu with nested EPT, EPTP12 = l2 in 1, 2, 3, 4, 5, 3, 1 (each followed by VM-exit
    to L1). Shadow roots S1..S5 are root ids 2..6 (R1 is 1). Slots [root, prev0, prev1, prev2]:
    after 1..4: [S4, S3, S2, S1] (each miss rotates the current root into prev_roots). l2=5:
    cached_root_find_and_keep_current() rotates all three and misses, ending with the LRU S1
    as current, which is freed (root_count 1 -> 0; not invalid, so it stays in mmu_page_hash):
    [S5, S4, S3, S2]. l2=3: hit at prev1 after one rotation: [S3, S5, S4, S2], no allocation,
    no flush. l2=1: miss, the LRU S2 drops to 0; S1 is re-found in the hash (0 -> 1, same
    id and page): [S1, S3, S5, S4]. root_allocs 6 (R1 + S1..S5), root_frees 0. Upstream:
    INVEPT single 7 (R1 and six shadow loads; none for the hit), all-context 2 (vmcs01 and
    vmcs02 first loads), INVVPID 7 (vpid12 changes at every VM-enter)."""
    events = [ev(0, "vm_create", vcpus=1, pcpu=0), ev(10, "vcpu_load", vcpu=0, pcpu=1), ev(11, "vm_entry", vcpu=0)]
    for k, l2 in enumerate((1, 2, 3, 4, 5, 3, 1)):
        t = 100 * (k + 1)
        events += [
            ev(t, "nested_vmenter", vcpu=0, l2=l2),
            ev(t + 1, "vm_entry", vcpu=0),
            ev(t + 2, "nested_vmexit", vcpu=0),
            ev(t + 3, "vm_entry", vcpu=0),
        ]
    trace = jsonl(tmp_path, events)
    engine = Engine(host(3), Upstream())
    kvm = lambda: engine.host.vms[1]  # noqa: E731
    gmmu = lambda: kvm().vcpus[0].arch.guest_mmu  # noqa: E731
    count = lambda: {sp.gfn: sp.root_count for sp in kvm().mmu_page_hash.values()}  # noqa: E731

    play(engine, trace, 3 + 4 * 4)  # after l2 = 1, 2, 3, 4
    assert slots(gmmu()) == [5, 4, 3, 2]
    assert [r.pgd for r in gmmu().slots()] == [4, 3, 2, 1]
    assert count() == {1: 1, 2: 1, 3: 1, 4: 1}
    play(engine, trace, 3 + 4 * 4 + 1)  # nested_vmenter l2=5: miss, S1 (LRU) dropped
    assert slots(gmmu()) == [None, 5, 4, 3]
    assert count() == {1: 0, 2: 1, 3: 1, 4: 1}
    s1 = kvm().roots[2]
    assert s1.gfn == 1 and not s1.invalid and kvm().mmu_page_hash[(1, SHADOW_EPT)] is s1
    play(engine, trace, 3 + 4 * 5)
    assert slots(gmmu()) == [6, 5, 4, 3]
    singles = sum(counters(engine)["invept_single"])
    play(engine, trace, 3 + 4 * 5 + 2)  # l2=3: hit, entered without kvm_mmu_load
    assert slots(gmmu()) == [4, 6, 5, 3] and gmmu().root_via_fast_switch
    assert sum(counters(engine)["invept_single"]) == singles
    play(engine, trace)
    assert slots(gmmu()) == [2, 4, 6, 5]
    assert kvm().roots[2] is s1 and s1.hpa == 0x2000
    assert count() == {1: 1, 2: 0, 3: 1, 4: 1, 5: 1}
    assert kvm().vcpus[0].arch.root_mmu.root.sp.id == 1
    c = counters(engine)
    assert (c["root_allocs"], c["root_frees"]) == (6, 0)
    assert c["invept_single"] == [0, 7, 0] and c["invept_global"] == [0, 2, 0] and c["invvpid"] == [0, 7, 0]
    assert sum(c["stale_tlb_uses"]) == 0


# --- 4. shadow page re-found ------------------------------------------------------------------
def test_l1_invept_keeps_shadow_page_and_its_cpu_flushed_mask(tmp_path):
    """Strategy E. R1 = root 1 (0x1000), shadow root S = root 2 (0x2000, EPTP12 7). The vmcs02
    first load on P1 flushes R1 (mask {1}); S is created and flushed by kvm_mmu_load (mask stays
    empty). Migration to P2 (VMCLEAR IPI to P1): E flushes R1 and S on P2 (masks {1,2}, {2}).
    l1_invept(7) frees guest_mmu's current root: root_count 1 -> 0, not invalid, so the page
    stays in mmu_page_hash and its cpu_flushed_mask entry is not freed. The next VM-enter with
    EPTP12 7 (vmcs02 migrates 1 -> 2: VMCLEAR IPI to P1; R1 has bit 2: skipped) misses in
    guest_mmu and kvm_mmu_load re-finds S: same id 2, same page, root_count 1, mask {2} (the
    same set). INVEPT single 6 (loads of R1, S, S; E on P1 for R1; E on P2 for R1 and S), no
    all-context, VMCLEAR IPIs 2 (both to P1), root_allocs 2, root_frees 0."""
    trace = jsonl(
        tmp_path,
        [
            ev(0, "vm_create", vcpus=1, pcpu=0),
            ev(10, "vcpu_load", vcpu=0, pcpu=1),
            ev(11, "vm_entry", vcpu=0),
            ev(20, "nested_vmenter", vcpu=0, l2=7),
            ev(21, "vm_entry", vcpu=0),
            ev(30, "nested_vmexit", vcpu=0),
            ev(31, "vm_entry", vcpu=0),
            ev(40, "vcpu_put", vcpu=0),
            ev(50, "vcpu_load", vcpu=0, pcpu=2),
            ev(51, "vm_entry", vcpu=0),
            ev(60, "l1_invept", vcpu=0, eptp12=7),
            ev(70, "nested_vmenter", vcpu=0, l2=7),
            ev(71, "vm_entry", vcpu=0),
        ],
    )
    strategy = PerRootCpumask()
    engine = Engine(host(4), strategy)
    play(engine, trace, 10)
    kvm = engine.host.vms[1]
    vcpu = kvm.vcpus[0]
    s = vcpu.arch.guest_mmu.root.sp
    assert (s.id, s.hpa, s.gfn, s.root_count) == (2, 0x2000, 7, 1)
    assert {sp.id: cpus for sp, cpus in strategy.cpu_flushed_mask.items()} == {1: {1, 2}, 2: {2}}
    mask = strategy.cpu_flushed_mask[s]
    play(engine, trace, 11)  # l1_invept 7
    assert vcpu.arch.guest_mmu.slots() == [INVALID_ROOT] * 4
    assert s.root_count == 0 and not s.invalid
    assert kvm.roots[2] is s and kvm.mmu_page_hash == {(7, SHADOW_EPT): s}
    assert strategy.cpu_flushed_mask[s] is mask and mask == {2}
    play(engine, trace)
    again = vcpu.arch.guest_mmu.root.sp
    assert again is s and (again.id, again.hpa, again.root_count) == (2, 0x2000, 1)
    assert vcpu.arch.guest_mmu.root.pgd == 7
    assert strategy.cpu_flushed_mask[s] is mask and mask == {2}
    c = counters(engine)
    assert c["invept_single"] == [0, 3, 3, 0] and c["invept_global"] == [0, 0, 0, 0]
    assert c["ipi_vmclear"] == [1, 2, 0, 0]  # P0: vmcs01 leaving the creating CPU
    assert (c["root_allocs"], c["root_frees"]) == (2, 0)
    assert sum(c["stale_tlb_uses"]) == 0


def test_l1_invept_single_and_all_context(tmp_path):
    """Shadow roots S1, S2, S3 (ids 2, 3, 4; EPTP12 1, 2, 3) leave guest_mmu as [S3, S2, S1,
    -]. handle_invept single-context on EPTP12 2 frees only the matching slot (prev0): [S3, -,
    S1, -], S2's root_count 1 -> 0. All-context (eptp12 0) frees every slot (KVM_MMU_ROOTS_ALL):
    all four invalid, S1 and S3 at root_count 0, and root_mmu's R1 untouched (current, refcount
    2). None is freed (root_frees 0): all three stay in mmu_page_hash, so the next VM-enter
    with EPTP12 2 gets S2 back (id 3, page 0x3000) without a new allocation (root_allocs 4)."""
    events = [ev(0, "vm_create", vcpus=1, pcpu=0), ev(10, "vcpu_load", vcpu=0, pcpu=1), ev(11, "vm_entry", vcpu=0)]
    for k, l2 in enumerate((1, 2, 3)):
        t = 100 * (k + 1)
        events += [
            ev(t, "nested_vmenter", vcpu=0, l2=l2),
            ev(t + 1, "vm_entry", vcpu=0),
            ev(t + 2, "nested_vmexit", vcpu=0),
            ev(t + 3, "vm_entry", vcpu=0),
        ]
    events += [
        ev(500, "l1_invept", vcpu=0, eptp12=2),
        ev(510, "l1_invept", vcpu=0),
        ev(520, "nested_vmenter", vcpu=0, l2=2),
        ev(521, "vm_entry", vcpu=0),
    ]
    trace = jsonl(tmp_path, events)
    engine = Engine(host(3), Upstream())
    play(engine, trace, 15)
    kvm = engine.host.vms[1]
    vcpu = kvm.vcpus[0]
    gmmu = vcpu.arch.guest_mmu
    assert slots(gmmu) == [4, 3, 2, None]
    play(engine, trace, 16)  # single-context, EPTP12 2
    assert slots(gmmu) == [4, None, 2, None]
    assert {sp.gfn: sp.root_count for sp in kvm.mmu_page_hash.values()} == {1: 1, 2: 0, 3: 1}
    play(engine, trace, 17)  # all-context
    assert gmmu.slots() == [INVALID_ROOT] * 4
    assert {sp.gfn: sp.root_count for sp in kvm.mmu_page_hash.values()} == {1: 0, 2: 0, 3: 0}
    assert set(kvm.roots) == {1, 2, 3, 4}
    r1 = vcpu.arch.root_mmu.root.sp
    assert (r1.id, r1.root_count) == (1, 2)
    play(engine, trace)
    assert slots(gmmu) == [3, None, None, None] and gmmu.root.hpa == 0x3000
    c = counters(engine)
    assert (c["root_allocs"], c["root_frees"]) == (4, 0)


# --- 5. VPIDs ---------------------------------------------------------------------------------
VPID_TRACE = [
    ev(0, "vm_create", vm=1, vcpus=3, pcpu=0),
    ev(1, "vm_create", vm=2, vcpus=2, pcpu=0),
    ev(10, "vcpu_load", vm=1, vcpu=0, pcpu=1),
    ev(11, "vm_entry", vm=1, vcpu=0),
    ev(20, "nested_vmenter", vm=1, vcpu=0, l2=7),
    ev(21, "vm_entry", vm=1, vcpu=0),
    ev(30, "nested_vmexit", vm=1, vcpu=0),
    ev(31, "vm_entry", vm=1, vcpu=0),
    ev(40, "nested_vmenter", vm=1, vcpu=0, l2=7),
    ev(41, "vm_entry", vm=1, vcpu=0),
    ev(50, "vcpu_put", vm=1, vcpu=0),
    ev(60, "vm_destroy", vm=1, pcpu=0),
    ev(70, "vm_create", vm=3, vcpus=4, pcpu=0),
    ev(71, "vm_create", vm=4, vcpus=1, pcpu=0),
]


def test_vpids_distinct_vpid02_at_first_nested_entry_and_reused_after_destroy(tmp_path):
    """allocate_vpid() per vCPU at creation: VM 1 gets VPIDs 1, 2, 3 and VM 2 gets 4, 5 (all
    distinct, none 0). vpid02 is 0 until vCPU 0's first nested VM-enter, which allocates 6; the
    second nested VM-enter keeps it. vm_destroy frees VM 1's VPIDs and vCPU 0's vpid02 (1, 2,
    3, 6), so VM 3's four vCPUs get exactly those back and VM 4 gets the next fresh one, 7."""
    trace = jsonl(tmp_path, VPID_TRACE)
    engine = Engine(host(3), Upstream())
    play(engine, trace, 2)
    vms = engine.host.vms
    assert [v.vpid for v in vms[1].vcpus] == [1, 2, 3] and [v.vpid for v in vms[2].vcpus] == [4, 5]
    v0 = vms[1].vcpus[0]
    play(engine, trace, 4)
    assert v0.vpid02 == 0
    play(engine, trace, 5)
    assert v0.vpid02 == 6
    play(engine, trace, 11)
    assert v0.vpid02 == 6 and [v.vpid02 for v in vms[1].vcpus[1:]] == [0, 0]
    play(engine, trace)
    assert 1 not in vms
    assert sorted(v.vpid for v in vms[3].vcpus) == [1, 2, 3, 6]
    assert [v.vpid for v in vms[4].vcpus] == [7]
    assert engine.host.metrics.vm["vpid_exhausted"] == 0


def test_freed_vpids_are_reused_lowest_first(tmp_path):
    """allocate_vpid() is find_first_zero_bit() on vmx_vpid_bitmap: after VM 1 (VPIDs 1, 2, 3
    and vpid02 6) is destroyed, the next vCPUs created get the lowest free VPIDs first, in
    order 1, 2, 3, 6, then 7."""
    engine = Engine(host(3), Upstream())
    engine.run(jsonl(tmp_path, VPID_TRACE))
    assert [v.vpid for v in engine.host.vms[3].vcpus] == [1, 2, 3, 6]


EXHAUSTION_TRACE = [
    ev(0, "vm_create", vcpus=3, pcpu=0),
    ev(10, "vcpu_load", vcpu=0, pcpu=1),
    ev(11, "vm_entry", vcpu=0),
    ev(20, "vcpu_load", vcpu=2, pcpu=2),
    ev(21, "vm_entry", vcpu=2),
    ev(30, "guest_tlb_flush", vcpu=0),
    ev(31, "vm_entry", vcpu=0),
    ev(40, "guest_tlb_flush", vcpu=2),
    ev(41, "vm_entry", vcpu=2),
    ev(50, "nested_vmenter", vcpu=0, l2=7),
    ev(51, "vm_entry", vcpu=0),
]


def test_vpid_exhaustion_runs_without_vpid_and_skips_invvpid(tmp_path):
    """A 3-entry bitmap holds VPIDs 1 and 2 only. Three vCPUs: 1, 2 and 0 (vpid_exhausted 1).
    KVM_REQ_TLB_FLUSH_GUEST -> vmx_flush_tlb_guest(): vCPU 0 (VPID 1) does one INVVPID on P1;
    vCPU 2 (no VPID) does none ("VM-Enter and VM-Exit are responsible for flushing"). vCPU 0's
    first nested VM-enter cannot get a vpid02 either (vpid_exhausted 2); its vpid12 change
    requests FLUSH_GUEST, and nested_get_vpid02() falls back to L1's VPID 1, so L2 runs on it
    and the INVVPID is issued. INVVPID total 2, on P1."""
    engine = Engine(host(3), Upstream())
    engine.host.vpids = VpidBitmap(3)
    engine.run(jsonl(tmp_path, EXHAUSTION_TRACE))
    vcpus = engine.host.vms[1].vcpus
    assert [v.vpid for v in vcpus] == [1, 2, 0] and vcpus[0].vpid02 == 0
    c = counters(engine)
    assert c["vpid_exhausted"] == 2
    assert c["invvpid"] == [0, 2, 0]


def test_vpid02_is_allocated_once_even_when_exhausted(tmp_path):
    """Kernel: vpid02 = allocate_vpid() once per VMXON (enter_vmx_operation). The model stands
    in 'first nested VM-enter' for VMXON. With VPIDs 1 (VM 1) and 2 (VM 2) taken, VM 1's first
    nested VM-enter fails to get a vpid02 (vpid_exhausted 1); a second nested VM-enter must not
    try again (still 1), and after VM 2 is destroyed (VPID 2 free) a third one must still run
    L2 with vpid02 0."""
    events = [
        ev(0, "vm_create", vm=1, vcpus=1, pcpu=0),
        ev(1, "vm_create", vm=2, vcpus=1, pcpu=0),
        ev(10, "vcpu_load", vm=1, vcpu=0, pcpu=1),
        ev(11, "vm_entry", vm=1, vcpu=0),
    ]
    for t in (20, 40, 60):
        events += [
            ev(t, "nested_vmenter", vm=1, vcpu=0, l2=7),
            ev(t + 1, "vm_entry", vm=1, vcpu=0),
            ev(t + 2, "nested_vmexit", vm=1, vcpu=0),
            ev(t + 3, "vm_entry", vm=1, vcpu=0),
        ]
        if t == 40:
            events.append(ev(t + 5, "vm_destroy", vm=2, pcpu=0))
    engine = Engine(host(3), Upstream())
    engine.host.vpids = VpidBitmap(3)
    engine.run(jsonl(tmp_path, events))
    assert engine.host.metrics.vm["vpid_exhausted"] == 1
    assert engine.host.vms[1].vcpus[0].vpid02 == 0


# --- 6. VM destroy ----------------------------------------------------------------------------
DESTROY_TRACE = [
    ev(0, "vm_create", vcpus=3, pcpu=0),
    ev(10, "vcpu_load", vcpu=0, pcpu=1),
    ev(11, "vm_entry", vcpu=0),
    ev(12, "nested_vmenter", vcpu=0, l2=7),
    ev(13, "vm_entry", vcpu=0),
    ev(14, "nested_vmexit", vcpu=0),
    ev(15, "vm_entry", vcpu=0),
    ev(20, "vcpu_load", vcpu=1, pcpu=2),
    ev(21, "vm_entry", vcpu=1),
    ev(30, "vcpu_load", vcpu=2, pcpu=3),
    ev(31, "vm_entry", vcpu=2),
    ev(40, "vcpu_put", vcpu=0),
    ev(41, "vcpu_put", vcpu=1),
    ev(42, "vcpu_put", vcpu=2),
]


@pytest.mark.parametrize(
    "cpu,vmclear",
    [(0, [3, 2, 1, 1]), (1, [3, 0, 1, 1]), (2, [3, 2, 0, 1]), (3, [3, 2, 1, 0])],
)
def test_vm_destroy_vmclears_remote_vmcs_and_returns_every_root_page(tmp_path, cpu, vmclear):
    """Four VMCSs are active: vCPU 0's vmcs01 and vmcs02 on P1 (it ran L2 there), vCPU 1's
    vmcs01 on P2, vCPU 2's on P3. kvm_destroy_vm on CPU `cpu` VMCLEARs each where it is active:
    one IPI per VMCS on another CPU (so P1 receives 2), none for a local one (each vCPU is first
    loaded here, nested_vmx_free_vcpu(), then its VMCSs freed: the same IPIs). CPU 0 also got
    one VMCLEAR IPI per vCPU at its first load (vm_create loaded them there). Roots: the shared
    TDP root R1 (page 0x1000) and vCPU 0's shadow root S (0x2000). The vCPUs drop their
    references; kvm_mmu_uninit_vm zaps S first (obsolete shadow page, root_count 0: freed, one
    remote flush, no IPI since no vCPU is in guest mode) and then puts the TDP MMU's reference
    on R1: both pages go back to the pool, LIFO order [0x2000, 0x1000], root_frees 2. Freeing
    does not flush: P1 still caches both EP4TAs. All four VPIDs (1-3, vpid02 4) are freed."""
    trace = jsonl(tmp_path, [*DESTROY_TRACE, ev(50, "vm_destroy", pcpu=cpu)])
    engine = Engine(host(4), Upstream())
    engine.run(trace)
    h = engine.host
    assert h.vms == {}
    assert h.pool.free[0] == [0x2000, 0x1000] and h.pool.next_pfn[0] == 3
    assert sorted(h.tlb[1]) == [0x1000, 0x2000] and list(h.tlb[2]) == [0x1000] == list(h.tlb[3])
    assert sorted(h.vpids.free) == [1, 2, 3, 4]
    c = counters(engine)
    assert c["ipi_vmclear"] == vmclear
    assert c["ipi_flush"] == [0, 0, 0, 0]
    assert (c["root_allocs"], c["root_frees"], c["remote_flushes"]) == (2, 2, 1)


def test_vm_destroy_with_loaded_vcpu_is_a_trace_error(tmp_path):
    """kvm_destroy_vm needs every vCPU put first (the vCPU fds hold references on the VM):
    destroying while vCPU 1 is still loaded is an impossible trace, reported with its line
    (line 9, after three comment or blank lines) and time, and the VM is left alone."""
    path = tmp_path / "bad.jsonl"
    lines = [
        "# destroy with a loaded vCPU",
        json.dumps(ev(0, "vm_create", vcpus=2, pcpu=0)),
        json.dumps(ev(10, "vcpu_load", vcpu=0, pcpu=1)),
        "",
        json.dumps(ev(20, "vcpu_load", vcpu=1, pcpu=2)),
        json.dumps(ev(21, "vm_entry", vcpu=1)),
        json.dumps(ev(30, "vcpu_put", vcpu=0)),
        "# vCPU 1 is still loaded on P2",
        json.dumps(ev(40, "vm_destroy", pcpu=0)),
    ]
    path.write_text("\n".join(lines) + "\n")
    engine = Engine(host(4), Upstream())
    with pytest.raises(TraceError) as e:
        engine.run(load_text(path))
    assert str(e.value) == "line 9 (t_ns=40): vm_destroy: vCPU 1 of VM 1 is still loaded; vcpu_put it first"
    assert 1 in engine.host.vms and engine.host.vms[1].vcpus[1].loaded


# --- 7. trace errors --------------------------------------------------------------------------
GOOD = json.dumps(ev(0, "vm_create", vcpus=1))


@pytest.mark.parametrize(
    "bad,message",
    [
        ('{"t_ns": 5, "event": "vm_boot", "vm": 1}', "line 4: unknown event 'vm_boot'; allowed: vm_create,"),
        ('{"t_ns": 5, "event": "vcpu_load", "vm": 1, "vcpu": 0}', "line 4: vcpu_load: missing field 'pcpu'"),
        (
            '{"t_ns": 5, "event": "vm_create", "vm": 2, "vcpus": 1, "tdp_level": 3}',
            "line 4: vm_create: tdp_level must be 4 or 5, got 3",
        ),
        ('{"t_ns": 0, "event": "vm_exit", "vm": 1, "vcpu": 0}', "line 4: t_ns 0 goes back in time (previous 10)"),
        ('{"t_ns": 5, "event": "vm_exit", "vm": 1, "vcpu": 0,}', "line 4: not valid JSON ("),
        ('{"t_ns": 5, "event": "vm_exit", "vm": 1, "vcpu": 0, "pcpu": 1}', "line 4: vm_exit: unknown field 'pcpu'"),
        (
            '{"t_ns": 5, "event": "vm_exit", "vm": 1, "vcpu": -1}',
            "line 4: field 'vcpu' must be an integer in 0..2147483647, got -1",
        ),
    ],
)
def test_load_text_errors_name_the_line(tmp_path, bad, message):
    """load_text() rejects a bad line with a TraceError starting 'line N:' where N counts every
    physical line (comments and blank lines included): here the bad record is on line 4, after
    a valid vm_create, a comment and a valid vcpu_load at t_ns 10."""
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n# comment\n{json.dumps(ev(10, 'vcpu_load', vcpu=0, pcpu=1))}\n{bad}\n")
    with pytest.raises(TraceError) as e:
        load_text(path)
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize(
    "bad,message",
    [
        (ev(20, "vm_entry", vcpu=1), "line 5 (t_ns=20): vm_entry: <vcpu 1/1 cpu=-1> is not loaded on any pCPU"),
        (ev(20, "vcpu_load", vcpu=1, pcpu=1), "line 5 (t_ns=20): vcpu_load: pCPU 1 is running <vcpu 1/0 cpu=1>"),
        (ev(20, "memslot_delete", vm=9, pcpu=0), "line 5 (t_ns=20): memslot_delete: VM 9 does not exist"),
        (ev(20, "vm_entry", vm=9, vcpu=0), "line 5 (t_ns=20): vm_entry: VM 9 does not exist"),
        (ev(20, "vcpu_load", vcpu=2, pcpu=2), "line 5 (t_ns=20): vcpu_load: VM 1 has no vCPU 2 (it has 2)"),
        (ev(20, "nested_vmexit", vcpu=0), "line 5 (t_ns=20): nested_vmexit: <vcpu 1/0 cpu=1> is not running L2"),
    ],
)
def test_replay_errors_name_line_and_time(tmp_path, bad, message):
    """Records that parse but cannot happen fail at replay with 'line N (t_ns=T): ...': a
    vm_entry on a vCPU never loaded, a vcpu_load onto a pCPU running another vCPU, an unknown
    VM or vCPU index, a nested VM-exit from L1. Line 5 follows a comment and three records."""
    path = tmp_path / "bad.jsonl"
    ok = [ev(0, "vm_create", vcpus=2), ev(10, "vcpu_load", vcpu=0, pcpu=1), ev(11, "vm_entry", vcpu=0)]
    path.write_text("# two vCPUs, vCPU 0 runs on P1\n" + "".join(json.dumps(e) + "\n" for e in [*ok, bad]))
    with pytest.raises(TraceError) as e:
        simulate(load_text(path), host(4), Upstream())
    assert str(e.value).startswith(message), str(e.value)


def test_replay_error_of_binary_trace_names_event_index():
    """Without source lines (an array-built or binary trace) the error names the 0-based event
    index instead: the vm_entry of a never-loaded vCPU is event 1."""
    events = np.array(
        [(0, Ev.VM_CREATE, 1, -1, 0, pack_vm_create(1)), (7, Ev.VM_ENTRY, 1, 0, -1, 0)],
        dtype=EVENT_DTYPE,
    )
    with pytest.raises(TraceError) as e:
        simulate(Trace.from_array(events), host(2), Upstream())
    assert str(e.value).startswith("event 1 (t_ns=7): vm_entry: <vcpu 1/0 cpu=-1> is not loaded")


# --- 8. binary and text round trips -----------------------------------------------------------
def _summary(trace: Trace, topo: Topology) -> dict:
    _, s = simulate(trace, topo, Upstream())
    return {k: v for k, v in s.items() if k not in IGNORED}


def test_binary_and_text_round_trips(tmp_path):
    """save_binary writes magic + JSON header + raw records, so load() and load_binary() (also
    in small chunks, which the engine replays across chunk boundaries) give back identical
    records and duration, hence an identical simulate() summary (minus wall-clock keys). The
    text form drops only fields an event does not have (always -1 / 0 in generated traces), so
    write_text + load_text gives identical records too; its duration is the last event's time,
    so only the summary keys that do not depend on duration are compared."""
    topo = host(16)
    trace = PartitionedPinned(duration_s=0.3, lifecycle={"zap_per_s": 40.0, "lifetime_s": 0.15}).trace(topo, 3)
    ref = trace.to_array()
    assert len(ref) > 200 and {Ev.VM_DESTROY, Ev.ZAP, Ev.MEMSLOT_DELETE, Ev.SMM_ENTER} <= set(ref["kind"].tolist())
    expected = _summary(trace, topo)
    assert expected["remote_flushes"] > 0 and expected["root_frees"] > 0

    path = tmp_path / "t.hvtrace"
    assert save_binary(trace, path) == len(ref)
    assert not (tmp_path / "t.hvtrace.part").exists()
    for loaded in (load(path), load_binary(path), load_binary(path, chunk_events=37)):
        assert loaded.duration_ns == trace.duration_ns == 300_000_000
        got = loaded.to_array()
        assert got.dtype == EVENT_DTYPE and np.array_equal(got, ref)
        assert _summary(loaded, topo) == expected
    assert len(list(load_binary(path, chunk_events=37))) == -(-len(ref) // 37)

    text = tmp_path / "t.jsonl"
    write_text(trace, text)
    back = load(text)
    assert np.array_equal(back.to_array(), ref)
    assert back.duration_ns == int(ref["time_ns"][-1])
    rates = {k for k in expected if k.endswith("_per_s")} | {"sim_seconds", *TRACE_RATE_KEYS}  # they need the duration
    assert {k: v for k, v in _summary(back, topo).items() if k not in rates} == {k: v for k, v in expected.items() if k not in rates}


# --- 9. noise windows -------------------------------------------------------------------------
def test_noise_windows_threshold_sums_and_budget():
    """osnoise-style accounting with 1 ms windows, threshold 5 us, budget 20 us. On CPU 1:
    4.9 us (t=0) is below threshold and ignored; window 0 sums 10 + 12 = 22 (> 20: a
    violation); window 1 has 5.0 (exactly the threshold: counted); window 2 has 20 (not over
    budget) and an ignored 3; window 3 has 21 (a violation). noise_us 68 over 5 events,
    max single 21, max window 22, 2 violations. CPU 0 sees nothing."""
    m = Metrics(2, NoiseBudget(period_us=1000, threshold_us=5.0, budget_us=20.0))
    for t_ns, us in [
        (0, 4.9),
        (100_000, 10.0),
        (500_000, 12.0),
        (1_000_000, 5.0),
        (2_500_000, 20.0),
        (2_600_000, 3.0),
        (3_999_999, 21.0),
    ]:
        m.record_noise(np.array([1]), t_ns, np.array([us]))
    pc = m.result()["per_cpu"]
    assert pc["noise_us"].tolist() == [0.0, 68.0]
    assert pc["noise_events"].tolist() == [0, 5]
    assert pc["noise_max_single_us"].tolist() == [0.0, 21.0]
    assert pc["noise_max_window_us"].tolist() == [0.0, 22.0]
    assert pc["rt_budget_violations"].tolist() == [0, 2]


def test_remote_flush_kick_noise_is_ipi_exit_and_reentry_flush(tmp_path):
    """A zap (kvm_flush_remote_tlbs, bare metal) while the vCPU is in guest mode on RT pCPU 1:
    one flush IPI forces a VM exit, and the re-entry services KVM_REQ_TLB_FLUSH with INVEPT
    all-context; that is one interruption of ipi_receive + vmexit + invept_global = 2 + 4 + 16
    = 22 us (> budget 20: one violation). The sender (CPU 0) pays ipi_send 1 us, not noise.
    P1's flush_overhead also holds the non-interrupt work: vmcs_migrate 64, the first entry's
    all-context 16 and load's single 8, the 22 us above, and one refill (128) for the root
    dropped by the re-entry flush = 238, and the VMCLEAR IPI it sends to CPU 0 at its first
    load (ipi_send 1): 239. CPU 0 loaded vmcs01 at vm_create (vmcs_migrate 64) and receives that
    IPI (ipi_receive 2, one 2 us interruption): 1 + 64 + 2 = 67."""
    cost = CostModel(
        ipi_send_us=1,
        ipi_receive_us=2,
        vmexit_us=4,
        invept_single_us=8,
        invept_global_us=16,
        invvpid_us=32,
        vmcs_migrate_us=64,
        refill_us=128,
        hv_flush_hypercall_us=256,
    )
    trace = jsonl(
        tmp_path,
        [
            ev(0, "vm_create", vcpus=1, pcpu=0),
            ev(10, "vcpu_load", vcpu=0, pcpu=1),
            ev(11, "vm_entry", vcpu=0),
            ev(20, "zap", pcpu=0),
        ],
    )
    r, s = simulate(trace, host(4), Upstream(), cost=cost)
    pc = r["per_cpu"]
    assert pc["noise_us"].tolist() == [2.0, 22.0, 0.0, 0.0]
    assert pc["noise_events"].tolist() == [1, 1, 0, 0]
    assert pc["flush_overhead_us"].tolist() == [67.0, 239.0, 0.0, 0.0]
    assert (s["rt_noise_max_us"], s["rt_noise_max_single_us"], s["rt_budget_violations"]) == (22.0, 22.0, 1)
    assert (s["ipi_flush"], s["vmexits_from_ipi"], s["invept_global"], s["invept_single"]) == (1, 1, 2, 1)
    assert (s["remote_flushes"], s["stale_tlb_uses"]) == (1, 0)


# --- 10. mask memory --------------------------------------------------------------------------
def test_cpumask_and_generation_table_sizes(tmp_path):
    """cpumask_size() = BITS_TO_LONGS(nr_cpu_ids) longs, rounded to a kmalloc class: 8192 CPUs
    -> 1024 bytes; 384 -> 48 -> kmalloc-64; 4 -> 8. Sized by NR_CPUS (8192) it is 1024 bytes
    whatever nr_cpu_ids is. Beyond kmalloc-8k, whole pages. F's table is a u32 per (root, CPU):
    4 * 8192 = 32768 bytes, which a run on an 8192-CPU host with one live root reports as
    cpumask_bytes_peak; E sized by NR_CPUS on 4 CPUs reports 1024 for its one root."""
    assert cpumask_bytes(8192, "nr_cpu_ids") == 1024
    assert cpumask_bytes(384, "nr_cpu_ids") == 64 == kmalloc_size(48)
    assert cpumask_bytes(4, "nr_cpu_ids") == 8
    assert cpumask_bytes(4, "NR_CPUS") == cpumask_bytes(384, "NR_CPUS") == cpumask_bytes(8192, "NR_CPUS") == 1024
    assert [kmalloc_size(n) for n in (1, 9, 65, 129, 8192, 8193)] == [8, 16, 96, 192, 8192, 12288]
    with pytest.raises(ConfigError) as e:
        PerRootCpumask(mask_sizing="nr_possible")
    assert e.value.key == "strategy.mask_sizing"

    events = [ev(0, "vm_create", vcpus=1, pcpu=0), ev(10, "vcpu_load", vcpu=0, pcpu=1), ev(11, "vm_entry", vcpu=0)]
    big = Topology(nr_cpus=8192, smt=1, housekeeping_per_node=1)
    gen = RootGeneration()
    _, s = simulate(jsonl(tmp_path, events), big, gen)
    assert gen.table_bytes == 32768 and s["cpumask_bytes_peak"] == 32768
    _, s = simulate(jsonl(tmp_path, events), host(4), PerRootCpumask(mask_sizing="NR_CPUS"))
    assert s["cpumask_bytes_peak"] == 1024


# --- 11. configuration ------------------------------------------------------------------------
def test_hyperv_hypercall_strategy_needs_hyperv_host():
    """Strategy H turns flush_tlb_current into HvCallFlushGuestPhysicalAddressSpace, which only
    exists nested on Hyper-V: attaching it to a bare-metal host is a ConfigError on host.env;
    on a hyperv host it attaches."""
    with pytest.raises(ConfigError) as e:
        Engine(host(4), HypervFlushHypercall())
    assert e.value.key == "host.env"
    assert "hyperv_flush_hypercall" in str(e.value) and "'bare_metal'" in str(e.value)
    strategy = HypervFlushHypercall()
    engine = Engine(host(4, env="hyperv"), strategy)
    assert strategy.host is engine.host


@pytest.mark.parametrize(
    "line,message",
    [
        (
            '{"t_ns": 5, "event": "nested_vmenter", "vm": 1, "vcpu": 0, "l2": 3, "nested_ept": "false"}',
            "field 'nested_ept' must be true or false",
        ),
        ('{"t_ns": 5, "event": "vm_create", "vm": 2, "vcpus": 70000}', "field 'vcpus' must be an integer in 1..4096"),
        (
            '{"t_ns": 5, "event": "nested_vmenter", "vm": 1, "vcpu": 0, "l2": 4294967296}',
            "field 'l2' must be an integer in 1..4294967295",
        ),
    ],
)
def test_fields_that_would_not_fit_the_binary_form_are_rejected(tmp_path, line, message):
    """Booleans must be JSON booleans (the string "false" is not false), and packed fields must
    fit their bits in `arg` instead of silently wrapping."""
    path = tmp_path / "t.jsonl"
    path.write_text('{"t_ns": 0, "event": "vm_create", "vm": 1, "vcpus": 1}\n' + line + "\n")
    with pytest.raises(TraceError, match="^line 2: " + re.escape(message)):
        load_text(path)


def test_host_keeps_a_housekeeping_cpu_and_text_traces_take_long_times(tmp_path):
    """The kernel refuses to isolate every CPU; and text traces use 64-bit times like binary ones."""
    with pytest.raises(ConfigError) as e:
        Topology(nr_cpus=8, smt=1, housekeeping_per_node=0)
    assert e.value.key == "host.housekeeping_per_node"
    with pytest.raises(ConfigError) as e:
        Topology(nr_cpus=4, smt=1, isolcpus="0-3")
    assert e.value.key == "host.isolcpus"
    assert Topology(nr_cpus=32, isolcpus=19).rt_mask().nonzero()[0].tolist() == [19]  # host.isolcpus=19 arrives as an int
    with pytest.raises(ConfigError, match="must be a cpulist"):
        Topology(nr_cpus=32, isolcpus=[1, 2])
    path = tmp_path / "long.jsonl"
    path.write_text('{"t_ns": 0, "event": "vm_create", "vm": 1, "vcpus": 1}\n{"t_ns": 3600000000000, "event": "vm_destroy", "vm": 1}\n')
    assert load_text(path).duration_ns == 3_600_000_000_000


def test_rcu_freed_pages_join_the_allocator_when_their_grace_period_ends():
    """page_reuse=cached: a TDP root's page freed at t=0 with a 10 ns grace period is back at
    t=10 (the RCU callback), before a shadow page freed at t=20, so the allocator (LIFO) hands
    out the shadow page first, then the TDP root's, then a new one."""
    pool = PagePool(1, cached=True, rcu_grace_ns=10)
    pool.release(0, 0xA000, now=0, rcu=True)
    pool.release(0, 0xB000, now=20, rcu=False)
    assert [pool.page(0), pool.page(0), pool.page(0)] == [0xB000, 0xA000, 0x1000]


def test_a_trace_file_is_checked_against_the_host_before_it_runs(tmp_path):
    """workload=trace: a pCPU the host lacks is a config error up front (not a replay error after
    Ray and MLflow started), and the file's duration is known for the progress line."""
    from hvmodel.workloads.trace_file import TraceFile

    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"t_ns": 0, "event": "vm_create", "vm": 1, "vcpus": 1}\n{"t_ns": 7, "event": "vcpu_load", "vm": 1, "vcpu": 0, "pcpu": 20}\n'
    )
    x16 = Topology(nr_cpus=16, name="x16")
    with pytest.raises(ConfigError, match="uses pcpu 20, but host x16 has 16 CPUs: pick a bigger host") as e:
        TraceFile(str(path)).check(x16)
    assert e.value.key == "workload.path"
    w = TraceFile(str(path))
    w.check(Topology(nr_cpus=32))
    assert w.duration_ns == 7
